// CPU implementation of the sparse cross-encoder attention ops (see torch-ext/torch_binding.h for the contract).
//
// Forward: one softmax per (token, head) row over the union of its key ranges. Every row's keys are at most three
// contiguous packed ranges (own segment or document band, [CLS], query or document), addressed in place: shared
// query keys are read from the one packed copy, never gathered. Scores are kept in a per-thread buffer, so the
// softmax is exact (max, exp, sum) with fp32 accumulation for every input dtype; lse is saved for backward.
// Tasks are tokens, each handling all heads, so that a key's (or row's) [H, D] slice is read contiguously.
// The kernels (sparse_attention_cpu_impl.h) are compiled twice, for AVX2+FMA and for the baseline ISA, and picked at
// run time; fp32 with head_dim 8/16/32/64/128 on AVX2 takes a register-blocked forward (heads outer, keys inner).
//
// Backward (race-free, no atomics):
//   pass 1, row-centric:  delta_i = <dO_i, O_i>; dq_i = scale * sum_j P_ij (dP_ij - delta_i) k_j
//   pass 2, key-centric:  for each key j, the rows that attend to it (again contiguous ranges: the band of its
//                         document, its [CLS], its query, or every document / [CLS] of a shared query), and
//                         dv_j = sum_i P_ij dO_i, dk_j = scale * sum_i P_ij (dP_ij - delta_i) q_i.
//   Each output element is written by exactly one task, so gradients of shared query keys/values are the sum over
//   all documents of that query without synchronisation. All indexing is 64-bit.
#include "torch_binding.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#include <vector>

namespace {

using sparse_ce::kClsDoc, sparse_ce::kClsQuery, sparse_ce::kDocCls, sparse_ce::kDocQuery, sparse_ce::kQueryCls,
    sparse_ce::kQueryDoc;

enum class Seg { Cls, Query, Doc };

struct Range {
  int64_t begin, end;
};

// Read-only view of the packed layout, with the rows of every query (for the key-centric backward pass).
struct Layout {
  int64_t B = 0, U = 0, T = 0, flags = 0, window = -1;
  const int64_t *cuq = nullptr, *cud = nullptr, *r2q = nullptr;
  std::vector<int64_t> rows_ptr, rows_list;  // CSR: rows b with row_to_query[b] == u

  // Segment of packed token t and its index (row b for [CLS]/document, query u for query tokens).
  inline Seg locate(int64_t t, int64_t &idx) const {
    if (t < B) {
      idx = t;
      return Seg::Cls;
    }
    if (t < cuq[U]) {
      idx = std::upper_bound(cuq, cuq + U + 1, t) - cuq - 1;
      return Seg::Query;
    }
    idx = std::upper_bound(cud, cud + B + 1, t) - cud - 1;
    return Seg::Doc;
  }

  inline Range band(int64_t b, int64_t t) const {
    if (window < 0) return {cud[b], cud[b + 1]};
    return {std::max(cud[b], t - window), std::min(cud[b + 1], t + window + 1)};
  }

  // Keys of row t (at most three ranges).
  inline int keys(int64_t t, Range *out) const {
    int64_t idx;
    int n = 0;
    switch (locate(t, idx)) {
      case Seg::Cls:
        out[n++] = {idx, idx + 1};
        if (flags & kClsQuery) out[n++] = {cuq[r2q[idx]], cuq[r2q[idx] + 1]};
        if (flags & kClsDoc) out[n++] = {cud[idx], cud[idx + 1]};
        break;
      case Seg::Query:
        out[n++] = {cuq[idx], cuq[idx + 1]};
        if (flags & kQueryCls) out[n++] = {idx, idx + 1};  // U == B, row_to_query[b] == b (checked)
        if (flags & kQueryDoc) out[n++] = {cud[idx], cud[idx + 1]};
        break;
      case Seg::Doc:
        if (flags & kDocCls) out[n++] = {idx, idx + 1};
        if (flags & kDocQuery) out[n++] = {cuq[r2q[idx]], cuq[r2q[idx] + 1]};
        out[n++] = band(idx, t);
        break;
    }
    return n;
  }

