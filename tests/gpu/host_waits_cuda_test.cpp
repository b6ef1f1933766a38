// Where the host waits for the GPU. A wait empties the GPU's queue: the GPU idles until the host has
// issued enough work again, so a training step should wait only where it reads a result (the gradient
// norm, the loss). These tests hold the GPU's stream at a gate — a host function queued on it that
// returns only when the test opens it — and then do what must not wait: if it waits, it cannot return
// before the gate opens on its own after kGateLimit, and the test fails instead of hanging.
// - Small host-to-GPU copies (runtime/allocator.h: staged through pinned buffers) return before the GPU
//   runs them, copy the host's bytes at the call (the caller may reuse its buffer), and arrive intact
//   at every size, also when the staging buffers are reused and grow.
// - A training step's forward, backward and AdamW update, from ids and targets on the host (as the
//   trainer passes them), do not wait, and give the bits the same step gives from ids on the GPU.
// Needs a GPU and the CUDA runtime (no dry run: the CPU has no stream to hold).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#if KRAKEN_WITH_CUDA
#include <cuda_runtime.h>
#endif

#include "models/kraken.h"
#include "optim/adamw.h"
#include "runtime/allocator.h"
#include "runtime/autograd.h"
#include "runtime/ops.h"
#include "tests/gpu/gpu_test_util.h"

namespace kraken::runtime {
namespace {

#if KRAKEN_WITH_CUDA

constexpr std::chrono::seconds kGateLimit{20};

// Holds the runtime's compute stream of cuda:0 at a host function from close() until open(), or for at
// most kGateLimit (then timed_out()).
class StreamGate {
 public:
  StreamGate() : stream_(reinterpret_cast<cudaStream_t>(compute_stream(Device::cuda(0)))) {}
  ~StreamGate() {
    open();
    cudaStreamSynchronize(stream_);
  }
  void close() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      opened_ = false;
    }
    ASSERT_EQ(cudaLaunchHostFunc(stream_, &StreamGate::hold, this), cudaSuccess);
  }
  void open() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      opened_ = true;
    }
    cv_.notify_all();
  }
  // Whether the stream has work it has not finished (the gate, or what is queued behind it). (A "not
  // ready" is cleared in case it stays the last error, which a later launch check would report.)
  bool stream_busy() const {
    const bool busy = cudaStreamQuery(stream_) == cudaErrorNotReady;
    if (busy) (void)cudaGetLastError();
    return busy;
  }
  bool timed_out() const { return timed_out_.load(); }

 private:
  static void CUDART_CB hold(void* self) {
    auto* gate = static_cast<StreamGate*>(self);
    std::unique_lock<std::mutex> lock(gate->mutex_);
    if (!gate->cv_.wait_for(lock, kGateLimit, [gate] { return gate->opened_; })) gate->timed_out_ = true;
  }
  cudaStream_t stream_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool opened_ = true;
  std::atomic<bool> timed_out_{false};
};

uint64_t host_waits() { return memory_traffic().host_waits; }

// Every staging buffer made (each slot's first upload allocates pinned memory and an event) and large
// enough for 1,000 ids; the device idle after.
void warm_staging(const Device& gpu) {
  const std::vector<int32_t> host(1000, 0);
  for (int i = 0; i < 16; ++i) (void)Tensor::from_ints(host, {1000}, gpu);
  synchronize(gpu);
}

TEST(GpuUpload, SmallHostCopiesReturnBeforeTheGpuRunsThemAndTakeTheBytesAtTheCall) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  const Device gpu = Device::cuda(0);
  warm_staging(gpu);  // (a buffer's first allocation, or its growth, may wait)
  std::vector<int32_t> host(1000);

  StreamGate gate;
  gate.close();
  const uint64_t waits = host_waits();
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<Tensor> uploaded;
  for (int i = 0; i < 16; ++i) {  // (the staging ring's size: a 17th would wait for the first's DMA)
    for (size_t j = 0; j < host.size(); ++j) host[j] = static_cast<int32_t>(1000 * i + j);
    uploaded.push_back(Tensor::from_ints(host, {1000}, gpu));
    for (int32_t& v : host) v = -1;  // reused at once: the upload must have taken the bytes already
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_TRUE(gate.stream_busy()) << "the stream ran past the gate";
  EXPECT_FALSE(gate.timed_out()) << "an upload waited for the GPU (the gate opened on its own)";
  EXPECT_LT(seconds, 5.0) << "16 uploads took " << seconds << " s behind a held stream";
  EXPECT_EQ(host_waits() - waits, 0u) << "uploads counted as waits for the GPU";
  gate.open();
  for (int i = 0; i < 16; ++i) {
    const std::vector<int32_t> back = uploaded[static_cast<size_t>(i)].to_int_vector();
    for (size_t j = 0; j < back.size(); ++j)
      ASSERT_EQ(back[j], static_cast<int32_t>(1000 * i + j)) << "upload " << i << ", element " << j;
  }
}

