// Every CUDA, cuBLAS and cuDNN call goes through a check that names the file and line (llm.c's cudaCheck).
#pragma once

#include <cstdlib>

#include <cublas_v2.h>
#include <cuda_runtime.h>

// cuDNN where the build found it (kernels/CMakeLists.txt defines KRAKEN_WITH_CUDNN=1 then).
#if defined(KRAKEN_WITH_CUDNN) && KRAKEN_WITH_CUDNN
#include <cudnn.h>
#endif

#include "kernels/error.h"

namespace kraken::kernels::cuda_detail {

inline void cuda_check(cudaError_t err, const char* file, int line) {
  if (err != cudaSuccess)
    throw ::kraken::Error(::kraken::detail::error_message("CUDA error at ", file, ":", line, ": ",
                                                           cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
}

inline void cublas_check(cublasStatus_t status, const char* file, int line) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw ::kraken::Error(::kraken::detail::error_message("cuBLAS error at ", file, ":", line, ": status ",
                                                           static_cast<int>(status)));
}

#if defined(KRAKEN_WITH_CUDNN) && KRAKEN_WITH_CUDNN
// Names the call, cuDNN's status string and the library's own last message (cudnnGetLastErrorString: for
// the backend API that is usually the attribute or the descriptor it refused, and why).
inline void cudnn_check(cudnnStatus_t status, const char* call, const char* file, int line) {
  if (status != CUDNN_STATUS_SUCCESS) {
    char last[512] = {0};
    cudnnGetLastErrorString(last, sizeof(last));
    throw ::kraken::Error(::kraken::detail::error_message("cuDNN error at ", file, ":", line, ": ", call, " returned ",
                                                           cudnnGetErrorString(status), " (", static_cast<int>(status),
                                                           ")", last[0] ? ": " : "", last));
  }
}
#endif

// A measurement mode's count from the environment (KRAKEN_CUBLASLT_TUNE, KRAKEN_CUDNN_ATTENTION_TUNE):
// unset, empty, 0 or 1 give 1 (the mode off), 2 to `most` themselves; anything else is an error that
// names the variable and what it counts.
inline int tune_count_from_env(const char* name, int most, const char* what) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return 1;
  char* end = nullptr;
  const long parsed = std::strtol(v, &end, 10);
  if (*end != '\0' || parsed < 0 || parsed > most)
    KRAKEN_THROW(name, "=", v, ": expected how many of ", what, " to time, 2 to ", most, " (0 or 1: none)");
  return parsed < 1 ? 1 : static_cast<int>(parsed);
}

// Grid size for a grid-stride loop over n elements.
inline unsigned int blocks_for(long long n, int threads) {
  long long blocks = (n + threads - 1) / threads;
  if (blocks > 65535LL * 32) blocks = 65535LL * 32;
  return static_cast<unsigned int>(blocks < 1 ? 1 : blocks);
}

}  // namespace kraken::kernels::cuda_detail

#define KRAKEN_CUDA_CHECK(expr) ::kraken::kernels::cuda_detail::cuda_check((expr), __FILE__, __LINE__)
#define KRAKEN_CUBLAS_CHECK(expr) ::kraken::kernels::cuda_detail::cublas_check((expr), __FILE__, __LINE__)
#define KRAKEN_CUDNN_CHECK(expr) ::kraken::kernels::cuda_detail::cudnn_check((expr), #expr, __FILE__, __LINE__)
// After a kernel launch: catches bad launch configurations at the launch site.
#define KRAKEN_CUDA_LAUNCH_CHECK() KRAKEN_CUDA_CHECK(cudaGetLastError())
