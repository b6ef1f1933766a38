// CPU matrix products through a BLAS found at run time, with a portable fallback.
//
// Why dlopen and not a link-time dependency: OpenBLAS picks its kernels in a library constructor from
// OPENBLAS_CORETYPE, and on some of our CPUs (an AVX-512 Xeon it does not know) its own detection
// falls back to SSE3 and runs 7x slower (research/deps.md: 37 vs 270 GFLOP/s at 1024³). Loading it
// ourselves lets us set the variable first, for every program and test, without wrappers. It also
// means the build needs no BLAS at all: on a machine without one (the bare GPU machines), the
// blocked fallback below keeps every CPU path working, only slower.
// KRAKEN_BLAS=/path/to/lib.so picks a library; KRAKEN_BLAS=builtin forces the fallback.
#include <dlfcn.h>
#include <omp.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "kernels/matmul.h"

namespace kraken::kernels {
namespace {

// The CBLAS enums by value, so no cblas.h is needed at build time.
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112;
using SgemmFn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float,
                         float*, int);
using SetThreadsFn = void (*)(int);
using CoreNameFn = char* (*)();

struct Blas {
  SgemmFn sgemm = nullptr;
  SetThreadsFn set_threads = nullptr;
  std::string name = "builtin";
};

Blas load_blas() {
  Blas blas;
  const char* forced = std::getenv("KRAKEN_BLAS");
  if (forced && std::strcmp(forced, "builtin") == 0) return blas;
  if (!std::getenv("OPENBLAS_CORETYPE")) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f"))
      setenv("OPENBLAS_CORETYPE", "SkylakeX", 0);
    else if (__builtin_cpu_supports("avx2"))
      setenv("OPENBLAS_CORETYPE", "Haswell", 0);
  }
  std::vector<std::string> candidates;
  if (forced) candidates.push_back(forced);
  // OpenBLAS built on OpenMP first: it shares the OpenMP thread pool of our own kernels. The pthreads
  // build keeps a second pool whose idle threads spin and yield against ours; on two cores that cost
  // 25-30% of a training step (measured: 1,150-1,200 vs 820-920 tokens/s on bench/configs/cpu_d1.toml).
  for (const char* lib : {"/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0", "libopenblas.so.0",
                          "libopenblas.so", "libblis.so.4", "libblis.so", "libmkl_rt.so"})
    candidates.push_back(lib);
  for (const std::string& lib : candidates) {
    void* handle = dlopen(lib.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle) continue;
    auto sgemm = reinterpret_cast<SgemmFn>(dlsym(handle, "cblas_sgemm"));
    if (!sgemm) continue;
    blas.sgemm = sgemm;
    blas.set_threads = reinterpret_cast<SetThreadsFn>(dlsym(handle, "openblas_set_num_threads"));
    if (!blas.set_threads) blas.set_threads = reinterpret_cast<SetThreadsFn>(dlsym(handle, "bli_thread_set_num_threads"));
    blas.name = lib;
    if (auto core = reinterpret_cast<CoreNameFn>(dlsym(handle, "openblas_get_corename")))
      blas.name += std::string(" (") + core() + ")";
    return blas;
  }
  if (forced) KRAKEN_THROW("KRAKEN_BLAS=", forced, ": could not load it or it has no cblas_sgemm");
  return blas;
}

const Blas& blas() {
  static const Blas instance = load_blas();
  return instance;
}

// Fallback: C = alpha op(A) op(B) + beta C. op(B) is packed to (K, N) so the inner loop runs along
// contiguous rows of B and C and vectorises; rows of C are split across threads.
void matmul_builtin(float* c, const float* a, const float* b, int64_t M, int64_t N, int64_t K, bool trans_a,
                    bool trans_b, float alpha, float beta) {
  std::vector<float> packed;
  const float* bk = b;
  if (trans_b) {
    packed.resize(static_cast<size_t>(K * N));
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) packed[k * N + n] = b[n * K + k];
    bk = packed.data();
  }
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    float* crow = c + m * N;
    if (beta == 0.0f)
      std::memset(crow, 0, sizeof(float) * N);
    else if (beta != 1.0f)
      for (int64_t n = 0; n < N; ++n) crow[n] *= beta;
    for (int64_t k = 0; k < K; ++k) {
      const float av = alpha * (trans_a ? a[k * M + m] : a[m * K + k]);
      const float* brow = bk + k * N;
      for (int64_t n = 0; n < N; ++n) crow[n] += av * brow[n];
    }
  }
}

void check_int_range(int64_t M, int64_t N, int64_t K) {
  constexpr int64_t kMax = 2147483647;
  if (M > kMax || N > kMax || K > kMax)
    KRAKEN_THROW("matmul: dimension too large for a 32-bit BLAS (M=", M, " N=", N, " K=", K, ")");
}

}  // namespace

const char* cpu_blas_name() { return blas().name.c_str(); }

void set_cpu_blas_threads(int n) {
  if (blas().set_threads) blas().set_threads(n);
}

void matmul_cpu(float* c, const float* a, const float* b, int64_t M, int64_t N, int64_t K, bool trans_a,
                bool trans_b, float alpha, float beta) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // BLAS implementations disagree on K = 0; define it: C = beta C.
    for (int64_t i = 0; i < M * N; ++i) c[i] = beta == 0.0f ? 0.0f : beta * c[i];
    return;
  }
  check_int_range(M, N, K);
  const Blas& lib = blas();
  if (!lib.sgemm) return matmul_builtin(c, a, b, M, N, K, trans_a, trans_b, alpha, beta);
  const int lda = static_cast<int>(trans_a ? M : K);
  const int ldb = static_cast<int>(trans_b ? K : N);
  lib.sgemm(kCblasRowMajor, trans_a ? kCblasTrans : kCblasNoTrans, trans_b ? kCblasTrans : kCblasNoTrans,
            static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), alpha, a, lda, b, ldb, beta, c,
            static_cast<int>(N));
}

void matmul_batched_cpu(float* c, const float* a, const float* b, int64_t batch, int64_t M, int64_t N,
                        int64_t K, bool trans_a, bool trans_b, float alpha, float beta, int64_t stride_c,
                        int64_t stride_a, int64_t stride_b) {
  for (int64_t i = 0; i < batch; ++i)
    matmul_cpu(c + i * stride_c, a + i * stride_a, b + i * stride_b, M, N, K, trans_a, trans_b, alpha, beta);
}

}  // namespace kraken::kernels
