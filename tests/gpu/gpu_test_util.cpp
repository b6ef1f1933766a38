#include "tests/gpu/gpu_test_util.h"

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>

#include "kernels/elementwise.h"

#include "runtime/autograd.h"
#include "runtime/rng.h"

namespace kraken::testing {

using runtime::Device;
using runtime::Tensor;

bool gpu_tests_on_cpu() {
  const char* env = std::getenv("KRAKEN_GPU_TESTS_ON_CPU");
  return env && std::strcmp(env, "1") == 0;
}

Device test_device() { return gpu_tests_on_cpu() ? Device::cpu() : Device::cuda(0); }

const char* test_device_name() { return gpu_tests_on_cpu() ? "cpu" : "cuda"; }

Tensor random_tensor(const runtime::Shape& shape, uint64_t seed, float std) {
  Tensor t = Tensor::empty(shape);
  runtime::Generator gen(seed, 3);
  gen.fill_normal(t, 0.0f, std);
  return t;
}

Tensor random_ids(const runtime::Shape& shape, int64_t bound, uint64_t seed) {
  runtime::Generator gen(seed, 4);
  std::vector<int32_t> ids(static_cast<size_t>(runtime::shape_numel(shape)));
  for (auto& id : ids) id = static_cast<int32_t>(gen.next_below(static_cast<uint64_t>(bound)));
  return Tensor::from_ints(ids, shape);
}

Tensor to_test_device(const Tensor& cpu) {
  Tensor out = test_device().is_cpu() ? cpu.detach().clone() : cpu.detach().to(test_device());
  if (cpu.requires_grad()) out.set_requires_grad(true);
  return out;
}

void expect_close(const std::vector<float>& device, const std::vector<float>& reference, double rel,
                  const std::string& what) {
  ASSERT_EQ(device.size(), reference.size()) << what;
  double scale = 0.0;
  for (float r : reference)
    if (std::isfinite(r)) scale = std::max(scale, std::fabs(static_cast<double>(r)));
  const double tol = rel * scale;
  double worst = 0.0;
  int64_t where = -1, nan_mismatch = -1;
  for (size_t i = 0; i < device.size(); ++i) {
    const double a = device[i], b = reference[i];
    if (std::isnan(a) != std::isnan(b) || std::isinf(a) != std::isinf(b) || (std::isinf(a) && a != b)) {
      if (nan_mismatch < 0) nan_mismatch = static_cast<int64_t>(i);
      continue;
    }
    if (!std::isfinite(a)) continue;
    const double d = std::fabs(a - b);
    if (d > worst || where < 0) worst = d, where = static_cast<int64_t>(i);
  }
  EXPECT_LT(nan_mismatch, 0) << what << ": element " << nan_mismatch << " is " << device[nan_mismatch]
                             << " on the device and " << reference[nan_mismatch] << " on the CPU";
  if (where < 0) return;
  // Every comparison's measured difference goes to the log (tools/gpu-check.sh collects these lines
  // into its report), so the tolerances can be revisited with numbers from a real device.
  std::printf("[gpu-vs-cpu] %s: max|diff| %.3g = %.3g of the scale %.3g (allowed %.3g)\n", what.c_str(), worst,
              scale > 0 ? worst / scale : 0.0, scale, rel);
  EXPECT_LE(worst, tol) << what << ": largest difference " << worst << " at element " << where << " (device "
                        << device[where] << ", CPU " << reference[where] << "), allowed " << tol << " = " << rel
                        << " x max|CPU| " << scale << " over " << device.size() << " elements";
}

void expect_close(const Tensor& device, const Tensor& reference, double rel, const std::string& what) {
  ASSERT_TRUE(device.defined()) << what << ": the device tensor is undefined";
  ASSERT_TRUE(reference.defined()) << what << ": the reference tensor is undefined";
  EXPECT_EQ(device.device(), test_device()) << what << ": " << device.describe();
  ASSERT_EQ(device.shape(), reference.shape()) << what;
  expect_close(device.to_vector(), reference.to_vector(), rel, what);
}

void expect_matches_cpu(const DeviceOp& f, const std::vector<Tensor>& cpu_inputs, double rel_out, double rel_grad,
                        const std::string& what) {
  std::vector<Tensor> dev_inputs;
  for (const Tensor& x : cpu_inputs) {
    if (x.defined() && x.requires_grad()) x.impl()->grad.reset();
    dev_inputs.push_back(x.defined() ? to_test_device(x) : Tensor());
  }
  const Tensor y_cpu = f(cpu_inputs);
  const Tensor y_dev = f(dev_inputs);
  expect_close(y_dev, y_cpu, rel_out, what + ": output");
  if (!y_cpu.requires_grad()) return;
  ASSERT_TRUE(y_dev.requires_grad()) << what << ": the device output records no gradient";
  Tensor w = random_tensor(y_cpu.shape(), 99);
  if (y_cpu.dtype() == runtime::DType::BF16) w = w.to(runtime::DType::BF16);  // a gradient has its tensor's dtype
  runtime::backward(y_cpu, w);
  runtime::backward(y_dev, w.to(test_device()));
  for (size_t i = 0; i < cpu_inputs.size(); ++i) {
    if (!cpu_inputs[i].defined() || !cpu_inputs[i].requires_grad()) continue;
    expect_close(dev_inputs[i].grad(), cpu_inputs[i].grad(), rel_grad, what + ": gradient of input " + std::to_string(i));
  }
}

std::vector<float> round_bf16(const std::vector<float>& v) {
  const int64_t n = static_cast<int64_t>(v.size());
  std::vector<uint16_t> b(v.size());
  kernels::cast_f32_to_bf16_cpu(b.data(), v.data(), n);
  std::vector<float> out(v.size());
  kernels::cast_bf16_to_f32_cpu(out.data(), b.data(), n);
  return out;
}

void expect_within_ulp(const std::vector<float>& got, const std::vector<float>& ref, double ulp, double rel,
                       const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  double scale = 0.0;
  for (float r : ref) scale = std::max(scale, std::fabs(static_cast<double>(r)));
  double worst = 0.0;  // in units of the allowed error
  int64_t at = -1, differing = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = got[i], r = ref[i];
    differing += g != r;
    // An exact match is no error (also where 0 is allowed); anything not finite is the worst.
    double ratio = 0.0;
    if (g != r) {
      ratio = std::isfinite(g) && std::isfinite(r) ? std::fabs(g - r) / (ulp * std::fabs(r) + rel * scale)
                                                   : std::numeric_limits<double>::infinity();
    }
    if (at < 0 || ratio > worst) worst = ratio, at = static_cast<int64_t>(i);
  }
  if (at < 0) return;
  std::printf("[gpu-vs-cpu] %s: worst error %.3g of the allowed, %lld of %zu elements differ (scale %.3g)\n",
              what.c_str(), worst, static_cast<long long>(differing), got.size(), scale);
  EXPECT_LE(worst, 1.0) << what << ": element " << at << " is " << got[static_cast<size_t>(at)] << ", the reference "
                        << ref[static_cast<size_t>(at)] << " (allowed " << ulp << " x |ref| + " << rel << " x "
                        << scale << ")";
}