TEST(GpuUpload, CopiesOfEverySizeArriveIntactAsTheStagingBuffersAreReusedAndGrow) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  const Device gpu = Device::cuda(0);
  // 3 rounds over the ring with growing sizes (a buffer grows on reuse), up to the staged limit, and one
  // past it (the waiting copy); each a distinct pattern, checked after all were queued.
  std::vector<size_t> sizes;
  for (int round = 0; round < 3; ++round)
    for (size_t s = 1; s <= 16; ++s) sizes.push_back(s * (round == 0 ? 7 : round == 1 ? 4099 : 65521));
  sizes.push_back(kStagedUploadLimit / sizeof(int32_t));
  sizes.push_back(kStagedUploadLimit / sizeof(int32_t) + 1);
  std::vector<Tensor> uploaded;
  for (size_t k = 0; k < sizes.size(); ++k) {
    std::vector<int32_t> host(sizes[k]);
    for (size_t j = 0; j < host.size(); ++j) host[j] = static_cast<int32_t>(k * 7919 + j * 31);
    uploaded.push_back(Tensor::from_ints(host, {static_cast<int64_t>(host.size())}, gpu));
  }
  for (size_t k = 0; k < sizes.size(); ++k) {
    const std::vector<int32_t> back = uploaded[k].to_int_vector();
    ASSERT_EQ(back.size(), sizes[k]);
    for (size_t j = 0; j < back.size(); ++j)
      ASSERT_EQ(back[j], static_cast<int32_t>(k * 7919 + j * 31)) << "upload " << k << " of " << sizes[k]
                                                                   << " ids, element " << j;
  }
}

models::KrakenConfig small_degree2() {
  models::KrakenConfig c;
  c.n_layer = 2;
  c.n_embd = 64;
  c.n_head = 4;
  c.degree = 2;
  c.context = 64;
  c.vocab_size = 300;
  c.mlp_expansion = 4;
  c.bias = true;
  return c;
}

TEST(GpuHostWaits, ATrainingStepsForwardBackwardAndUpdateFromHostBatchesDoNotWaitForTheGpu) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  const Device gpu = Device::cuda(0);
  const models::KrakenConfig c = small_degree2();
  const Tensor ids = testing::random_ids({4, 64}, c.vocab_size, 70);
  const Tensor targets = testing::random_ids({4, 64}, c.vocab_size, 71);
  for (const DType compute : {DType::BF16, DType::F32}) {
    const std::string what = compute == DType::BF16 ? "mixed precision" : "f32";
    // Two models from one initialisation: one steps from host batches behind the gate, one from the same
    // batches on the GPU (the ops copy them back to check them: waits) — the same kernels, the same bits.
    std::vector<float> losses;
    std::vector<std::vector<float>> weights;
    for (const bool from_host : {true, false}) {
      models::KrakenModel model(c, gpu);
      model.initialize(5);
      model.set_compute_dtype(compute);
      auto params = model.named_parameters();
      optim::AdamW opt(optim::param_refs(params), optim::AdamWOptions{});
      const Tensor x = from_host ? ids : ids.to(gpu), y = from_host ? targets : targets.to(gpu);
      auto step = [&] {
        Tensor loss = model.loss(x, y);
        backward(loss);
        std::vector<Tensor> grads;
        for (const auto& p : params) grads.push_back(p.tensor.grad());
        opt.step(grads, 1e-3f);
        model.release_grads();
        return loss;
      };
      // Warm: plans, handles, the allocator's blocks. Two steps: the first starts from an empty pool, the
      // second from the first's freed blocks — the pattern every later step repeats (a cudaMalloc behind
      // the gate might wait for the device).
      for (int warm = 0; warm < 2; ++warm) (void)step().item();
      warm_staging(gpu);
      StreamGate gate;
      if (from_host) gate.close();
      const uint64_t waits = host_waits();
      const int64_t mallocs = device_allocator_stats(gpu.index).system_allocations;
      const Tensor loss = step();
      if (from_host) {
        EXPECT_TRUE(gate.stream_busy()) << what << ": the stream ran past the gate";
        EXPECT_FALSE(gate.timed_out()) << what << ": the step waited for the GPU (the gate opened on its own; "
                                       << device_allocator_stats(gpu.index).system_allocations - mallocs
                                       << " cudaMalloc calls in the step)";
        EXPECT_EQ(host_waits() - waits, 0u) << what << ": copies in the step waited for the GPU";
        gate.open();
      } else {
        EXPECT_GE(host_waits() - waits, 2u) << what << ": ids and targets on the GPU are copied back to be checked";
      }
      losses.push_back(loss.item());
      std::vector<float> all;
      for (const auto& p : params) {
        const std::vector<float> v = p.tensor.to(DType::F32).to_vector();
        all.insert(all.end(), v.begin(), v.end());
      }
      weights.push_back(all);
    }
    EXPECT_TRUE(std::isfinite(losses[0])) << what;
    // (cuDNN's atomic dQ, KRAKEN_CUDNN_ATTENTION_BACKWARD=atomic, sums in arrival order: no two steps agree)
    const char* dq = std::getenv("KRAKEN_CUDNN_ATTENTION_BACKWARD");
    if (dq && *dq && std::string(dq) != "deterministic") continue;
    EXPECT_EQ(losses[0], losses[1]) << what << ": the loss from host batches and from GPU batches";
    ASSERT_EQ(weights[0].size(), weights[1].size());
    for (size_t i = 0; i < weights[0].size(); ++i)
      ASSERT_EQ(weights[0][i], weights[1][i]) << what << ": updated weight " << i;
  }
}

#else

TEST(GpuHostWaits, NeedACudaBuild) { GTEST_SKIP() << "this build has no CUDA"; }

#endif

}  // namespace
}  // namespace kraken::runtime
