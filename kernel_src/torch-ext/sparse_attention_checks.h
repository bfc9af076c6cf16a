// The contract's argument checks, one copy for both backends (included by torch_binding.h): the CPU op
// (cpu/sparse_attention_cpu.cpp) and the CUDA op (cuda/sparse_attention.cu) accept the same inputs and fail with
// the same messages. Only the device checks name the backend ("sparse_attention (cpu)" / "(cuda)").
//
// Tensor checks (dtype, shape, device, sizes) run on the host. The value checks of the index tensors
// (check_layout_element) are __host__ __device__: the CPU op, and the CUDA op with CPU-resident index tensors, run
// them on the host (check_layout_values, a TORCH_CHECK); the CUDA op with device-resident index tensors runs the
// same function in one small kernel (no device-to-host sync) that prints the same message and asserts.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#ifdef __CUDACC__
#define SPARSE_CE_HOST_DEVICE __host__ __device__
#else
#define SPARSE_CE_HOST_DEVICE
#endif

// The contract's dtypes: float32, float16, bfloat16 (float64 is rejected by both backends).
#define SPARSE_CE_DISPATCH(TYPE, NAME, ...)                                                                 \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                                  \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                               \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace sparse_ce {

// Direction bits, as DIRECTION_FLAGS in the Python package.
constexpr int64_t kClsQuery = 1, kClsDoc = 2, kQueryCls = 4, kQueryDoc = 8, kDocCls = 16, kDocQuery = 32;
constexpr int64_t kMaxHeadDim = 256;

enum class Backend { CPU, CUDA };

inline const char *backend_name(Backend backend) { return backend == Backend::CPU ? "cpu" : "cuda"; }

inline void check_device(Backend backend, const at::Tensor &x, const char *name) {
  if (backend == Backend::CPU) {
    TORCH_CHECK(x.device().is_cpu(), "sparse_attention (cpu): ", name, " must be on the CPU, got ", x.device());
  } else {
    TORCH_CHECK(x.is_cuda(), "sparse_attention (cuda): ", name, " must be a CUDA tensor, got ", x.device());
  }
}

// q, k, v, out, grad_out: [tokens, heads, head_dim], one float dtype, q's shape, contiguous, on the backend's device.
inline void check_qkv(Backend backend, const at::Tensor &x, const at::Tensor &q, const char *name) {
  check_device(backend, x, name);
  TORCH_CHECK(x.device() == q.device(), "sparse_attention (", backend_name(backend), "): ", name,
              " must be on q's device ", q.device(), ", got ", x.device());
  TORCH_CHECK(x.dim() == 3, "sparse_attention: ", name, " must be [tokens, heads, head_dim], got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "sparse_attention: ", name, " must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.scalar_type() == q.scalar_type(), "sparse_attention: ", name, " has dtype ", x.scalar_type(),
              " but q has ", q.scalar_type());
  TORCH_CHECK(x.sizes() == q.sizes(), "sparse_attention: ", name, " has shape ", x.sizes(), " but q has ", q.sizes());
  TORCH_CHECK(x.is_contiguous(), "sparse_attention: ", name, " must be contiguous");
}

// Index tensors: int64, 1-D, contiguous; on the CPU (CPU op), or on the CPU or q's device (CUDA op).
inline void check_index_tensor(Backend backend, const at::Tensor &x, const at::Tensor &q, const char *name) {
  if (backend == Backend::CPU) {
    check_device(backend, x, name);
  } else {
    TORCH_CHECK(x.device().is_cpu() || x.device() == q.device(), "sparse_attention (cuda): ", name,
                " must be on the CPU or on q's device ", q.device(), ", got ", x.device());
  }
  TORCH_CHECK(x.scalar_type() == at::kLong, "sparse_attention: ", name, " must be int64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 1, "sparse_attention: ", name, " must be 1-D, got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "sparse_attention: ", name, " must be contiguous");
}

struct Sizes {
  int64_t T, H, D, U, B;
  // The window both ops use: -1, or min(window, T). A window >= T keeps every token of its document (as -1 does),
  // and clamping keeps t + window + 1 from overflowing int64 for windows near INT64_MAX.
  int64_t window = -1;
};

// Every check of the forward arguments that needs no index values; returns the sizes.
inline Sizes check_forward_args(Backend backend, const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                                const at::Tensor &cu_queries, const at::Tensor &cu_docs,
                                const at::Tensor &row_to_query, int64_t flags, int64_t window) {
  check_qkv(backend, q, q, "q");
  check_qkv(backend, k, q, "k");
  check_qkv(backend, v, q, "v");
  TORCH_CHECK(q.size(2) >= 1 && q.size(2) <= kMaxHeadDim, "sparse_attention: head_dim must be in [1, ", kMaxHeadDim,
              "], got ", q.size(2));
  check_index_tensor(backend, cu_queries, q, "cu_queries");
  check_index_tensor(backend, cu_docs, q, "cu_docs");
  check_index_tensor(backend, row_to_query, q, "row_to_query");
  TORCH_CHECK(flags >= 0 && flags < 64, "sparse_attention: flags must be a 6-bit mask in [0, 63], got ", flags);
  TORCH_CHECK(window >= -1, "sparse_attention: window must be >= 0, or -1 for unlimited, got ", window);
  TORCH_CHECK(cu_queries.numel() >= 2, "sparse_attention: cu_queries needs at least 2 entries (U >= 1)");
  TORCH_CHECK(cu_docs.numel() >= 2, "sparse_attention: cu_docs needs at least 2 entries (B >= 1)");
  const int64_t T = q.size(0);
  const Sizes s{T, q.size(1), q.size(2), cu_queries.numel() - 1, cu_docs.numel() - 1, window > T ? T : window};
  TORCH_CHECK(row_to_query.numel() == s.B, "sparse_attention: row_to_query has ", row_to_query.numel(),
              " entries but cu_docs describes ", s.B, " documents");
  TORCH_CHECK(!(flags & (kQueryCls | kQueryDoc)) || s.U == s.B,
              "sparse_attention: query_cls / query_doc attention make the query depend on its row, so queries cannot "
              "be shared (got ", s.U, " queries for ", s.B, " rows)");
  return s;
}

