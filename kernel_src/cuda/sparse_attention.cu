// CUDA backend of the sparse cross-encoder attention (see ../torch-ext/torch_binding.h for the contract and
// NOTES.md in this folder for the design).
//
// One warp per (packed token, head). The head dimension is spread over the 32 lanes (element e = i * 32 + lane,
// i < ELEMS, so a warp reads a row of K or V as ELEMS coalesced 32-element chunks). Every row's keys are at most
// three contiguous ranges of packed tokens (see row_key_ranges), so the forward pass is one online softmax over
// those ranges with float accumulators (double for double inputs), and the backward pass recomputes the
// probabilities from the saved log-sum-exp.

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <cuda_runtime.h>

#include "../torch-ext/torch_binding.h"  // the contract: the two entry points defined below

// Deliberately no c10/cuda or ATen/cuda headers: the CPU torch wheel ships them without the generated
// c10/cuda/impl/cuda_cmake_macros.h (and ATen/cuda/CUDAContext.h needs cuBLAS headers), which would make the
// compile-only CI check impossible. The device guard and the current stream come through c10's device-generic
// interfaces instead (the CUDA implementation is registered by libc10_cuda at runtime), and launches are checked
// with cudaGetLastError.
#define SPARSE_CE_CUDA_CHECK_LAUNCH()                                                                              \
  do {                                                                                                             \
    const cudaError_t sparse_ce_err = cudaGetLastError();                                                          \
    TORCH_CHECK(sparse_ce_err == cudaSuccess, "sparse_attention (CUDA): kernel launch failed: ",                   \
                cudaGetErrorString(sparse_ce_err));                                                                \
  } while (0)

