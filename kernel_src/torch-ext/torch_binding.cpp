// Op registration for sparse_ce_kernels. kernel-builder provides registration.h (TORCH_LIBRARY_EXPAND,
// REGISTER_EXTENSION) and builds one variant per backend with CPU_KERNEL or CUDA_KERNEL defined; plain
// torch.utils.cpp_extension builds (kernel_src/build_local.py) define neither, always register the CPU
// implementation and add the CUDA one when compiled with -DSPARSE_CE_CUDA.
#include <Python.h>

#include <torch/library.h>

#if defined(CUDA_KERNEL) && !defined(SPARSE_CE_CUDA)
#define SPARSE_CE_CUDA
#endif
#if defined(CPU_KERNEL) || !defined(CUDA_KERNEL)
#define SPARSE_CE_CPU
#endif

#include "torch_binding.h"

#if __has_include("registration.h")
#include "registration.h"
#endif

#ifndef TORCH_LIBRARY_EXPAND
#define TORCH_LIBRARY_EXPAND(NAME, MODULE) TORCH_LIBRARY(NAME, MODULE)
#endif

#ifndef REGISTER_EXTENSION
#define SPARSE_CE_CONCAT_(A, B) A##B
#define SPARSE_CE_CONCAT(A, B) SPARSE_CE_CONCAT_(A, B)
#define SPARSE_CE_STRINGIFY_(A) #A
#define SPARSE_CE_STRINGIFY(A) SPARSE_CE_STRINGIFY_(A)
// An empty Python module, so that `from . import <extension>` loads the library and runs the registrations.
#define REGISTER_EXTENSION(NAME)                                                                          \
  PyMODINIT_FUNC SPARSE_CE_CONCAT(PyInit_, NAME)() {                                                      \
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, SPARSE_CE_STRINGIFY(NAME), nullptr, 0,     \
                                        nullptr};                                                         \
    return PyModule_Create(&module);                                                                      \
  }
#endif

TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, ops) {
  ops.def(
      "sparse_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_queries, Tensor cu_docs, Tensor row_to_query, "
      "int flags, int window, float scale, bool validate=True) -> (Tensor, Tensor)");
  ops.def(
      "sparse_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_queries, Tensor cu_docs, Tensor row_to_query, int flags, int window, float scale, "
      "bool validate=True) -> (Tensor, Tensor, Tensor)");
#ifdef SPARSE_CE_CPU
  ops.impl("sparse_attention_fwd", c10::kCPU, &sparse_attention_fwd_cpu);
  ops.impl("sparse_attention_bwd", c10::kCPU, &sparse_attention_bwd_cpu);
#endif
#ifdef SPARSE_CE_CUDA
  ops.impl("sparse_attention_fwd", c10::kCUDA, &sparse_attention_fwd_cuda);
  ops.impl("sparse_attention_bwd", c10::kCUDA, &sparse_attention_bwd_cuda);
#endif
}

REGISTER_EXTENSION(TORCH_EXTENSION_NAME)