  // Calls fn(Range) for every range of rows that attend to key t (the transpose of keys()).
  template <typename Fn>
  inline void attendees(int64_t t, Fn &&fn) const {
    int64_t idx;
    switch (locate(t, idx)) {
      case Seg::Cls:
        fn(Range{idx, idx + 1});
        if (flags & kQueryCls) fn(Range{cuq[idx], cuq[idx + 1]});
        if (flags & kDocCls) fn(Range{cud[idx], cud[idx + 1]});
        break;
      case Seg::Query:
        fn(Range{cuq[idx], cuq[idx + 1]});
        if (flags & (kClsQuery | kDocQuery)) {
          for (int64_t r = rows_ptr[idx]; r < rows_ptr[idx + 1]; ++r) {
            const int64_t b = rows_list[r];
            if (flags & kClsQuery) fn(Range{b, b + 1});
            if (flags & kDocQuery) fn(Range{cud[b], cud[b + 1]});
          }
        }
        break;
      case Seg::Doc:
        if (flags & kClsDoc) fn(Range{idx, idx + 1});
        if (flags & kQueryDoc) fn(Range{cuq[idx], cuq[idx + 1]});
        fn(band(idx, t));
        break;
    }
  }
};

Layout make_layout(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &cu_queries,
                   const at::Tensor &cu_docs, const at::Tensor &row_to_query, int64_t flags, int64_t window,
                   bool with_rows) {
  using sparse_ce::Backend;
  const sparse_ce::Sizes s =
      sparse_ce::check_forward_args(Backend::CPU, q, k, v, cu_queries, cu_docs, row_to_query, flags, window);
  Layout L;
  L.U = s.U;
  L.B = s.B;
  L.T = s.T;
  L.flags = flags;
  L.window = s.window;  // clamped to T by the shared checks (no t + window + 1 overflow)
  L.cuq = cu_queries.data_ptr<int64_t>();
  L.cud = cu_docs.data_ptr<int64_t>();
  L.r2q = row_to_query.data_ptr<int64_t>();
  sparse_ce::check_layout_values({L.cuq, L.cud, L.r2q, L.U, L.B, L.T, flags});
  if (with_rows) {
    L.rows_ptr.assign(L.U + 1, 0);
    for (int64_t b = 0; b < L.B; ++b) L.rows_ptr[L.r2q[b] + 1]++;
    for (int64_t u = 0; u < L.U; ++u) L.rows_ptr[u + 1] += L.rows_ptr[u];
    L.rows_list.resize(L.B);
    std::vector<int64_t> fill(L.rows_ptr.begin(), L.rows_ptr.end() - 1);
    for (int64_t b = 0; b < L.B; ++b) L.rows_list[fill[L.r2q[b]]++] = b;
  }
  return L;
}

// The kernels, compiled twice: for x86-64 CPUs with AVX2 and FMA (8-wide FMAs, a vectorised exp), and for any CPU.
#if defined(__x86_64__) && defined(__GNUC__)
#define SPARSE_CE_X86_DISPATCH 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "sparse_attention_cpu_impl.h"

// fp32 forward for head_dim D = 8 * C, heads outer and keys inner, so that a head's query and
// output accumulators stay in registers: per (row, head) one pass of FMAs for the scores, a vectorised exp over the
// row's keys, one pass of FMAs for the output. Same results as forward_impl up to fp32 summation order.
inline float hsum(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int64_t C>
void forward_rows_f32(const Layout &L, const float *q, const float *k, const float *v, float *out, float *lse,
                      int64_t H, float scale, int64_t begin, int64_t end, std::vector<float> &scores) {
  constexpr int64_t D = 8 * C;
  const int64_t HD = H * D;
  Range ranges[3];
  for (int64_t t = begin; t < end; ++t) {
    const int n = L.keys(t, ranges);
    int64_t count = 0;
    for (int r = 0; r < n; ++r) count += ranges[r].end - ranges[r].begin;
    if (static_cast<int64_t>(scores.size()) < count) scores.resize(count);
    float *__restrict s = scores.data();
    for (int64_t h = 0; h < H; ++h) {
      __m256 qv[C];
      for (int64_t c = 0; c < C; ++c) qv[c] = _mm256_mul_ps(_mm256_loadu_ps(q + t * HD + h * D + 8 * c), _mm256_set1_ps(scale));
      float m = -std::numeric_limits<float>::infinity();
      int64_t i = 0;
      for (int r = 0; r < n; ++r)
        for (int64_t j = ranges[r].begin; j < ranges[r].end; ++j, ++i) {
          const float *kj = k + j * HD + h * D;
          __m256 acc = _mm256_mul_ps(qv[0], _mm256_loadu_ps(kj));
          for (int64_t c = 1; c < C; ++c) acc = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(kj + 8 * c), acc);
          s[i] = hsum(acc);
          m = std::max(m, s[i]);
        }
      m = finite_max(m);
      float sum = 0.f;
      for (int64_t x = 0; x < count; ++x) {  // vectorised by the compiler (softmax_exp is branch-free)
        s[x] = softmax_exp(s[x] - m);
        sum += s[x];
      }
      __m256 ov[C];
      for (int64_t c = 0; c < C; ++c) ov[c] = _mm256_setzero_ps();
      i = 0;
      for (int r = 0; r < n; ++r)
        for (int64_t j = ranges[r].begin; j < ranges[r].end; ++j, ++i) {
          const float *vj = v + j * HD + h * D;
          const __m256 p = _mm256_set1_ps(s[i]);
          for (int64_t c = 0; c < C; ++c) ov[c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 8 * c), ov[c]);
        }
      const __m256 inv = _mm256_set1_ps(inverse_sum(sum));
      for (int64_t c = 0; c < C; ++c) _mm256_storeu_ps(out + t * HD + h * D + 8 * c, _mm256_mul_ps(ov[c], inv));
      lse[t * H + h] = row_lse(m, sum);
    }
  }
}