namespace sparse_ce_cuda {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreadsPerBlock = kWarpSize * kWarpsPerBlock;
constexpr int kMaxHeadDim = 256;

// Direction bits, as DIRECTION_FLAGS in the Python package.
constexpr int64_t kClsQuery = 1;
constexpr int64_t kClsDoc = 2;
constexpr int64_t kQueryCls = 4;
constexpr int64_t kQueryDoc = 8;
constexpr int64_t kDocCls = 16;
constexpr int64_t kDocQuery = 32;

struct Layout {
  const int64_t *cu_queries;   // [U + 1]
  const int64_t *cu_docs;      // [B + 1]
  const int64_t *row_to_query; // [B]
  int64_t num_rows;            // B
  int64_t num_queries;         // U
  int64_t num_tokens;          // T
  int64_t num_heads;           // H
  int64_t head_dim;            // D
  int64_t flags;
  int64_t window;
};

// Half-open range [begin, end) of packed token indices.
struct Range {
  int64_t begin;
  int64_t end;
};

// Largest i in [0, n] with cu[i] <= t (cu is non-decreasing); the segment that owns token t even when empty
// segments share its start offset.
__device__ __forceinline__ int64_t owner(const int64_t *__restrict__ cu, int64_t n, int64_t t) {
  int64_t lo = 0, hi = n; // invariant: cu[lo] <= t (callers guarantee t >= cu[0])
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (__ldg(cu + mid) <= t) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Tokens of query u; empty for an out-of-range u (row_to_query is only validated on the host when it lives there).
__device__ __forceinline__ Range query_range(const int64_t *__restrict__ cu_queries, int64_t num_queries, int64_t u) {
  if (u < 0 || u >= num_queries) {
    return Range{0, 0};
  }
  return Range{__ldg(cu_queries + u), __ldg(cu_queries + u + 1)};
}

__device__ __forceinline__ Range clamp_range(int64_t begin, int64_t end, int64_t num_tokens) {
  // The index tensors are trusted to match T (checked on the host only when they live on the CPU); clamping
  // keeps an inconsistent input from reading or writing out of bounds.
  begin = begin < 0 ? 0 : begin;
  end = end > num_tokens ? num_tokens : end;
  return Range{begin, end > begin ? end : begin};
}

// The (at most three) key ranges of packed token t; one softmax runs over their union.
__device__ __forceinline__ void row_key_ranges(const Layout &L, int64_t t, Range r[3]) {
  const int64_t query_begin = __ldg(L.cu_queries);      // = B
  const int64_t doc_begin = __ldg(L.cu_docs);           // = cu_queries[U]
  const Range empty{0, 0};
  if (t < L.num_rows && t < query_begin) {
    // [CLS] of row b: itself, its query, its document.
    const int64_t b = t;
    const int64_t u = __ldg(L.row_to_query + b);
    r[0] = Range{b, b + 1};
    r[1] = (L.flags & kClsQuery) ? query_range(L.cu_queries, L.num_queries, u) : empty;
    r[2] = (L.flags & kClsDoc) ? Range{__ldg(L.cu_docs + b), __ldg(L.cu_docs + b + 1)} : empty;
  } else if (t < doc_begin) {
    // Token of query u: the query; [CLS] u and document u only without sharing (U == B, checked on the host).
    const int64_t u = owner(L.cu_queries, L.num_queries, t);
    r[0] = Range{__ldg(L.cu_queries + u), __ldg(L.cu_queries + u + 1)};
    r[1] = (L.flags & kQueryCls) ? Range{u, u + 1} : empty;
    r[2] = (L.flags & kQueryDoc) ? Range{__ldg(L.cu_docs + u), __ldg(L.cu_docs + u + 1)} : empty;
  } else {
    // Token of document b: [CLS] b, the (possibly shared) query, the band |p - j| <= w inside the document.
    const int64_t b = owner(L.cu_docs, L.num_rows, t);
    const int64_t u = __ldg(L.row_to_query + b);
    const int64_t d0 = __ldg(L.cu_docs + b), d1 = __ldg(L.cu_docs + b + 1);
    r[0] = (L.flags & kDocCls) ? Range{b, b + 1} : empty;
    r[1] = (L.flags & kDocQuery) ? query_range(L.cu_queries, L.num_queries, u) : empty;
    if (L.window < 0) {
      r[2] = Range{d0, d1};
    } else {
      r[2] = Range{t - L.window > d0 ? t - L.window : d0, t + L.window + 1 < d1 ? t + L.window + 1 : d1};
    }
  }
  for (int i = 0; i < 3; ++i) {
    r[i] = clamp_range(r[i].begin, r[i].end, L.num_tokens);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

// Loads this lane's ELEMS elements of a D-vector (zeros past D).
template <int ELEMS, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_row(const scalar_t *__restrict__ p, int64_t head_dim, int lane, acc_t x[ELEMS]) {
#pragma unroll
  for (int i = 0; i < ELEMS; ++i) {
    const int e = i * kWarpSize + lane;
    x[i] = e < head_dim ? static_cast<acc_t>(p[e]) : acc_t(0);
  }
}

template <int ELEMS, typename acc_t>
__device__ __forceinline__ acc_t lane_dot(const acc_t a[ELEMS], const acc_t b[ELEMS]) {
  acc_t s = 0;
#pragma unroll
  for (int i = 0; i < ELEMS; ++i) {
    s += a[i] * b[i];
  }
  return s;
}

template <int ELEMS, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    sparse_attention_fwd_kernel(const scalar_t *__restrict__ q, const scalar_t *__restrict__ k,
                                const scalar_t *__restrict__ v, scalar_t *__restrict__ out, float *__restrict__ lse,
                                const Layout L, const acc_t scale) {
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x / kWarpSize);
  const int lane = threadIdx.x % kWarpSize;
  if (warp >= L.num_tokens * L.num_heads) {
    return; // whole warp: shuffles below always see 32 active lanes
  }
  const int64_t t = warp / L.num_heads;
  const int64_t h = warp - t * L.num_heads;
  const int64_t D = L.head_dim;
  const int64_t token_stride = L.num_heads * D;

  acc_t qi[ELEMS];
  load_row<ELEMS>(q + warp * D, D, lane, qi);
#pragma unroll
  for (int i = 0; i < ELEMS; ++i) {
    qi[i] *= scale;
  }

  Range ranges[3];
  row_key_ranges(L, t, ranges);

  acc_t m = static_cast<acc_t>(-INFINITY);
  acc_t l = 0;
  acc_t acc[ELEMS];
#pragma unroll
  for (int i = 0; i < ELEMS; ++i) {
    acc[i] = 0;
  }

#pragma unroll // keeps ranges[] in registers (a dynamic index would put it in local memory)
  for (int r = 0; r < 3; ++r) {
#pragma unroll 1
    for (int64_t j = ranges[r].begin; j < ranges[r].end; ++j) {
      const int64_t off = j * token_stride + h * D;
      acc_t kj[ELEMS], vj[ELEMS];
      load_row<ELEMS>(k + off, D, lane, kj);
      load_row<ELEMS>(v + off, D, lane, vj);
      const acc_t s = warp_sum(lane_dot<ELEMS>(qi, kj));
      const acc_t m_new = s > m ? s : m;
      const acc_t correction = acc_exp(m - m_new); // exp(-inf) = 0 on the first key
      const acc_t p = acc_exp(s - m_new);
      l = l * correction + p;
#pragma unroll
      for (int i = 0; i < ELEMS; ++i) {
        acc[i] = acc[i] * correction + p * vj[i];
      }
      m = m_new;
    }
  }

  // Every row attends at least to itself (self-attention inside a segment is always on), so l >= 1 unless the
  // index tensors are inconsistent; guard anyway so such an input yields zeros rather than NaN.
  const acc_t inv_l = l > acc_t(0) ? acc_t(1) / l : acc_t(0);
  scalar_t *o = out + warp * D;
#pragma unroll
  for (int i = 0; i < ELEMS; ++i) {
    const int e = i * kWarpSize + lane;
    if (e < D) {
      o[e] = static_cast<scalar_t>(acc[i] * inv_l);
    }
  }
  if (lane == 0) {
    lse[warp] = l > acc_t(0) ? static_cast<float>(m + acc_log(l)) : static_cast<float>(INFINITY);
  }
}

template <int ELEMS, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    sparse_attention_bwd_kernel(const scalar_t *__restrict__ grad_out, const scalar_t *__restrict__ q,
                                const scalar_t *__restrict__ k, const scalar_t *__restrict__ v,
                                const scalar_t *__restrict__ out, const float *__restrict__ lse,
                                scalar_t *__restrict__ dq, acc_t *__restrict__ dk_acc, acc_t *__restrict__ dv_acc,
                                const Layout L, const acc_t scale) {
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x / kWarpSize);
  const int lane = threadIdx.x % kWarpSize;
  if (warp >= L.num_tokens * L.num_heads) {
    return;
  }
  const int64_t t = warp / L.num_heads;
  const int64_t h = warp - t * L.num_heads;
  const int64_t D = L.head_dim;
  const int64_t token_stride = L.num_heads * D;

  acc_t qi[ELEMS], doi[ELEMS], oi[ELEMS];
  load_row<ELEMS>(q + warp * D, D, lane, qi);
  load_row<ELEMS>(grad_out + warp * D, D, lane, doi);
  load_row<ELEMS>(out + warp * D, D, lane, oi);
  // D_i = sum_d dO_i * O_i (= sum_j P_ij dP_ij).
  const acc_t delta = warp_sum(lane_dot<ELEMS>(doi, oi));
  const acc_t lse_i = static_cast<acc_t>(lse[warp]);

  acc_t qs[ELEMS], dqi[ELEMS];
#pragma unroll
  for (int i = 0; i < ELEMS; ++i) {
    qs[i] = qi[i] * scale;
    dqi[i] = 0;
  }

  Range ranges[3];
  row_key_ranges(L, t, ranges);

#pragma unroll // keeps ranges[] in registers (a dynamic index would put it in local memory)
  for (int r = 0; r < 3; ++r) {
#pragma unroll 1
    for (int64_t j = ranges[r].begin; j < ranges[r].end; ++j) {
      const int64_t off = j * token_stride + h * D;
      acc_t kj[ELEMS], vj[ELEMS];
      load_row<ELEMS>(k + off, D, lane, kj);
      load_row<ELEMS>(v + off, D, lane, vj);
      const acc_t s = warp_sum(lane_dot<ELEMS>(qs, kj));
      const acc_t dp = warp_sum(lane_dot<ELEMS>(doi, vj));
      const acc_t p = acc_exp(s - lse_i);
      const acc_t ds = p * (dp - delta) * scale; // gradient w.r.t. the unscaled score q.k
#pragma unroll
      for (int i = 0; i < ELEMS; ++i) {
        const int e = i * kWarpSize + lane;
        dqi[i] += ds * kj[i];
        if (e < D) {
          atomicAdd(dv_acc + off + e, p * doi[i]);
          atomicAdd(dk_acc + off + e, ds * qi[i]);
        }
      }
    }
  }

  scalar_t *g = dq + warp * D;
#pragma unroll
  for (int i = 0; i < ELEMS; ++i) {
    const int e = i * kWarpSize + lane;
    if (e < D) {
      g[e] = static_cast<scalar_t>(dqi[i]);
    }
  }
}

// ----------------------------------------------------------------------------------------------------------------
// Host side

void check_qkv(const at::Tensor &x, const char *name, const at::Tensor &q) {
  TORCH_CHECK(x.is_cuda(), "sparse_attention (CUDA): ", name, " must be a CUDA tensor");
  TORCH_CHECK(x.device() == q.device(), "sparse_attention (CUDA): ", name, " must be on the same device as q");
  TORCH_CHECK(x.scalar_type() == q.scalar_type(), "sparse_attention (CUDA): ", name, " has dtype ",
              x.scalar_type(), ", q has ", q.scalar_type());
  TORCH_CHECK(x.sizes() == q.sizes(), "sparse_attention (CUDA): ", name, " has shape ", x.sizes(), ", q has ",
              q.sizes());
  TORCH_CHECK(x.is_contiguous(), "sparse_attention (CUDA): ", name, " must be contiguous");
}

// Index tensors may live on the CPU (moved here, and checked against T) or on q's device (not read back: no sync).
at::Tensor index_tensor(const at::Tensor &x, const char *name, int64_t expected_numel, const at::Tensor &q) {
  TORCH_CHECK(x.scalar_type() == at::kLong, "sparse_attention (CUDA): ", name, " must be int64, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 1, "sparse_attention (CUDA): ", name, " must be 1-D");
  TORCH_CHECK(expected_numel < 0 || x.numel() == expected_numel, "sparse_attention (CUDA): ", name, " has ",
              x.numel(), " elements, expected ", expected_numel);
  TORCH_CHECK(x.is_cpu() || x.device() == q.device(), "sparse_attention (CUDA): ", name,
              " must be on the CPU or on q's device");
  return x.to(q.device(), /*non_blocking=*/true).contiguous();
}

struct Prepared {
  Layout layout;
  at::Tensor cu_queries, cu_docs, row_to_query; // keep the device copies alive
};

Prepared prepare(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &cu_queries,
                 const at::Tensor &cu_docs, const at::Tensor &row_to_query, int64_t flags, int64_t window) {
  TORCH_CHECK(q.is_cuda(), "sparse_attention (CUDA): q must be a CUDA tensor");
  TORCH_CHECK(q.dim() == 3, "sparse_attention (CUDA): q must be [T, H, D], got ", q.sizes());
  TORCH_CHECK(q.is_contiguous(), "sparse_attention (CUDA): q must be contiguous");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "sparse_attention (CUDA): dtype must be float32, float16 or bfloat16 (or float64), got ", dtype);
  check_qkv(k, "k", q);
  check_qkv(v, "v", q);
  TORCH_CHECK(q.size(2) >= 1 && q.size(2) <= kMaxHeadDim, "sparse_attention (CUDA): head dim must be in [1, ",
              kMaxHeadDim, "], got ", q.size(2));
  TORCH_CHECK(flags >= 0 && flags < 64, "sparse_attention (CUDA): flags must be a 6-bit mask, got ", flags);
  TORCH_CHECK(window >= -1, "sparse_attention (CUDA): window must be >= 0 or -1 (unlimited), got ", window);
  TORCH_CHECK(cu_queries.dim() == 1 && cu_queries.numel() >= 1,
              "sparse_attention (CUDA): cu_queries must be 1-D with U + 1 >= 1 elements");
  TORCH_CHECK(cu_docs.dim() == 1 && cu_docs.numel() >= 1,
              "sparse_attention (CUDA): cu_docs must be 1-D with B + 1 >= 1 elements");
  const int64_t U = cu_queries.numel() - 1;
  const int64_t B = cu_docs.numel() - 1;
  const int64_t T = q.size(0);

  Prepared p;
  p.cu_queries = index_tensor(cu_queries, "cu_queries", U + 1, q);
  p.cu_docs = index_tensor(cu_docs, "cu_docs", B + 1, q);
  p.row_to_query = index_tensor(row_to_query, "row_to_query", B, q);

  if (cu_docs.is_cpu() && cu_queries.is_cpu() && row_to_query.is_cpu()) {
    // Consistency checks, only when the index tensors are already on the host (no device sync).
    const at::Tensor cq_t = cu_queries.contiguous(), cd_t = cu_docs.contiguous(), rq_t = row_to_query.contiguous();
    const int64_t *cq = cq_t.data_ptr<int64_t>();
    const int64_t *cd = cd_t.data_ptr<int64_t>();
    const int64_t *rq = rq_t.data_ptr<int64_t>();
    TORCH_CHECK(cq[0] == B, "sparse_attention (CUDA): cu_queries[0] must be B = ", B, ", got ", cq[0]);
    TORCH_CHECK(cd[0] == cq[U], "sparse_attention (CUDA): cu_docs[0] must equal cu_queries[U]");
    TORCH_CHECK(cd[B] == T, "sparse_attention (CUDA): cu_docs[B] = ", cd[B], " but q has T = ", T, " tokens");
    for (int64_t i = 0; i < U; ++i) {
      TORCH_CHECK(cq[i] <= cq[i + 1], "sparse_attention (CUDA): cu_queries must be non-decreasing");
    }
    for (int64_t i = 0; i < B; ++i) {
      TORCH_CHECK(cd[i] <= cd[i + 1], "sparse_attention (CUDA): cu_docs must be non-decreasing");
      TORCH_CHECK(rq[i] >= 0 && rq[i] < U, "sparse_attention (CUDA): row_to_query[", i, "] = ", rq[i],
                  " is not a query index in [0, ", U, ")");
    }
  }

  if (flags & (kQueryCls | kQueryDoc)) {
    TORCH_CHECK(U == B, "sparse_attention (CUDA): query_cls / query_doc attention needs one query per row ",
                "(no shared queries), got U = ", U, " queries for B = ", B, " rows");
    // row_to_query must be the identity; this reads it back (a sync), only in this unshared mode.
    TORCH_CHECK(B == 0 || p.row_to_query.equal(at::arange(B, p.row_to_query.options())),
                "sparse_attention (CUDA): query_cls / query_doc attention needs row_to_query[b] == b ",
                "(no shared queries)");
  }

  Layout &L = p.layout;
  L.cu_queries = p.cu_queries.data_ptr<int64_t>();
  L.cu_docs = p.cu_docs.data_ptr<int64_t>();
  L.row_to_query = p.row_to_query.data_ptr<int64_t>();
  L.num_rows = B;
  L.num_queries = U;
  L.num_tokens = T;
  L.num_heads = q.size(1);
  L.head_dim = q.size(2);
  L.flags = flags;
  L.window = window > T ? T : window; // same key set; keeps t + window + 1 from overflowing
  return p;
}

unsigned int num_blocks(const Layout &L) {
  const int64_t warps = L.num_tokens * L.num_heads;
  const int64_t blocks = (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= static_cast<int64_t>(std::numeric_limits<int>::max()),
              "sparse_attention (CUDA): too many (token, head) rows: ", warps);
  return static_cast<unsigned int>(blocks);
}

// Calls f(std::integral_constant<int, ELEMS>) with ELEMS = ceil(D / 32) rounded up to 1, 2, 4 or 8.
template <typename F>
void dispatch_elems(int64_t head_dim, F &&f) {
  if (head_dim <= 32) {
    f(std::integral_constant<int, 1>{});
  } else if (head_dim <= 64) {
    f(std::integral_constant<int, 2>{});
  } else if (head_dim <= 128) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 8>{});
  }
}

