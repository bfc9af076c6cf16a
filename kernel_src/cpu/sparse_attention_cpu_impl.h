// The CPU kernels proper, included twice by sparse_attention_cpu.cpp: once compiled for AVX2+FMA and once for the
// baseline ISA, inside different namespaces; the op picks one at run time. Needs Layout, Range (and the standard
// headers) from the including file. No include guard on purpose.

// Dot product with 8 independent partial sums so that -O3 vectorises it without -ffast-math.
template <typename scalar_t>
inline float dot(const float *__restrict a, const scalar_t *__restrict b, int64_t D) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[d + l] * static_cast<float>(b[d + l]);
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; d < D; ++d) s += a[d] * static_cast<float>(b[d]);
  return s;
}

// exp(x) in fp32 for the softmax, where x = score - row max <= 0 (up to rounding): Cody-Waite reduction to
// r in [-ln2/2, ln2/2] and a degree-6 Taylor polynomial, relative error below 2e-7. Branch-free, so the loop over
// heads vectorises (a libm call does not); exp(x < -87) is 0, as in fp32 up to denormals.
inline float softmax_exp(float x) {
  const float clamped = x < -87.f ? -87.f : x;
  const int n = static_cast<int>(clamped * 1.44269504088896341f - 0.5f);  // round(x / ln2) for x <= ~0
  const float nf = static_cast<float>(n);
  const float r = (clamped - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float p = 1.3888889e-3f;
  p = p * r + 8.3333333e-3f;
  p = p * r + 4.1666667e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (n + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < -87.f ? 0.f : p * two_n;
}

// Guards of rows without a key of finite score: the max to subtract (0 instead of -inf), 1 / sum (0 for an empty
// sum, so the output is zero), and lse (+inf, so that backward's exp(s - lse) is 0 for every key).
inline float finite_max(float m) { return m == -std::numeric_limits<float>::infinity() ? 0.f : m; }
inline float inverse_sum(float sum) { return sum > 0.f ? 1.f / sum : 0.f; }
inline float row_lse(float m, float sum) {
  return sum > 0.f ? m + std::log(sum) : std::numeric_limits<float>::infinity();
}

template <typename scalar_t>
inline void axpy(float *__restrict y, float a, const scalar_t *__restrict x, int64_t D) {
  for (int64_t d = 0; d < D; ++d) y[d] += a * static_cast<float>(x[d]);
}

template <typename scalar_t>
inline void load(float *__restrict y, const scalar_t *__restrict x, int64_t D) {
  for (int64_t d = 0; d < D; ++d) y[d] = static_cast<float>(x[d]);
}

inline int64_t grain(const Layout &L, int64_t H) { return std::max<int64_t>(1, 256 / std::max<int64_t>(1, H)); }

// Rows are processed token by token with all heads at once, so that every key token's [H, D] slice is read once,
// contiguously.
template <typename scalar_t>
void forward_impl(const Layout &L, const scalar_t *q, const scalar_t *k, const scalar_t *v, scalar_t *out,
                  float *lse, int64_t H, int64_t D, float scale) {
  const int64_t HD = H * D;
  at::parallel_for(0, L.T, grain(L, H), [&](int64_t begin, int64_t end) {
    std::vector<float> qf(HD), acc(HD), scores, m(H), sum(H);
    Range ranges[3];
    for (int64_t t = begin; t < end; ++t) {
      const int n = L.keys(t, ranges);
      int64_t count = 0;
      for (int r = 0; r < n; ++r) count += ranges[r].end - ranges[r].begin;
      if (static_cast<int64_t>(scores.size()) < count * H) scores.resize(count * H);
      load(qf.data(), q + t * HD, HD);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      int64_t c = 0;
      for (int r = 0; r < n; ++r)
        for (int64_t j = ranges[r].begin; j < ranges[r].end; ++j, ++c)
          for (int64_t h = 0; h < H; ++h) {
            const float s = dot(qf.data() + h * D, k + j * HD + h * D, D) * scale;
            scores[c * H + h] = s;
            m[h] = std::max(m[h], s);
          }
      // No finite score (all -inf): subtract 0 instead of -inf, so every p is exp(-inf) = 0, not exp(NaN).
      for (int64_t h = 0; h < H; ++h) m[h] = finite_max(m[h]);
      std::fill(sum.begin(), sum.end(), 0.f);
      for (int64_t i = 0; i < count; ++i) {
        float *__restrict row = scores.data() + i * H;
        for (int64_t h = 0; h < H; ++h) row[h] = softmax_exp(row[h] - m[h]);
        for (int64_t h = 0; h < H; ++h) sum[h] += row[h];
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      c = 0;
      for (int r = 0; r < n; ++r)
        for (int64_t j = ranges[r].begin; j < ranges[r].end; ++j, ++c)
          for (int64_t h = 0; h < H; ++h) axpy(acc.data() + h * D, scores[c * H + h], v + j * HD + h * D, D);
      for (int64_t h = 0; h < H; ++h) {
        const float inv = inverse_sum(sum[h]);
        for (int64_t d = 0; d < D; ++d) out[t * HD + h * D + d] = static_cast<scalar_t>(acc[h * D + d] * inv);
        lse[t * H + h] = row_lse(m[h], sum[h]);
      }
    }
  });
}

template <typename scalar_t>
void backward_impl(const Layout &L, const scalar_t *dout, const scalar_t *q, const scalar_t *k, const scalar_t *v,
                   const scalar_t *out, const float *lse, float *delta, scalar_t *dq, scalar_t *dk, scalar_t *dv,
                   int64_t H, int64_t D, float scale) {
  const int64_t HD = H * D;
  // pass 1: delta and dq, one task per row token (all heads)
  at::parallel_for(0, L.T, grain(L, H), [&](int64_t begin, int64_t end) {
    std::vector<float> qf(HD), gf(HD), acc(HD);
    Range ranges[3];
    for (int64_t t = begin; t < end; ++t) {
      const int n = L.keys(t, ranges);
      load(qf.data(), q + t * HD, HD);
      load(gf.data(), dout + t * HD, HD);
      for (int64_t h = 0; h < H; ++h) delta[t * H + h] = dot(gf.data() + h * D, out + t * HD + h * D, D);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int r = 0; r < n; ++r)
        for (int64_t j = ranges[r].begin; j < ranges[r].end; ++j)
          for (int64_t h = 0; h < H; ++h) {
            const int64_t key = j * HD + h * D;
            const float p = softmax_exp(dot(qf.data() + h * D, k + key, D) * scale - lse[t * H + h]);
            if (p == 0.f) continue;  // adds nothing (and no 0 * inf from a -inf key)
            const float dp = dot(gf.data() + h * D, v + key, D);
            axpy(acc.data() + h * D, p * (dp - delta[t * H + h]), k + key, D);
          }
      for (int64_t d = 0; d < HD; ++d) dq[t * HD + d] = static_cast<scalar_t>(acc[d] * scale);
    }
  });
  // pass 2: dk and dv, one task per key token (all heads at once, so that each attending row is read
  // contiguously: a shared query key is attended by every document token of its query)
  at::parallel_for(0, L.T, grain(L, H), [&](int64_t begin, int64_t end) {
    std::vector<float> kf(HD), vf(HD), dkacc(HD), dvacc(HD);
    for (int64_t j = begin; j < end; ++j) {
      const int64_t key = j * HD;
      load(kf.data(), k + key, HD);
      load(vf.data(), v + key, HD);
      std::fill(dkacc.begin(), dkacc.end(), 0.f);
      std::fill(dvacc.begin(), dvacc.end(), 0.f);
      L.attendees(j, [&](Range r) {
        for (int64_t i = r.begin; i < r.end; ++i) {
          for (int64_t h = 0; h < H; ++h) {
            const int64_t row = i * HD + h * D;
            const float p = softmax_exp(dot(kf.data() + h * D, q + row, D) * scale - lse[i * H + h]);
            if (p == 0.f) continue;
            const float dp = dot(vf.data() + h * D, dout + row, D);
            axpy(dvacc.data() + h * D, p, dout + row, D);
            axpy(dkacc.data() + h * D, p * (dp - delta[i * H + h]), q + row, D);
          }
        }
      });
      for (int64_t d = 0; d < HD; ++d) {
        dk[key + d] = static_cast<scalar_t>(dkacc[d] * scale);
        dv[key + d] = static_cast<scalar_t>(dvacc[d]);
      }
    }
  });
}
