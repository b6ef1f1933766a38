// Philox-based fills and dropout on the GPU: the same element-i formulas as kernels/cpu/random.cpp.
// Uniform fills and dropout (mask and output) are bit-identical to the CPU's. Normal fills agree to a
// few ulps only: Box–Muller's logf and cosf are CUDA's (1–2 ulp) here and glibc's there, so a model
// initialised on the GPU starts within rounding of, not bit-equal to, the same model on the CPU.
// Dropout is a template on the storage type (kernels/cuda/storage.h): the bf16 kernels draw the same
// mask and compute in f32, rounding each output once.
#include "kernels/cuda/check.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/storage.h"
#include "kernels/philox.h"
#include "kernels/random.h"

namespace kraken::kernels {
namespace {
using cuda_detail::as_bf16;
using cuda_detail::blocks_for;
using cuda_detail::load;
using cuda_detail::store;
constexpr int kThreads = 256;
constexpr float kTwoPi = 6.283185307179586f;

__global__ void uniform_kernel(float* out, int64_t n, float low, float high, uint64_t seed, uint64_t stream,
                               uint64_t offset) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<int64_t>(blockDim.x) * gridDim.x)
    // One rounding, as the CPU kernel compiled with -march=native does it (gcc contracts the same
    // expression into vfmadd): the two fills are bit-identical. philox_uniform itself is exact.
    out[i] = __fmaf_rn(high - low, philox_uniform(seed, stream, offset, static_cast<uint64_t>(i)), low);
}

__global__ void normal_kernel(float* out, int64_t n, float mean, float std, uint64_t seed, uint64_t stream,
                              uint64_t offset) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const PhiloxBlock b = philox4x32_10(seed, stream, offset + static_cast<uint64_t>(i / 2));
    const int j = static_cast<int>(i % 2) * 2;
    const float u1 = 1.0f - uint_to_unit(b.v[j]);
    const float u2 = uint_to_unit(b.v[j + 1]);
    out[i] = mean + std * (sqrtf(-2.0f * logf(u1)) * cosf(kTwoPi * u2));
  }
}

template <typename T>
__global__ void dropout_forward_kernel(T* out, const T* x, int64_t n, float p, uint64_t seed, uint64_t stream,
                                       uint64_t offset) {
  const float keep_scale = 1.0f / (1.0f - p);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const bool keep = philox_uniform(seed, stream, offset, static_cast<uint64_t>(i)) >= p;
    store(out + i, keep ? load(x + i) * keep_scale : 0.0f);
  }
}

// A dropped element's dx is left as it is (no read, no rounding).
template <typename T>
__global__ void dropout_backward_kernel(T* dx, const T* dout, int64_t n, float p, uint64_t seed, uint64_t stream,
                                        uint64_t offset) {
  const float keep_scale = 1.0f / (1.0f - p);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<int64_t>(blockDim.x) * gridDim.x)
    if (philox_uniform(seed, stream, offset, static_cast<uint64_t>(i)) >= p)
      store(dx + i, load(dx + i) + load(dout + i) * keep_scale);
}

template <typename T>
void dropout_forward(T* out, const T* x, int64_t n, float p, uint64_t seed, uint64_t stream, uint64_t offset,
                     CUstream_st* s) {
  if (n <= 0) return;
  KRAKEN_KERNEL(blocks_for(n, kThreads), kThreads, 0, s, dropout_forward_kernel<T>)(out, x, n, p, seed, stream, offset);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

template <typename T>
void dropout_backward(T* dx, const T* dout, int64_t n, float p, uint64_t seed, uint64_t stream, uint64_t offset,
                      CUstream_st* s) {
  if (n <= 0) return;
  KRAKEN_KERNEL(blocks_for(n, kThreads), kThreads, 0, s, dropout_backward_kernel<T>)
  (dx, dout, n, p, seed, stream, offset);
  KRAKEN_CUDA_LAUNCH_CHECK();
}
}  // namespace

void fill_uniform_cuda(float* out, int64_t n, float low, float high, uint64_t seed, uint64_t stream, uint64_t offset,
                       CUstream_st* s) {
  if (n <= 0) return;
  KRAKEN_KERNEL(blocks_for(n, kThreads), kThreads, 0, s, uniform_kernel)(out, n, low, high, seed, stream, offset);
  KRAKEN_CUDA_LAUNCH_CHECK();
}
void fill_normal_cuda(float* out, int64_t n, float mean, float std, uint64_t seed, uint64_t stream, uint64_t offset,
                      CUstream_st* s) {
  if (n <= 0) return;
  KRAKEN_KERNEL(blocks_for(n, kThreads), kThreads, 0, s, normal_kernel)(out, n, mean, std, seed, stream, offset);
  KRAKEN_CUDA_LAUNCH_CHECK();
}
void dropout_forward_cuda(float* out, const float* x, int64_t n, float p, uint64_t seed, uint64_t stream,
                          uint64_t offset, CUstream_st* s) {
  dropout_forward(out, x, n, p, seed, stream, offset, s);
}
void dropout_backward_cuda(float* dx, const float* dout, int64_t n, float p, uint64_t seed, uint64_t stream,
                           uint64_t offset, CUstream_st* s) {
  dropout_backward(dx, dout, n, p, seed, stream, offset, s);
}
void dropout_forward_bf16_cuda(uint16_t* out, const uint16_t* x, int64_t n, float p, uint64_t seed, uint64_t stream,
                               uint64_t offset, CUstream_st* s) {
  dropout_forward(as_bf16(out), as_bf16(x), n, p, seed, stream, offset, s);
}
void dropout_backward_bf16_cuda(uint16_t* dx, const uint16_t* dout, int64_t n, float p, uint64_t seed,
                                uint64_t stream, uint64_t offset, CUstream_st* s) {
  dropout_backward(as_bf16(dx), as_bf16(dout), n, p, seed, stream, offset, s);
}

}  // namespace kraken::kernels