// The current CUDA stream of q's device (what at::cuda::getCurrentCUDAStream() returns).
cudaStream_t current_stream(const at::Device &device) {
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device);
  return static_cast<cudaStream_t>(stream.native_handle());
}

} // namespace sparse_ce_cuda

std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd_cuda(
    const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &cu_queries,
    const at::Tensor &cu_docs, const at::Tensor &row_to_query, int64_t flags, int64_t window, double scale) {
  using namespace sparse_ce_cuda;
  const c10::DeviceGuard device_guard(q.device());
  const Prepared p = prepare(q, k, v, cu_queries, cu_docs, row_to_query, flags, window);
  const Layout &L = p.layout;

  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({L.num_tokens, L.num_heads}, q.options().dtype(at::kFloat));
  if (L.num_tokens == 0 || L.num_heads == 0) {
    return {out, lse};
  }
  const unsigned int blocks = num_blocks(L);
  cudaStream_t stream = current_stream(q.device());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sparse_attention_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_elems(L.head_dim, [&](auto elems) {
      constexpr int ELEMS = decltype(elems)::value;
      sparse_attention_fwd_kernel<ELEMS, scalar_t, acc_t><<<blocks, kThreadsPerBlock, 0, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
          lse.data_ptr<float>(), L, static_cast<acc_t>(scale));
      SPARSE_CE_CUDA_CHECK_LAUNCH();
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd_cuda(
    const at::Tensor &grad_out, const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &out,
    const at::Tensor &lse, const at::Tensor &cu_queries, const at::Tensor &cu_docs, const at::Tensor &row_to_query,
    int64_t flags, int64_t window, double scale) {
  using namespace sparse_ce_cuda;
  const c10::DeviceGuard device_guard(q.device());
  const Prepared p = prepare(q, k, v, cu_queries, cu_docs, row_to_query, flags, window);
  const Layout &L = p.layout;

  TORCH_CHECK(grad_out.is_cuda() && grad_out.device() == q.device(),
              "sparse_attention (CUDA): grad_out must be on q's device");
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && grad_out.sizes() == q.sizes(),
              "sparse_attention (CUDA): grad_out must match q in dtype and shape");
  check_qkv(out, "out", q);
  TORCH_CHECK(lse.is_cuda() && lse.device() == q.device(), "sparse_attention (CUDA): lse must be on q's device");
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "sparse_attention (CUDA): lse must be float32");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == L.num_tokens && lse.size(1) == L.num_heads,
              "sparse_attention (CUDA): lse must be [T, H], got ", lse.sizes());
  TORCH_CHECK(lse.is_contiguous(), "sparse_attention (CUDA): lse must be contiguous");
  // Autograd may hand over a non-contiguous gradient (e.g. from an expand); copy only then.
  const at::Tensor go = grad_out.contiguous();

  at::Tensor dq = at::empty_like(q);
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dk_acc = at::zeros(q.sizes(), q.options().dtype(acc_dtype));
  at::Tensor dv_acc = at::zeros(q.sizes(), q.options().dtype(acc_dtype));
  if (L.num_tokens == 0 || L.num_heads == 0) {
    return {dq, dk_acc.to(q.scalar_type()), dv_acc.to(q.scalar_type())};
  }
  const unsigned int blocks = num_blocks(L);
  cudaStream_t stream = current_stream(q.device());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sparse_attention_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_elems(L.head_dim, [&](auto elems) {
      constexpr int ELEMS = decltype(elems)::value;
      sparse_attention_bwd_kernel<ELEMS, scalar_t, acc_t><<<blocks, kThreadsPerBlock, 0, stream>>>(
          go.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
          out.data_ptr<scalar_t>(), lse.data_ptr<float>(), dq.data_ptr<scalar_t>(), dk_acc.data_ptr<acc_t>(),
          dv_acc.data_ptr<acc_t>(), L, static_cast<acc_t>(scale));
      SPARSE_CE_CUDA_CHECK_LAUNCH();
    });
  });
  // For float32 / float64 inputs .to() returns the accumulator itself (no copy).
  return {dq, dk_acc.to(q.scalar_type()), dv_acc.to(q.scalar_type())};
}
