// CUDA backend of the sparse cross-encoder attention (see ../torch-ext/torch_binding.h for the contract and
// NOTES.md in this folder for the design).
//
// One warp per (packed token, head). The head dimension is spread over the 32 lanes (element e = i * 32 + lane,
// i < ELEMS, so a warp reads a row of K or V as ELEMS coalesced 32-element chunks). Every row's keys are at most
// three contiguous ranges of packed tokens (see row_key_ranges), so the forward pass is one online softmax over
// those ranges with float accumulators, and the backward pass recomputes the
// probabilities from the saved log-sum-exp. Argument checks: ../torch-ext/sparse_attention_checks.h (shared with the
// CPU op); index tensors that live on the GPU are validated by validate_layout_kernel (no host sync).

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <cuda_runtime.h>

#ifndef SPARSE_CE_CUDA
#define SPARSE_CE_CUDA 1  // declares the CUDA entry points in torch_binding.h
#endif
#include "../torch-ext/torch_binding.h"  // the contract (and its checks): the two entry points defined below

// Deliberately no c10/cuda or ATen/cuda headers: the CPU torch wheel ships them without the generated
// c10/cuda/impl/cuda_cmake_macros.h (and ATen/cuda/CUDAContext.h needs cuBLAS headers), which would make the
// compile-only CI check impossible. The device guard and the current stream come through c10's device-generic
// interfaces instead (the CUDA implementation is registered by libc10_cuda at runtime), and launches are checked
// with cudaGetLastError.
#define SPARSE_CE_CUDA_CHECK_LAUNCH()                                                                              \
  do {                                                                                                             \
    const cudaError_t sparse_ce_err = cudaGetLastError();                                                          \
    TORCH_CHECK(sparse_ce_err == cudaSuccess, "sparse_attention (cuda): kernel launch failed: ",                   \
                cudaGetErrorString(sparse_ce_err));                                                                \
  } while (0)

namespace sparse_ce_cuda {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreadsPerBlock = kWarpSize * kWarpsPerBlock;
constexpr int kValidateThreads = 256;
using sparse_ce::kClsDoc, sparse_ce::kClsQuery, sparse_ce::kDocCls, sparse_ce::kDocQuery, sparse_ce::kQueryCls,
    sparse_ce::kQueryDoc;

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

// Largest i in [0, n - 1] with cu[i] <= t (cu is non-decreasing, n >= 1); the segment that owns token t even when
// empty segments share its start offset. Never n itself, so cu[i + 1] is in bounds whatever the values (0 when
// t < cu[0], n - 1 when t >= cu[n]: an inconsistent input gets in-bounds ranges, which are clamped to [0, T)).
__device__ __forceinline__ int64_t owner(const int64_t *__restrict__ cu, int64_t n, int64_t t) {
  int64_t lo = 0, hi = n - 1;
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

// Tokens of query u; empty for an out-of-range u (never read out of bounds, even before validation fails).
__device__ __forceinline__ Range query_range(const int64_t *__restrict__ cu_queries, int64_t num_queries, int64_t u) {
  if (u < 0 || u >= num_queries) {
    return Range{0, 0};
  }
  return Range{__ldg(cu_queries + u), __ldg(cu_queries + u + 1)};
}

__device__ __forceinline__ Range clamp_range(int64_t begin, int64_t end, int64_t num_tokens) {
  // Validation runs before the kernels (host or validate_layout_kernel); clamping is the second line of defence:
  // whatever the index values, no key range reads or writes outside [0, T).
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
    const bool own_row = u < L.num_rows;
    r[0] = Range{__ldg(L.cu_queries + u), __ldg(L.cu_queries + u + 1)};
    r[1] = (L.flags & kQueryCls) && own_row ? Range{u, u + 1} : empty;
    r[2] = (L.flags & kQueryDoc) && own_row ? Range{__ldg(L.cu_docs + u), __ldg(L.cu_docs + u + 1)} : empty;
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

// Exact expf / logf (no --use_fast_math, see NOTES.md).
__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }

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
      // While every score so far is -inf, subtract 0: p = exp(-inf) = 0 instead of exp(-inf - (-inf)) = NaN.
      const acc_t m_ref = m_new == static_cast<acc_t>(-INFINITY) ? acc_t(0) : m_new;
      const acc_t correction = acc_exp(m - m_ref); // exp(-inf) = 0 on the first key
      const acc_t p = acc_exp(s - m_ref);
      l = l * correction + p;
#pragma unroll
      for (int i = 0; i < ELEMS; ++i) {
        acc[i] = acc[i] * correction + p * vj[i];
      }
      m = m_new;
    }
  }

  // No key of finite score (or, on inconsistent input, no key): zero output and lse = +inf, as on the CPU.
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
      const acc_t p = acc_exp(s - lse_i);
      if (p == acc_t(0)) {
        continue; // adds nothing (and no 0 * inf from a -inf key); s, hence p, is the same in every lane
      }
      const acc_t dp = warp_sum(lane_dot<ELEMS>(doi, vj));
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