// The backward's extra arguments: grad_out and out like q, lse float32 [T, H] contiguous on q's device.
inline void check_backward_args(Backend backend, const at::Tensor &grad_out, const at::Tensor &out,
                                const at::Tensor &lse, const at::Tensor &q, const Sizes &s) {
  check_qkv(backend, grad_out, q, "grad_out");
  check_qkv(backend, out, q, "out");
  check_device(backend, lse, "lse");
  TORCH_CHECK(lse.device() == q.device(), "sparse_attention (", backend_name(backend), "): lse must be on q's device ",
              q.device(), ", got ", lse.device());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "sparse_attention: lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == s.T && lse.size(1) == s.H, "sparse_attention: lse must be [", s.T,
              ", ", s.H, "], got ", lse.sizes());
  TORCH_CHECK(lse.is_contiguous(), "sparse_attention: lse must be contiguous");
}

// --- values of the index tensors (host or device) -------------------------------------------------------------------

struct LayoutView {
  const int64_t *cu_queries;   // [U + 1]
  const int64_t *cu_docs;      // [B + 1]
  const int64_t *row_to_query; // [B]
  int64_t U, B, T, flags;
};

enum LayoutErrorCode : int {
  kLayoutOk = 0,
  kQueryStart,
  kDocStart,
  kDocEnd,
  kQueryOrder,
  kDocOrder,
  kRowQueryRange,
  kRowQueryShared
};

struct LayoutError {
  int code;
  int64_t index, got, expected;
};

// printf formats of the errors, consuming (index, got, expected) in that order; one line each.
SPARSE_CE_HOST_DEVICE inline const char *layout_error_format(int code) {
  switch (code) {
    case kQueryStart:
      return "sparse_attention: cu_queries[%lld] = %lld must equal the batch size %lld (one [CLS] per row)\n";
    case kDocStart:
      return "sparse_attention: cu_docs[%lld] = %lld must equal cu_queries[U] = %lld\n";
    case kDocEnd:
      return "sparse_attention: cu_docs[B] = cu_docs[%lld] = %lld must equal the token count %lld\n";
    case kQueryOrder:
      return "sparse_attention: cu_queries must be non-decreasing (at %lld: %lld after %lld)\n";
    case kDocOrder:
      return "sparse_attention: cu_docs must be non-decreasing (at %lld: %lld after %lld)\n";
    case kRowQueryRange:
      return "sparse_attention: row_to_query[%lld] = %lld is out of range [0, %lld)\n";
    case kRowQueryShared:
      return "sparse_attention: query_cls / query_doc attention need row_to_query[b] == b (no shared queries), got "
             "row_to_query[%lld] = %lld, expected %lld\n";
    default:
      return "sparse_attention: index tensors ok (%lld %lld %lld)\n";
  }
}

// The checks that involve element i of the index tensors, i in [0, max(U, B)); element 0 also checks the ends.
// All reads are within [0, U], [0, B] and [0, B) for any values.
SPARSE_CE_HOST_DEVICE inline LayoutError check_layout_element(const LayoutView &L, int64_t i) {
  if (i == 0) {
    if (L.cu_queries[0] != L.B) return {kQueryStart, 0, L.cu_queries[0], L.B};
    if (L.cu_docs[0] != L.cu_queries[L.U]) return {kDocStart, 0, L.cu_docs[0], L.cu_queries[L.U]};
    if (L.cu_docs[L.B] != L.T) return {kDocEnd, L.B, L.cu_docs[L.B], L.T};
  }
  if (i < L.U && L.cu_queries[i + 1] < L.cu_queries[i]) {
    return {kQueryOrder, i + 1, L.cu_queries[i + 1], L.cu_queries[i]};
  }
  if (i < L.B) {
    if (L.cu_docs[i + 1] < L.cu_docs[i]) return {kDocOrder, i + 1, L.cu_docs[i + 1], L.cu_docs[i]};
    const int64_t u = L.row_to_query[i];
    if (u < 0 || u >= L.U) return {kRowQueryRange, i, u, L.U};
    if ((L.flags & (kQueryCls | kQueryDoc)) && u != i) return {kRowQueryShared, i, u, i};
  }
  return {kLayoutOk, 0, 0, 0};
}

// Host check of index tensors that live in host memory: raises the first error as a c10::Error.
inline void check_layout_values(const LayoutView &L) {
  const int64_t n = L.U > L.B ? L.U : L.B;
  for (int64_t i = 0; i < n; ++i) {
    const LayoutError e = check_layout_element(L, i);
    if (e.code != kLayoutOk) {
      char message[256];
      std::snprintf(message, sizeof(message), layout_error_format(e.code), static_cast<long long>(e.index),
                    static_cast<long long>(e.got), static_cast<long long>(e.expected));
      message[std::strcspn(message, "\n")] = '\0';
      TORCH_CHECK(false, message);
    }
  }
}

}  // namespace sparse_ce
