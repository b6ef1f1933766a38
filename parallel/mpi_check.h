// Every MPI and NCCL call goes through a check that names the file and line (llm.c's mpiCheck).
//
// Internal to parallel/: only .cpp files include it, so <mpi.h> and <nccl.h> never leak into the
// headers the models and the trainer include. Communicators use MPI_ERRORS_RETURN, so a failing call
// comes back here and becomes a kraken::Error instead of killing the job without saying where.
#pragma once

#include "kernels/error.h"

#if KRAKEN_WITH_MPI
#include <mpi.h>

namespace kraken::parallel::detail {
inline void mpi_check(int code, const char* call, const char* file, int line) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {0};
  int length = 0;
  MPI_Error_string(code, text, &length);
  throw ::kraken::Error(::kraken::detail::error_message("MPI error at ", file, ":", line, ": ", call, " returned ",
                                                         code, " (", text, ")"));
}
}  // namespace kraken::parallel::detail

#define KRAKEN_MPI_CHECK(call) ::kraken::parallel::detail::mpi_check((call), #call, __FILE__, __LINE__)
#endif

#if KRAKEN_WITH_NCCL
#include <cuda_runtime.h>
#include <nccl.h>

namespace kraken::parallel::detail {
inline void nccl_check(ncclResult_t result, const char* call, const char* file, int line) {
  if (result == ncclSuccess || result == ncclInProgress) return;
  throw ::kraken::Error(::kraken::detail::error_message("NCCL error at ", file, ":", line, ": ", call, " returned ",
                                                         static_cast<int>(result), " (", ncclGetErrorString(result),
                                                         ")"));
}
inline void cuda_check(cudaError_t err, const char* call, const char* file, int line) {
  if (err == cudaSuccess) return;
  throw ::kraken::Error(::kraken::detail::error_message("CUDA error at ", file, ":", line, ": ", call, ": ",
                                                         cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
}
}  // namespace kraken::parallel::detail

#define KRAKEN_NCCL_CHECK(call) ::kraken::parallel::detail::nccl_check((call), #call, __FILE__, __LINE__)
#define KRAKEN_PAR_CUDA_CHECK(call) ::kraken::parallel::detail::cuda_check((call), #call, __FILE__, __LINE__)
#endif
