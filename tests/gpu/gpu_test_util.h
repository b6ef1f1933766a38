// Shared helpers of the GPU tests (tests/gpu): the CUDA backend against the CPU reference.
//
// Every test starts with KRAKEN_REQUIRE_GPU(), which skips it with the reason (runtime::cuda_available)
// where there is no usable GPU. Tests place their GPU tensors on test_device().
//
// Dry run: with KRAKEN_GPU_TESTS_ON_CPU=1 in the environment, test_device() is the CPU and nothing is
// skipped, so the tests' own plumbing (shapes, seeding, the trainer configs, the comparisons) can be
// exercised on a machine without a GPU. Such a run compares the CPU with itself and proves nothing
// about CUDA; it exists because these tests are written where no GPU is available to run them.
//
// Tolerances are relative to the reference tensor's largest magnitude: |gpu − cpu| ≤ rel·max|cpu| for
// every element (rel = 0: bit-identical). fp32's unit roundoff is u = 2⁻²⁴ ≈ 6e-8; a sum of n terms in
// a different order differs by about √n·u relative to its scale (Higham, "Accuracy and Stability of
// Numerical Algorithms", §4.2), so the tolerances below sit one to two orders of magnitude above what
// reordering and 1–2 ulp transcendental functions produce, and far below any real mistake (a wrong
// index, factor or mask is an O(1) relative error).
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "runtime/allocator.h"
#include "runtime/tensor.h"

namespace kraken::testing {

// True when KRAKEN_GPU_TESTS_ON_CPU=1 (the dry run described above).
bool gpu_tests_on_cpu();
// Device::cuda(0), or the CPU in the dry run.
runtime::Device test_device();
// "cuda", or "cpu" in the dry run (the trainer's [train] device).
const char* test_device_name();

#define KRAKEN_REQUIRE_GPU()                                                         \
  do {                                                                               \
    std::string why_;                                                                \
    if (!::kraken::testing::gpu_tests_on_cpu() && !::kraken::runtime::cuda_available(&why_)) \
      GTEST_SKIP() << "no GPU: " << why_;                                            \
  } while (0)

// Tests that call CUDA kernels directly (not through the ops): a GPU, a build with the CUDA kernels,
// and not the dry run (the CPU cannot stand in for a kernel).
#define KRAKEN_REQUIRE_CUDA_KERNELS()                                                               \
  do {                                                                                              \
    KRAKEN_REQUIRE_GPU();                                                                           \
    if (::kraken::testing::gpu_tests_on_cpu())                                                      \
      GTEST_SKIP() << "dry run: these tests call the CUDA kernels directly (no CPU stand-in)";     \
    if (!KRAKEN_WITH_CUDA) GTEST_SKIP() << "this build has no CUDA kernels";                        \
  } while (0)

// The reference's one rounding: f32 → bf16 (nearest even) → f32.
std::vector<float> round_bf16(const std::vector<float>& v);

// One bf16 ulp of an element, at most (2⁻⁷ of its magnitude): the `ulp` of expect_within_ulp.
constexpr double kOneBf16Ulp = 1.0 / 128.0;

// bf16 results (widened exactly) against a reference: |got − ref| ≤ ulp·|ref| + rel·max|ref| for every
// element (ulp = 2⁻⁷ allows one bf16 ulp of the element; 0 for f32 results); prints the worst element
// in units of the allowed error and how many elements differ at all.
void expect_within_ulp(const std::vector<float>& got, const std::vector<float>& ref, double ulp, double rel,
                       const std::string& what);

// N(0, std²) values from a fixed seed, on the CPU (not requiring grad).
runtime::Tensor random_tensor(const runtime::Shape& shape, uint64_t seed, float std = 1.0f);
// Token ids in [0, bound) from a fixed seed, i32 on the CPU.
runtime::Tensor random_ids(const runtime::Shape& shape, int64_t bound, uint64_t seed);
// A copy on test_device(); a leaf that requires grad when the source does.
runtime::Tensor to_test_device(const runtime::Tensor& cpu);

// Expects |device − reference| ≤ rel·max|reference| element by element (NaN only where the reference
// has NaN); on failure reports the worst element, both values and the scale.
void expect_close(const runtime::Tensor& device, const runtime::Tensor& reference, double rel, const std::string& what);
void expect_close(const std::vector<float>& device, const std::vector<float>& reference, double rel,
                  const std::string& what);

// Runs f on the CPU inputs and on copies of them on test_device(), compares the outputs (rel_out),
// then seeds backward on both with the same random projection of the output and compares the
// gradient of every input that requires one (rel_grad).
using DeviceOp = std::function<runtime::Tensor(const std::vector<runtime::Tensor>&)>;
void expect_matches_cpu(const DeviceOp& f, const std::vector<runtime::Tensor>& cpu_inputs, double rel_out,
                        double rel_grad, const std::string& what);

// Allocator statistics of test_device() (the host allocator in the dry run).
runtime::AllocatorStats test_device_allocator_stats();

// A limit on a scope that may never end: a kernel waiting on a barrier nobody completes (the pipelined
// wgmma kernels' mbarriers and named barriers, whose first GPU runs these tests are) blocks the next
// synchronisation for good. If the scope is still open after `seconds`, the watch prints "[gpu-hang]
// <what> did not finish in <seconds> s" (stderr) and ends the process with exit status 124 (timeout's), the only
// way out of a hung kernel: tools/gpu-check.sh reads the line, knows which kernel hung within seconds
// instead of its own limit, and steps KRAKEN_CUDA_WGMMA down (kernels/attention.h). KRAKEN_HANG_WATCH_SCALE
// multiplies every limit (gpu-check sets 20 under compute-sanitizer, which runs kernels that much slower).
class HangWatch {
 public:
  HangWatch(std::string what, double seconds);
  ~HangWatch();
  HangWatch(const HangWatch&) = delete;
  HangWatch& operator=(const HangWatch&) = delete;

 private:
  struct State;
  std::shared_ptr<State> state_;
  std::thread watcher_;
};

}  // namespace kraken::testing
