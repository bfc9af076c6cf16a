// Sparse cross-encoder attention (Schlatt et al., ECIR 2024, Eqs. 1-3) on packed, ragged inputs.
//
// Packed token order: [CLS] of every row (B) | tokens of each unique query (U queries, its [SEP] included) |
// tokens of each document (B documents, the final [SEP] included).
//
//   q, k, v       [T, H, D], contiguous, one dtype (float32, float16 or bfloat16), 1 <= D <= 256; T = cu_docs[B]
//   cu_queries    int64 [U + 1], U >= 1: cu_queries[0] = B, query u owns packed tokens [cu_queries[u], cu_queries[u+1])
//   cu_docs       int64 [B + 1], B >= 1: cu_docs[0] = cu_queries[U], document b owns [cu_docs[b], cu_docs[b+1])
//   row_to_query  int64 [B]: the query of row b (rows may share a query)
//   flags         bitmask of the six directions, bit i = DIRECTION_FLAGS[i]:
//                 1 cls_query, 2 cls_doc, 4 query_cls, 8 query_doc, 16 doc_cls, 32 doc_query
//   window        one-sided document window w >= 0, or -1 for unlimited
//   scale         score scale (1 / sqrt(D))
//   validate      true (the default): check the index tensors' values. false: the caller vouches for them (the
//                 model builds its layouts itself, with host syncs of its own); only the CUDA op's device-side
//                 validation kernel is skipped, host-resident values are always checked (an O(B) loop)
//
// Keys of each row (attention within a segment is always on):
//   [CLS] of row b:      itself; query row_to_query[b] if cls_query; document b if cls_doc
//   token of query u:    query u; [CLS] of row u if query_cls; document u if query_doc
//                        (query_cls / query_doc require U == B and row_to_query[b] == b: no sharing)
//   token p of doc b:    [CLS] b if doc_cls; query row_to_query[b] if doc_query; tokens j of doc b with |p - j| <= w
// One softmax over the union of a row's keys.
//
// Forward returns out [T, H, D] (input dtype) and lse [T, H] (float32, natural log of the softmax denominator
// of the scaled scores, saved for backward). A row none of whose keys has a finite score gets a zero output and
// lse = +inf, and adds nothing to any gradient: no NaN. Backward recomputes probabilities from lse and returns dq,
// dk, dv (input dtype; accumulation in float32). Gradients of shared query keys/values are summed over all rows.
//
// A window >= T equals -1 (both ops clamp it to T). The CUDA backward accumulates dk/dv with float32 atomics and
// refuses to run under torch.use_deterministic_algorithms(True) (a warning under warn_only); the CPU op is
// deterministic. During CUDA-graph capture the CUDA op needs its index tensors on the GPU (no host copies).
//
// Both backends reject, with the same messages (sparse_attention_checks.h): other dtypes (float64 included),
// shapes or strides, head_dim outside [1, 256], U = 0 or B = 0, inconsistent index tensors (checked on the host,
// or by the CUDA op in a small device kernel when they live on the GPU), a shared query with query_cls /
// query_doc attention. Index tensors live on the CPU (CPU op), or on the CPU or q's device (CUDA op).
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>  // not <torch/torch.h>: nvcc compiles this header too

#include "sparse_attention_checks.h"

std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd_cpu(
    const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &cu_queries,
    const at::Tensor &cu_docs, const at::Tensor &row_to_query, int64_t flags, int64_t window, double scale, bool validate);

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd_cpu(
    const at::Tensor &grad_out, const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &out,
    const at::Tensor &lse, const at::Tensor &cu_queries, const at::Tensor &cu_docs, const at::Tensor &row_to_query,
    int64_t flags, int64_t window, double scale, bool validate);

#ifdef SPARSE_CE_CUDA
std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd_cuda(
    const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &cu_queries,
    const at::Tensor &cu_docs, const at::Tensor &row_to_query, int64_t flags, int64_t window, double scale, bool validate);

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd_cuda(
    const at::Tensor &grad_out, const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &out,
    const at::Tensor &lse, const at::Tensor &cu_queries, const at::Tensor &cu_docs, const at::Tensor &row_to_query,
    int64_t flags, int64_t window, double scale, bool validate);
#endif