// Validates device-resident index tensors with the CPU op's checks (sparse_ce::check_layout_element): one block,
// threads striding over the elements. On an error it prints the CPU op's message and asserts, which fails the
// launch ("device-side assert triggered" at the next sync) before the attention kernels run (same stream). No
// device-to-host copy, so no sync per call and CUDA-graph capture works; an assert leaves the CUDA context unusable,
// as PyTorch's own device-side index checks do.
__global__ void __launch_bounds__(kValidateThreads) validate_layout_kernel(const sparse_ce::LayoutView L) {
  const int64_t n = L.U > L.B ? L.U : L.B;
  for (int64_t i = threadIdx.x; i < n; i += kValidateThreads) {
    const sparse_ce::LayoutError e = sparse_ce::check_layout_element(L, i);
    if (e.code != sparse_ce::kLayoutOk) {
      printf(sparse_ce::layout_error_format(e.code), static_cast<long long>(e.index), static_cast<long long>(e.got),
             static_cast<long long>(e.expected));
      CUDA_KERNEL_ASSERT_MSG(false, "sparse_attention: inconsistent index tensors (see the message above)");
    }
  }
}

// ----------------------------------------------------------------------------------------------------------------
// Host side

// The current CUDA stream of q's device (what at::cuda::getCurrentCUDAStream() returns).
cudaStream_t current_stream(const at::Device &device) {
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device);
  return static_cast<cudaStream_t>(stream.native_handle());
}

struct Prepared {
  Layout layout;
  sparse_ce::Sizes sizes;
  at::Tensor cu_queries, cu_docs, row_to_query; // on q's device; keep the copies alive
};

// CPU-resident index tensors are copied to the device on every call, which a CUDA graph cannot capture: refuse
// with the fix instead of the driver's generic "operation not permitted when stream is capturing".
void check_not_capturing(const at::Tensor &q, const at::Tensor &cu_queries, const at::Tensor &cu_docs,
                         const at::Tensor &row_to_query) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(current_stream(q.device()), &capture);
  TORCH_CHECK(err == cudaSuccess, "sparse_attention (cuda): cudaStreamIsCapturing failed: ", cudaGetErrorString(err));
  TORCH_CHECK(capture == cudaStreamCaptureStatusNone,
              "sparse_attention (cuda): CUDA-graph capture needs cu_queries, cu_docs and row_to_query on the GPU "
              "(a captured graph cannot copy host tensors to the device); move them to ", q.device(),
              " before capturing (got ", cu_queries.device(), ", ", cu_docs.device(), ", ", row_to_query.device(),
              ")");
}

// The backward's dk/dv are float32 atomicAdds, whose order (hence rounding) varies from run to run.
void check_deterministic() {
  at::Context &context = at::globalContext();
  if (!context.deterministicAlgorithms()) {
    return;
  }
  constexpr const char *message =
      "sparse_attention_bwd (cuda): the backward accumulates dk and dv with float32 atomicAdd, which is not "
      "deterministic, and torch.use_deterministic_algorithms(True) is set; use attention_backend='windowed' "
      "(deterministic) for this model, or run the op on the CPU (no atomics)";
  if (context.deterministicAlgorithmsWarnOnly()) {
    TORCH_WARN(message);
  } else {
    TORCH_CHECK(false, message);
  }
}

