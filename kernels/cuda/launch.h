// Kernel launches and dynamic shared memory, spelled so that the same source also compiles for the CPU
// emulation of CUDA in tests/cuda_emu (which runs these kernels' logic in CI, where there is no GPU):
//
//   KRAKEN_KERNEL(grid, block, shared_bytes, stream, kernel)(args...);   kernel<<<grid, block, …>>>(args...)
//   KRAKEN_DYNAMIC_SHARED(type, name);                                    extern __shared__ type name[]
//
// The kernel comes last so that a template with several arguments needs no extra parentheses.
#pragma once

#if defined(KRAKEN_CUDA_EMULATION)
#include "tests/cuda_emu/emu.h"
#define KRAKEN_KERNEL(grid, block, shared_bytes, stream, ...) \
  ::kraken_emu::Launch((grid), (block), (shared_bytes), (stream), __VA_ARGS__)
#define KRAKEN_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::kraken_emu::dynamic_shared())
#else
#define KRAKEN_KERNEL(grid, block, shared_bytes, stream, ...) __VA_ARGS__<<<(grid), (block), (shared_bytes), (stream)>>>
#define KRAKEN_DYNAMIC_SHARED(type, name) extern __shared__ __align__(128) type name[]
#endif

#include <cstdint>
#include <type_traits>

namespace kraken::kernels::cuda_detail {

// Calls f(std::integral_constant<int, n>()) for kLo ≤ n ≤ kHi — a template argument (a kernel's unrolled
// count) picked at run time — and returns true; false, and no call, for any other n.
template <int kLo, int kHi, typename F>
bool with_constant_in(int64_t n, F&& f) {
  if constexpr (kLo > kHi) {
    return false;
  } else {
    if (n == kLo) {
      f(std::integral_constant<int, kLo>());
      return true;
    }
    return with_constant_in<kLo + 1, kHi>(n, f);
  }
}

}  // namespace kraken::kernels::cuda_detail
