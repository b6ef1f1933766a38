// nvcuda::wmma for the CPU emulation (tests/cuda_emu/emu.h): the 16 × 16 × 16 shapes with bf16
// operands and f32 accumulators that kernels/cuda uses. Found before CUDA's own mma.h because
// tests/cuda_emu/include comes first on the emulation's include path.
//
// CUDA leaves the map from a fragment's elements (x[i] of each lane) to matrix positions unspecified.
// Here each fragment kind (matrix_a, matrix_b, accumulator) has its own fixed pseudo-random
// permutation of the 256 positions over 32 lanes × 8 elements, so a kernel that assumes a layout
// computes garbage, while one that learns it (attention_tc.cu's row ids) works. Loads and stores move
// each lane's own elements and do not wait for the other lanes (so a missing __syncwarp around them
// shows); a product gathers every lane's fragments, so it is a warp barrier, as a shuffle is. Products
// are summed in f32 in k order.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "tests/cuda_emu/emu.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {

constexpr int kElements = 8;  // 256 positions / 32 lanes

// position (row · 16 + column) of element i of lane l, for fragment kind `kind`.
int position(int kind, int lane, int i);

template <typename Use>
constexpr int kind_of() {
  return std::is_same_v<Use, matrix_a> ? 0 : std::is_same_v<Use, matrix_b> ? 1 : 2;
}


inline float widen(float v) { return v; }
inline float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
T narrow(float v);
template <>
inline float narrow<float>(float v) { return v; }
template <>
inline __nv_bfloat16 narrow<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// A layout_t or a fragment's fixed memory layout: row-major or not.
inline bool row_major_of(row_major) { return true; }
inline bool row_major_of(col_major) { return false; }

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation has the 16 × 16 × 16 shape only");
  static constexpr int num_elements = detail::kElements;
  using element_type = T;
  T x[detail::kElements];
};

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float value) {
  for (int i = 0; i < detail::kElements; ++i) f.x[i] = detail::narrow<T>(value);
}

// A or B fragments: the memory layout is the fragment's own.
template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* ptr, unsigned ldm) {
  static_assert(!std::is_same_v<Layout, void>, "an accumulator load needs a layout_t");
  const bool rows = detail::row_major_of(Layout());
  const int lane = ::kraken_emu::lane();
  for (int i = 0; i < detail::kElements; ++i) {
    const int p = detail::position(detail::kind_of<Use>(), lane, i), r = p / 16, c = p % 16;
    f.x[i] = ptr[rows ? r * ldm + c : c * ldm + r];
  }
}

template <typename T>
void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const T* ptr, unsigned ldm, layout_t layout) {
  const int lane = ::kraken_emu::lane();
  for (int i = 0; i < detail::kElements; ++i) {
    const int p = detail::position(2, lane, i), r = p / 16, c = p % 16;
    f.x[i] = ptr[layout == mem_row_major ? r * ldm + c : c * ldm + r];
  }
}

template <typename T>
void store_matrix_sync(T* ptr, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm, layout_t layout) {
  const int lane = ::kraken_emu::lane();
  for (int i = 0; i < detail::kElements; ++i) {
    const int p = detail::position(2, lane, i), r = p / 16, c = p % 16;
    ptr[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.x[i];
  }
  // No barrier after: a lane that reads what other lanes stored needs the kernel's own __syncwarp,
  // and without one it reads them unwritten here (lanes run in turn between barriers).
}

namespace detail {
// d = a·b + c over the whole warp: every lane deposits its elements into the warp's scratch (as f32
// 16 × 16 matrices A, B, C), then computes its own elements of d.
void mma(float* d, const float* a, const float* b, const float* c);
}  // namespace detail

template <typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float fa[detail::kElements], fb[detail::kElements], fd[detail::kElements];
  for (int i = 0; i < detail::kElements; ++i) fa[i] = detail::widen(a.x[i]), fb[i] = detail::widen(b.x[i]);
  detail::mma(fd, fa, fb, c.x);
  for (int i = 0; i < detail::kElements; ++i) d.x[i] = fd[i];
}

}  // namespace nvcuda::wmma
