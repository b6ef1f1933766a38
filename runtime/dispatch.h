// Choosing the kernel for a tensor's device. Ops write
//   KRAKEN_ON_DEVICE(x.device(), kernels::gelu_forward_cpu(...), kernels::gelu_forward_cuda(..., stream_of(x)));
// In a build without CUDA the CUDA expression is not compiled, and a CUDA tensor (which cannot exist
// there anyway) would get a clear error.
#pragma once

#include "kernels/error.h"
#include "runtime/tensor.h"

namespace kraken::runtime {

inline CUstream_st* stream_of(const Tensor& t) { return compute_stream(t.device()); }

namespace detail {
[[noreturn]] inline void no_cuda_kernel(const Device& device, const char* what) {
  KRAKEN_THROW(what, " on ", device.str(), ": this build has no CUDA kernels");
}
}  // namespace detail

}  // namespace kraken::runtime

#if KRAKEN_WITH_CUDA
#define KRAKEN_ON_DEVICE(device, cpu_expr, cuda_expr) \
  do {                                                \
    if ((device).is_cpu()) {                          \
      cpu_expr;                                       \
    } else {                                          \
      cuda_expr;                                      \
    }                                                 \
  } while (0)
#else
#define KRAKEN_ON_DEVICE(device, cpu_expr, cuda_expr)                                 \
  do {                                                                                \
    if ((device).is_cpu()) {                                                          \
      cpu_expr;                                                                       \
    } else {                                                                          \
      ::kraken::runtime::detail::no_cuda_kernel((device), __func__);                  \
    }                                                                                 \
  } while (0)
#endif

// A kernel that exists only on CUDA (the bf16 ones: the CPU widens instead, runtime/ops/precision.h).
#if KRAKEN_WITH_CUDA
#define KRAKEN_CUDA_ONLY(device, cuda_expr) \
  do {                                      \
    cuda_expr;                              \
  } while (0)
#else
// The expression is named unevaluated (sizeof) so that its operands count as used, and nothing links.
#define KRAKEN_CUDA_ONLY(device, cuda_expr)                        \
  do {                                                             \
    (void)sizeof(((cuda_expr), 0));                                \
    ::kraken::runtime::detail::no_cuda_kernel((device), __func__); \
  } while (0)
#endif