runtime::AllocatorStats test_device_allocator_stats() {
  return gpu_tests_on_cpu() ? runtime::host_allocator_stats() : runtime::device_allocator_stats(0);
}

struct HangWatch::State {
  std::mutex mutex;
  std::condition_variable ended;
  bool done = false;
};

HangWatch::HangWatch(std::string what, double seconds) : state_(std::make_shared<State>()) {
  static const double scale = [] {
    const char* env = std::getenv("KRAKEN_HANG_WATCH_SCALE");
    const double v = env && *env ? std::atof(env) : 1.0;
    return v > 0.0 ? v : 1.0;
  }();
  seconds *= scale;
  watcher_ = std::thread([state = state_, what = std::move(what), seconds] {
    std::unique_lock<std::mutex> lock(state->mutex);
    if (state->ended.wait_for(lock, std::chrono::duration<double>(seconds), [&] { return state->done; })) return;
    std::fflush(stdout);  // (what the test printed so far comes first)
    std::fprintf(stderr, "[gpu-hang] %s did not finish in %g s: taken for a hang, the process ends (exit status 124)\n",
                 what.c_str(), seconds);
    std::fflush(stderr);
    std::_Exit(124);  // (no destructors: the hung thread holds the device)
  });
}

HangWatch::~HangWatch() {
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->done = true;
  }
  state_->ended.notify_all();
  watcher_.join();
}

}  // namespace kraken::testing
