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

constexpr int64_t kClsQuery = 1, kClsDoc = 2, kQueryCls = 4, kQueryDoc = 8, kDocCls = 16, kDocQuery = 32;

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

void check_index_tensor(const at::Tensor &t, const char *name) {
  TORCH_CHECK(t.device().is_cpu(), "sparse_attention (cpu): ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong, "sparse_attention: ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, "sparse_attention: ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "sparse_attention: ", name, " must be contiguous");
}

void check_qkv(const at::Tensor &x, const at::Tensor &q, const char *name) {
  TORCH_CHECK(x.device().is_cpu(), "sparse_attention (cpu): ", name, " must be on the CPU, got ", x.device());
  TORCH_CHECK(x.dim() == 3, "sparse_attention: ", name, " must be [tokens, heads, head_dim], got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "sparse_attention: ", name, " must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.scalar_type() == q.scalar_type(), "sparse_attention: ", name, " has dtype ", x.scalar_type(),
              " but q has ", q.scalar_type());
  TORCH_CHECK(x.sizes() == q.sizes(), "sparse_attention: ", name, " has shape ", x.sizes(), " but q has ", q.sizes());
  TORCH_CHECK(x.is_contiguous(), "sparse_attention: ", name, " must be contiguous");
}

Layout make_layout(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &cu_queries,
                   const at::Tensor &cu_docs, const at::Tensor &row_to_query, int64_t flags, int64_t window,
                   bool with_rows) {
  check_qkv(q, q, "q");
  check_qkv(k, q, "k");
  check_qkv(v, q, "v");
  check_index_tensor(cu_queries, "cu_queries");
  check_index_tensor(cu_docs, "cu_docs");
  check_index_tensor(row_to_query, "row_to_query");
  TORCH_CHECK(flags >= 0 && flags < 64, "sparse_attention: flags must be a 6-bit mask in [0, 63], got ", flags);
  TORCH_CHECK(window >= -1, "sparse_attention: window must be >= 0, or -1 for unlimited, got ", window);
  TORCH_CHECK(cu_queries.numel() >= 2, "sparse_attention: cu_queries needs at least 2 entries (U >= 1)");
  TORCH_CHECK(cu_docs.numel() >= 2, "sparse_attention: cu_docs needs at least 2 entries (B >= 1)");

  Layout L;
  L.U = cu_queries.numel() - 1;
  L.B = cu_docs.numel() - 1;
  L.T = q.size(0);
  L.flags = flags;
  L.window = window;
  L.cuq = cu_queries.data_ptr<int64_t>();
  L.cud = cu_docs.data_ptr<int64_t>();
  L.r2q = row_to_query.data_ptr<int64_t>();
  TORCH_CHECK(row_to_query.numel() == L.B, "sparse_attention: row_to_query has ", row_to_query.numel(),
              " entries but cu_docs describes ", L.B, " documents");
  TORCH_CHECK(L.cuq[0] == L.B, "sparse_attention: cu_queries[0] must equal the batch size ", L.B, " (one [CLS] per row), got ",
              L.cuq[0]);
  for (int64_t u = 0; u < L.U; ++u)
    TORCH_CHECK(L.cuq[u + 1] >= L.cuq[u], "sparse_attention: cu_queries must be non-decreasing (at ", u, ")");
  TORCH_CHECK(L.cud[0] == L.cuq[L.U], "sparse_attention: cu_docs[0] (", L.cud[0], ") must equal cu_queries[U] (",
              L.cuq[L.U], ")");
  for (int64_t b = 0; b < L.B; ++b)
    TORCH_CHECK(L.cud[b + 1] >= L.cud[b], "sparse_attention: cu_docs must be non-decreasing (at ", b, ")");
  TORCH_CHECK(L.cud[L.B] == L.T, "sparse_attention: cu_docs[B] (", L.cud[L.B], ") must equal the token count ", L.T);
  const bool query_sees_row = flags & (kQueryCls | kQueryDoc);
  TORCH_CHECK(!query_sees_row || L.U == L.B,
              "sparse_attention: query_cls / query_doc attention make the query depend on its row, so queries cannot "
              "be shared (got ", L.U, " queries for ", L.B, " rows)");
  for (int64_t b = 0; b < L.B; ++b) {
    const int64_t u = L.r2q[b];
    TORCH_CHECK(u >= 0 && u < L.U, "sparse_attention: row_to_query[", b, "] = ", u, " is out of range [0, ", L.U, ")");
    TORCH_CHECK(!query_sees_row || u == b,
                "sparse_attention: query_cls / query_doc attention need row_to_query[b] == b (no shared queries), got "
                "row_to_query[",
                b, "] = ", u);
  }
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
      const __m256 inv = _mm256_set1_ps(1.f / sum);
      for (int64_t c = 0; c < C; ++c) _mm256_storeu_ps(out + t * HD + h * D + 8 * c, _mm256_mul_ps(ov[c], inv));
      lse[t * H + h] = m + std::log(sum);
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
                                                            int64_t flags, int64_t window, double scale) {
  const Layout L = make_layout(q, k, v, cu_queries, cu_docs, row_to_query, flags, window, false);
  const int64_t H = q.size(1), D = q.size(2);
  auto out = at::empty_like(q);
  auto lse = at::empty({L.T, H}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sparse_attention_fwd_cpu", [&] {
    forward_dispatch<scalar_t>(L, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                           out.data_ptr<scalar_t>(), lse.data_ptr<float>(), H, D, static_cast<float>(scale));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd_cpu(
    const at::Tensor &grad_out, const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &out,
    const at::Tensor &lse, const at::Tensor &cu_queries, const at::Tensor &cu_docs, const at::Tensor &row_to_query,
    int64_t flags, int64_t window, double scale) {
  const Layout L = make_layout(q, k, v, cu_queries, cu_docs, row_to_query, flags, window, true);
  check_qkv(grad_out, q, "grad_out");
  check_qkv(out, q, "out");
  const int64_t H = q.size(1), D = q.size(2);
  TORCH_CHECK(lse.device().is_cpu(), "sparse_attention (cpu): lse must be on the CPU, got ", lse.device());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "sparse_attention: lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == L.T && lse.size(1) == H, "sparse_attention: lse must be [", L.T, ", ",
              H, "], got ", lse.sizes());
  TORCH_CHECK(lse.is_contiguous(), "sparse_attention: lse must be contiguous");
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  auto delta = at::empty({L.T, H}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sparse_attention_bwd_cpu", [&] {
    backward_dispatch<scalar_t>(L, grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                            v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<float>(),
                            delta.data_ptr<float>(), dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                            dv.data_ptr<scalar_t>(), H, D, static_cast<float>(scale));
  });
  return {dq, dk, dv};
}