// The shared checks (sparse_attention_checks.h), then the index tensors on q's device. Their values are checked on
// the host when all three live there (before the copy), otherwise by validate_layout_kernel on q's stream, unless
// the caller vouches for them (validate = false: the model, whose layouts are built and checked on the host).
Prepared prepare(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &cu_queries,
                 const at::Tensor &cu_docs, const at::Tensor &row_to_query, int64_t flags, int64_t window,
                 bool validate) {
  Prepared p;
  const sparse_ce::Sizes s = sparse_ce::check_forward_args(sparse_ce::Backend::CUDA, q, k, v, cu_queries, cu_docs,
                                                           row_to_query, flags, window);
  p.sizes = s;
  if (cu_queries.is_cpu() || cu_docs.is_cpu() || row_to_query.is_cpu()) {
    check_not_capturing(q, cu_queries, cu_docs, row_to_query);
  }
  const bool on_host = cu_queries.is_cpu() && cu_docs.is_cpu() && row_to_query.is_cpu();
  if (on_host) {
    sparse_ce::check_layout_values({cu_queries.data_ptr<int64_t>(), cu_docs.data_ptr<int64_t>(),
                                    row_to_query.data_ptr<int64_t>(), s.U, s.B, s.T, flags});
  }
  p.cu_queries = cu_queries.to(q.device(), /*non_blocking=*/true);
  p.cu_docs = cu_docs.to(q.device(), /*non_blocking=*/true);
  p.row_to_query = row_to_query.to(q.device(), /*non_blocking=*/true);
  Layout &L = p.layout;
  L.cu_queries = p.cu_queries.data_ptr<int64_t>();
  L.cu_docs = p.cu_docs.data_ptr<int64_t>();
  L.row_to_query = p.row_to_query.data_ptr<int64_t>();
  L.num_rows = s.B;
  L.num_queries = s.U;
  L.num_tokens = s.T;
  L.num_heads = s.H;
  L.head_dim = s.D;
  L.flags = flags;
  L.window = s.window; // clamped to T by the shared checks: no t + window + 1 overflow
  if (!on_host && validate) {
    const sparse_ce::LayoutView view{L.cu_queries, L.cu_docs, L.row_to_query, s.U, s.B, s.T, flags};
    validate_layout_kernel<<<1, kValidateThreads, 0, current_stream(q.device())>>>(view);
    SPARSE_CE_CUDA_CHECK_LAUNCH();
  }
  return p;
}

unsigned int num_blocks(const Layout &L) {
  const int64_t warps = L.num_tokens * L.num_heads;
  const int64_t blocks = (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= static_cast<int64_t>(std::numeric_limits<int>::max()),
              "sparse_attention (cuda): too many (token, head) rows: ", warps);
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

} // namespace sparse_ce_cuda

std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd_cuda(
    const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &cu_queries,
    const at::Tensor &cu_docs, const at::Tensor &row_to_query, int64_t flags, int64_t window, double scale,
    bool validate) {
  using namespace sparse_ce_cuda;
  const c10::DeviceGuard device_guard(q.device());
  const Prepared p = prepare(q, k, v, cu_queries, cu_docs, row_to_query, flags, window, validate);
  const Layout &L = p.layout;

  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({L.num_tokens, L.num_heads}, q.options().dtype(at::kFloat));
  if (L.num_tokens == 0 || L.num_heads == 0) {
    return {out, lse};
  }
  const unsigned int blocks = num_blocks(L);
  cudaStream_t stream = current_stream(q.device());

  SPARSE_CE_DISPATCH(q.scalar_type(), "sparse_attention_fwd_cuda", [&] {
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
    int64_t flags, int64_t window, double scale, bool validate) {
  using namespace sparse_ce_cuda;
  check_deterministic();
  const c10::DeviceGuard device_guard(q.device());
  const Prepared p = prepare(q, k, v, cu_queries, cu_docs, row_to_query, flags, window, validate);
  const Layout &L = p.layout;

  sparse_ce::check_backward_args(sparse_ce::Backend::CUDA, grad_out, out, lse, q, p.sizes);

  at::Tensor dq = at::empty_like(q);
  at::Tensor dk_acc = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  at::Tensor dv_acc = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  if (L.num_tokens == 0 || L.num_heads == 0) {
    return {dq, dk_acc.to(q.scalar_type()), dv_acc.to(q.scalar_type())};
  }
  const unsigned int blocks = num_blocks(L);
  cudaStream_t stream = current_stream(q.device());

  SPARSE_CE_DISPATCH(q.scalar_type(), "sparse_attention_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_elems(L.head_dim, [&](auto elems) {
      constexpr int ELEMS = decltype(elems)::value;
      sparse_attention_bwd_kernel<ELEMS, scalar_t, acc_t><<<blocks, kThreadsPerBlock, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
          out.data_ptr<scalar_t>(), lse.data_ptr<float>(), dq.data_ptr<scalar_t>(), dk_acc.data_ptr<acc_t>(),
          dv_acc.data_ptr<acc_t>(), L, static_cast<acc_t>(scale));
      SPARSE_CE_CUDA_CHECK_LAUNCH();
    });
  });
  // For float32 inputs .to() returns the accumulator itself (no copy).
  return {dq, dk_acc.to(q.scalar_type()), dv_acc.to(q.scalar_type())};
}