// Runs forward_rows_f32 when head_dim is 8, 16, 32, 64 or 128; false (nothing done) otherwise.
inline bool forward_f32(const Layout &L, const float *q, const float *k, const float *v, float *out, float *lse,
                        int64_t H, int64_t D, float scale) {
  using Rows = void (*)(const Layout &, const float *, const float *, const float *, float *, float *, int64_t, float,
                        int64_t, int64_t, std::vector<float> &);
  Rows rows = nullptr;
  switch (D) {
    case 8: rows = forward_rows_f32<1>; break;
    case 16: rows = forward_rows_f32<2>; break;
    case 32: rows = forward_rows_f32<4>; break;
    case 64: rows = forward_rows_f32<8>; break;
    case 128: rows = forward_rows_f32<16>; break;
    default: return false;
  }
  at::parallel_for(0, L.T, grain(L, H), [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    rows(L, q, k, v, out, lse, H, scale, begin, end, scores);
  });
  return true;
}
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace baseline {
#include "sparse_attention_cpu_impl.h"
}  // namespace baseline

bool use_avx2() {
#ifdef SPARSE_CE_X86_DISPATCH
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

template <typename scalar_t>
void forward_dispatch(const Layout &L, const scalar_t *q, const scalar_t *k, const scalar_t *v, scalar_t *out,
                      float *lse, int64_t H, int64_t D, float scale) {
#ifdef SPARSE_CE_X86_DISPATCH
  if (use_avx2()) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (avx2::forward_f32(L, q, k, v, out, lse, H, D, scale)) return;
    }
    return avx2::forward_impl<scalar_t>(L, q, k, v, out, lse, H, D, scale);
  }
#endif
  baseline::forward_impl<scalar_t>(L, q, k, v, out, lse, H, D, scale);
}

template <typename scalar_t, typename... Args>
void backward_dispatch(Args &&...args) {
#ifdef SPARSE_CE_X86_DISPATCH
  if (use_avx2()) return avx2::backward_impl<scalar_t>(std::forward<Args>(args)...);
#endif
  baseline::backward_impl<scalar_t>(std::forward<Args>(args)...);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd_cpu(const at::Tensor &q, const at::Tensor &k,
                                                            const at::Tensor &v, const at::Tensor &cu_queries,
                                                            const at::Tensor &cu_docs, const at::Tensor &row_to_query,
                                                            int64_t flags, int64_t window, double scale,
                                                            bool /*validate: the CPU op always checks (O(B))*/) {
  const Layout L = make_layout(q, k, v, cu_queries, cu_docs, row_to_query, flags, window, false);
  const int64_t H = q.size(1), D = q.size(2);
  auto out = at::empty_like(q);
  auto lse = at::empty({L.T, H}, q.options().dtype(at::kFloat));
  SPARSE_CE_DISPATCH(q.scalar_type(), "sparse_attention_fwd_cpu", [&] {
    forward_dispatch<scalar_t>(L, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                           out.data_ptr<scalar_t>(), lse.data_ptr<float>(), H, D, static_cast<float>(scale));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd_cpu(
    const at::Tensor &grad_out, const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &out,
    const at::Tensor &lse, const at::Tensor &cu_queries, const at::Tensor &cu_docs, const at::Tensor &row_to_query,
    int64_t flags, int64_t window, double scale, bool /*validate: always checked, as in forward*/) {
  const Layout L = make_layout(q, k, v, cu_queries, cu_docs, row_to_query, flags, window, true);
  const int64_t H = q.size(1), D = q.size(2);
  sparse_ce::check_backward_args(sparse_ce::Backend::CPU, grad_out, out, lse, q, {L.T, H, D, L.U, L.B});
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  auto delta = at::empty({L.T, H}, q.options().dtype(at::kFloat));
  SPARSE_CE_DISPATCH(q.scalar_type(), "sparse_attention_bwd_cpu", [&] {
    backward_dispatch<scalar_t>(L, grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                            v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<float>(),
                            delta.data_ptr<float>(), dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                            dv.data_ptr<scalar_t>(), H, D, static_cast<float>(scale));
  });
  return {dq, dk, dv};
}
