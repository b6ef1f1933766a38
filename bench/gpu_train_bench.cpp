// GPU benchmark (a plain program, no Google Benchmark: the GPU machines have no system packages).
//
//   build/bin/gpu_train_bench [--out report.md] [--batch B,B,...] [--steps N] [--warmup N] [--peak-tflops X]
//                             [--model gpt2|kraken4|kraken4-768|all|none] [--precision bf16|fp32|all] [--training-only]
//                             [--no-host-probe] [--layers L] [--timeline]
//
// --model, --precision and --training-only pick a part of the report: tools/gpu-profile.sh runs one
// model's step under Nsight Compute that way; --model none, the kernel tables alone. --layers L gives both presets L layers instead of 12 (the
// rows say so): what scales with the number of launches a step makes, the host's waits among them.
// --timeline (or KRAKEN_BENCH_TIMELINE=1) runs one more step of each training row under CUPTI and says,
// after the table, where its wall time went: the GPU busy or idle between the first kernel and the last,
// the longest idle gaps with the kernels either side, and each kernel's time in the step, to set beside
// ncu's times of the kernels alone (bench/gpu_timeline.h; built where the toolkit has CUPTI).
//
// 1. Training throughput, mixed precision (bf16 activations and cuBLASLt products, f32 masters: the
//    GPU's default) and fp32, of the trainer's step without the data loader (forward, cross-entropy,
//    backward, global-norm clipping, AdamW, release_grads — KRAKEN_BENCH_ZERO_GRADS=1: zero_grad —, one
//    loss.item()) on uniform token ids (KRAKEN_BENCH_IDS=text: ids as text has them, zipf_ids) — with
//    --accumulate A, A micro-batches' forward and backward before the one update, as the trainer's
//    grad_accum (llm.c's GPT-2 124M recipe on one GPU: 0.5M tokens a step, A = 8 at B = 64) —, bf16 at
//    each --batch size
//    (default 8, 32 and 64 sequences of T = 1024; a size the device cannot hold is a row saying so), fp32
//    at the first, on
//      GPT-2 124M:           L = 12, C = 768, H = 12, T = 1024, degree 1, e = 4, biases, vocab 50257;
//      Kraken 125M 4-way:    L = 12, C = 504, H = 12 (3 per sub-layer), degree 4, e = 2, no biases,
//                            vocab 50304 (research/kraken.md, the paper's preset);
//    and only when asked for (--model kraken4-768; not in "all"), GPT-2 124M's own shape at degree 4 — L = 12,
//    C = 768, H = 12, e = 4, biases: four full-width sub-layers a layer, 3 heads of D = 256 each, ≈ 382M
//    parameters — the shape issue 5 names for both degrees, read literally.
//    MFU = FLOPs per token as llm.c counts them (6·N + 6·k·L·C·T, KrakenConfig::training_flops_per_token)
//    · tokens/s ÷ the device's dense bf16 peak (H100 SXM and H200: 989 TFLOP/s; --peak-tflops overrides);
//    after it, the MFU with attention over all T×T scores and the matrix parameters only (PaLM's count,
//    the one these reports used up to the twenty-eighth session: 6–16% higher). The fp32 rows run on CUDA
//    cores (cuBLAS SGEMM, TF32 off), so their MFU against the bf16 peak is low by construction: they are
//    the baseline the bf16 rows are measured against.
// 2. Achieved bandwidth of the memory-bound kernels at GPT-2 124M shapes (B·T = 8192 rows): layernorm,
//    GELU, AdamW (124M parameters), cross-entropy (Vp = 50304), each as bytes it must move ÷ time,
//    against the device's peak (memory clock × bus width × 2); the embedding backward also at B = 64
//    with uniform and with text-like ids.
// 3. For context: GPT-2's MLP block (c_fc → GELU → c_proj) in bf16, forward and backward, with its GELU
//    and bias gradients as kernels or in cuBLASLt's epilogues (KRAKEN_CUDA_EPILOGUES's levels: the
//    training rows take the environment's, 1 when unset); the Kraken preset's sub-layer products one per
//    sub-layer and as one strided batch, and its B = 64 step's products at its widths (504, 1008, 1512)
//    against the same with every width padded to a multiple of 64; one matrix product (fp32 SGEMM, and bf16
//    through cuBLASLt) and the fused attention at
//    the same shapes: fp32, and bf16 on tensor cores (mma.sync with the scores in registers, and WMMA)
//    and on CUDA cores, then both tensor-core families on one sub-layer of the Kraken 4-way preset (3
//    heads of D = 168), and cuDNN's fused attention on both shapes (a row saying why where cuDNN refuses
//    the shape). The training rows take what attention_bf16_kernels(D) names (cuDNN where it takes the
//    head size, else mma up to D = 192, by default; KRAKEN_CUDA_ATTENTION=mma|tc|simt|cudnn|wgmma|wgmma-backward forces
//    one), printed with each model (attention_bf16_kernels_label: until the twenty-second session the
//    wgmma variant's rows read "cudnn").
// Without a GPU it prints why and exits 0.
#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "models/kraken.h"
#include "optim/adamw.h"
#include "optim/clip.h"
#include "runtime/allocator.h"
#include "runtime/autograd.h"
#include "runtime/ops.h"
#include "runtime/rng.h"
#include "train/trainer.h"
#include "bench/gpu_timeline.h"

#if KRAKEN_WITH_CUDA
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include "kernels/attention.h"
#include "kernels/cross_entropy.h"
#include "kernels/elementwise.h"
#include "kernels/embedding.h"
#include "kernels/layernorm.h"
#include "kernels/matmul.h"
#include "kernels/optimizer.h"
#endif

namespace {

using kraken::models::KrakenConfig;
using kraken::runtime::Device;
using kraken::runtime::DType;
using kraken::runtime::Tensor;

struct Options {
  std::string out;
  // Batch sizes of the bf16 training rows (the fp32 rows take the first): 8 sequences of 1024 tokens, as
  // earlier reports, 32, where host overhead per kernel matters less, and 64, llm.c's setting for its
  // GPT-2 124M numbers (research/llmc.md), so the two compare at one batch.
  std::vector<int64_t> batches = {8, 32, 64};
  int steps = 5;
  int warmup = 2;
  double peak_tflops = 0.0;  // 0: from the device name
  std::string model = "all";      // gpt2, kraken4, kraken4-768 or all (gpt2 and kraken4)
  std::string precision = "all";  // bf16, fp32 or all
  bool training_only = false;     // skip the kernel tables
  bool host_probe = true;         // the bracketed forward + backward issue time (behind ~100 ms of queued products)
  int64_t layers = 0;             // 0: the presets' 12; fewer to see what scales with the launches a step makes
  bool timeline = false;          // one more step of each training row under CUPTI (gpu_timeline.h)
  int64_t accumulate = 1;         // micro-batches a step, one optimizer update (the trainer's grad_accum)
};

// Lines of the report: each goes to stdout and, with --out, to the report file at once (written through,
// flushed), so a row that aborts or hangs late in the tables — a kernel's first run on a GPU — leaves the
// rows before it in the file, the training table among them.
struct Report {
  FILE* file = nullptr;
  Report() = default;
  Report(const Report&) = delete;
  Report& operator=(const Report&) = delete;
  ~Report() {
    if (file) std::fclose(file);
  }
  void open(const std::string& path) {
    if (path.empty()) return;
    file = std::fopen(path.c_str(), "w");
    if (!file) std::fprintf(stderr, "gpu_train_bench: cannot write %s\n", path.c_str());
  }
  void line(const char* fmt, ...) __attribute__((format(printf, 2, 3))) {
    va_list args, again;
    va_start(args, fmt);
    va_copy(again, args);
    const int n = std::vsnprintf(nullptr, 0, fmt, args);
    va_end(args);
    std::string buf(n > 0 ? static_cast<size_t>(n) : 0, '\0');
    if (n > 0) std::vsnprintf(buf.data(), buf.size() + 1, fmt, again);
    va_end(again);
    std::printf("%s\n", buf.c_str());
    std::fflush(stdout);
    if (file) {
      std::fprintf(file, "%s\n", buf.c_str());
      std::fflush(file);
    }
  }
  void blank() { line("%s", ""); }
};

// "8,32" → {8, 32}; exits with a message on anything else.
std::vector<int64_t> batch_list(const std::string& text) {
  std::vector<int64_t> out;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t comma = text.find(',', start);
    const std::string item = text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    char* end = nullptr;
    const long long b = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || b < 1) {
      std::fprintf(stderr, "gpu_train_bench: --batch %s: expected positive integers separated by commas\n",
                   text.c_str());
      std::exit(2);
    }
    out.push_back(b);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "gpu_train_bench: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--out") o.out = value();
    else if (a == "--batch") o.batches = batch_list(value());
    else if (a == "--steps") o.steps = std::atoi(value().c_str());
    else if (a == "--warmup") o.warmup = std::atoi(value().c_str());
    else if (a == "--peak-tflops") o.peak_tflops = std::atof(value().c_str());
    else if (a == "--model") o.model = value();
    else if (a == "--precision") o.precision = value();
    else if (a == "--training-only") o.training_only = true;
    else if (a == "--kernel-tables") o.training_only = false;  // (undoes an earlier --training-only)
    else if (a == "--no-host-probe") o.host_probe = false;
    else if (a == "--layers") o.layers = std::atoll(value().c_str());
    else if (a == "--timeline") o.timeline = true;
    else if (a == "--accumulate") o.accumulate = std::atoll(value().c_str());
    else {
      std::fprintf(stderr, "usage: gpu_train_bench [--out FILE] [--batch B,...] [--steps N] [--warmup N] [--peak-tflops X] "
                           "[--model gpt2|kraken4|kraken4-768|all|none] [--precision bf16|fp32|all] [--training-only] "
                           "[--kernel-tables] [--no-host-probe] [--layers L] [--timeline] [--accumulate A]\n");
      std::exit(2);
    }
  }
  auto one_of = [](const char* key, const std::string& v, std::initializer_list<const char*> allowed) {
    for (const char* a : allowed)
      if (v == a) return;
    std::fprintf(stderr, "gpu_train_bench: %s %s: expected one of", key, v.c_str());
    for (const char* a : allowed) std::fprintf(stderr, " %s", a);
    std::fprintf(stderr, "\n");
    std::exit(2);
  };
  one_of("--model", o.model, {"gpt2", "kraken4", "kraken4-768", "all", "none"});
  one_of("--precision", o.precision, {"bf16", "fp32", "all"});
  if (o.accumulate < 1) {
    std::fprintf(stderr, "gpu_train_bench: --accumulate %lld: expected a count of micro-batches ≥ 1\n",
                 static_cast<long long>(o.accumulate));
    std::exit(2);
  }
  const char* timeline_env = std::getenv("KRAKEN_BENCH_TIMELINE");
  if (timeline_env && std::strcmp(timeline_env, "1") == 0) o.timeline = true;
  return o;
}

#if KRAKEN_WITH_CUDA

#define BENCH_CUDA(expr)                                                                              \
  do {                                                                                                \
    cudaError_t e_ = (expr);                                                                          \
    if (e_ != cudaSuccess) {                                                                          \
      std::fprintf(stderr, "CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(1);                                                                                   \
    }                                                                                                 \
  } while (0)

struct DeviceInfo {
  std::string name;
  int sms = 0;
  double memory_gb = 0.0;
  double peak_bw = 0.0;     // bytes/s, from the memory clock and bus width
  double peak_flops = 0.0;  // dense bf16, FLOP/s
};

// Dense bf16 tensor-core peaks (NVIDIA's data sheets, without sparsity).
double bf16_peak_tflops(const std::string& name) {
  auto has = [&](const char* s) { return name.find(s) != std::string::npos; };
  if (has("H100") && has("PCIe")) return 756.0;
  if (has("H100") && has("NVL")) return 835.0;
  if (has("H100") || has("H200") || has("H800")) return 989.4;
  if (has("A100")) return 312.0;
  return 0.0;
}

// HBM bandwidth from NVIDIA's data sheets, where the device does not report its memory clock.
double peak_bandwidth_from_name(const std::string& name) {
  auto has = [&](const char* s) { return name.find(s) != std::string::npos; };
  if (has("H200")) return 4.8e12;
  if (has("H100") && has("PCIe")) return 2.0e12;
  if (has("H100") && has("NVL")) return 3.9e12;
  if (has("H100")) return 3.35e12;
  if (has("A100")) return 2.0e12;
  return 0.0;
}

DeviceInfo device_info(const Options& o) {
  DeviceInfo d;
  cudaDeviceProp prop{};
  BENCH_CUDA(cudaGetDeviceProperties(&prop, 0));
  d.name = prop.name;
  d.sms = prop.multiProcessorCount;
  d.memory_gb = static_cast<double>(prop.totalGlobalMem) / 1e9;
  int clock_khz = 0, bus_bits = 0;
  if (cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, 0) == cudaSuccess &&
      cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, 0) == cudaSuccess && clock_khz > 0 && bus_bits > 0) {
    d.peak_bw = 2.0 * clock_khz * 1e3 * bus_bits / 8.0;  // double data rate
  } else {
    (void)cudaGetLastError();
    d.peak_bw = peak_bandwidth_from_name(d.name);
  }
  d.peak_flops = (o.peak_tflops > 0 ? o.peak_tflops : bf16_peak_tflops(d.name)) * 1e12;
  return d;
}

// Mean seconds per call of f over `reps` calls after one warm-up call, timed with CUDA events.
double time_kernel(const std::function<void()>& f, int reps = 10) {
  f();
  cudaEvent_t start, stop;
  BENCH_CUDA(cudaEventCreate(&start));
  BENCH_CUDA(cudaEventCreate(&stop));
  BENCH_CUDA(cudaEventRecord(start, nullptr));
  for (int i = 0; i < reps; ++i) f();
  BENCH_CUDA(cudaEventRecord(stop, nullptr));
  BENCH_CUDA(cudaEventSynchronize(stop));
  float ms = 0.0f;
  BENCH_CUDA(cudaEventElapsedTime(&ms, start, stop));
  BENCH_CUDA(cudaGetLastError());
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return static_cast<double>(ms) * 1e-3 / reps;
}

Tensor normal(const kraken::runtime::Shape& shape, uint64_t seed, float std = 1.0f) {
  Tensor t = Tensor::empty(shape, DType::F32, Device::cuda(0));
  kraken::runtime::Generator gen(seed, 0);
  gen.fill_normal(t, 0.0f, std);
  return t;
}

Tensor ids(int64_t B, int64_t T, int64_t vocab, uint64_t seed, Device device = Device::cuda(0)) {
  kraken::runtime::Generator gen(seed, 1);
  std::vector<int32_t> v(static_cast<size_t>(B * T));
  for (auto& x : v) x = static_cast<int32_t>(gen.next_below(static_cast<uint64_t>(vocab)));
  return Tensor::from_ints(v, {B, T}, device);
}

// Token ids as text has them, roughly: Zipf's law with exponent 1 over the vocabulary, rank r taking id
// r − 1 (GPT-2's BPE numbers its tokens about in order of frequency: " the" is 262, "," 11). Harsher than
// English for the embedding backward's blocks of ids: here the first 128 ids get 48% of the positions,
// where English text (the State of the Union corpus of scripts/setup-demo.sh) puts 30% in its busiest
// 128 ids and 6.7% on its most frequent token (" the"; 8.8% on rank 1 here).
Tensor zipf_ids(int64_t N, int64_t vocab, uint64_t seed, Device device = Device::cuda(0)) {
  std::vector<double> cdf(static_cast<size_t>(vocab));
  double total = 0.0;
  for (int64_t r = 0; r < vocab; ++r) cdf[static_cast<size_t>(r)] = total += 1.0 / static_cast<double>(r + 1);
  kraken::runtime::Generator gen(seed, 1);
  std::vector<int32_t> v(static_cast<size_t>(N));
  for (auto& x : v) {
    const double u = static_cast<double>(gen.next_below(uint64_t{1} << 53)) / 9007199254740992.0 * total;
    x = static_cast<int32_t>(std::min<int64_t>(std::upper_bound(cdf.begin(), cdf.end(), u) - cdf.begin(), vocab - 1));
  }
  return Tensor::from_ints(v, {N}, device);
}

// What --timeline says of one step (gpu_timeline.h), as report lines: the window, busy and idle time, the
// idle time by gap length, the longest gaps, and the kernels that took most of the step.
std::vector<std::string> timeline_lines(const std::string& what, double step_ms, double timed_ms,
                                        const std::vector<kraken::bench::Span>& spans) {
  using kraken::bench::summarize_timeline;
  const kraken::bench::TimelineSummary t = summarize_timeline(spans);
  std::vector<std::string> out;
  char buf[1024];
  auto ms = [](uint64_t ns) { return static_cast<double>(ns) * 1e-6; };
  std::snprintf(buf, sizeof buf,
                "**%s**: one step under CUPTI %.1f ms (the timed steps' %.1f); first kernel to last %.2f ms, the GPU "
                "busy %.2f ms (%zu kernels, copies and fills) and idle %.2f ms in %zu gaps.",
                what.c_str(), step_ms, timed_ms, ms(t.window_ns), ms(t.busy_ns), t.spans, ms(t.idle_ns()), t.gaps.size());
  out.push_back(buf);
  // Idle time by the length of its gaps: many short ones are launches the GPU outran, long ones the host
  // or a synchronisation.
  const uint64_t edges[] = {10'000, 100'000, 1'000'000};
  uint64_t sum[4] = {}, count[4] = {};
  for (const auto& g : t.gaps) {
    int b = 0;
    while (b < 3 && g.length_ns >= edges[b]) ++b;
    sum[b] += g.length_ns, ++count[b];
  }
  std::snprintf(buf, sizeof buf,
                "Idle by gap length: < 10 µs %llu gaps, %.2f ms; 10–100 µs %llu, %.2f ms; 0.1–1 ms %llu, %.2f ms; "
                "≥ 1 ms %llu, %.2f ms.",
                static_cast<unsigned long long>(count[0]), ms(sum[0]), static_cast<unsigned long long>(count[1]),
                ms(sum[1]), static_cast<unsigned long long>(count[2]), ms(sum[2]),
                static_cast<unsigned long long>(count[3]), ms(sum[3]));
  out.push_back(buf);
  std::string longest = "Longest gaps:";
  for (size_t i = 0; i < t.gaps.size() && i < 6; ++i) {
    std::snprintf(buf, sizeof buf, "%s %.0f µs after `%.60s`, before `%.60s`", i ? ";" : "",
                  static_cast<double>(t.gaps[i].length_ns) * 1e-3, t.gaps[i].before.c_str(), t.gaps[i].after.c_str());
    longest += buf;
  }
  out.push_back(longest + ".");
  out.push_back("");
  out.push_back("| kernel (in the step) | launches | ms | µs a launch |");
  out.push_back("|---|---|---|---|");
  for (size_t i = 0; i < t.by_name.size() && i < 15; ++i) {
    const auto& n = t.by_name[i];
    std::snprintf(buf, sizeof buf, "| `%.110s` | %lld | %.3f | %.1f |", n.name.c_str(), static_cast<long long>(n.count),
                  ms(n.total_ns), static_cast<double>(n.total_ns) * 1e-3 / static_cast<double>(n.count));
    out.push_back(buf);
  }
  out.push_back("");
  return out;
}

void bench_model(const char* label, const KrakenConfig& c, DType compute, int64_t B, const Options& o,
                 const DeviceInfo& dev, Report& r, std::vector<std::string>& timelines) {
  const Device gpu = Device::cuda(0);
  const int64_t T = c.context;
  // The peak and the reserved memory of this model alone: the previous model's cached segments go back.
  kraken::runtime::release_cached_memory(gpu);
  kraken::runtime::reset_peak_bytes_in_use(gpu);
  kraken::models::KrakenModel model(c, gpu);
  model.initialize(1337);
  model.set_compute_dtype(compute);
  auto params = model.named_parameters();
  kraken::optim::AdamWOptions ao;
  ao.beta2 = 0.95f;
  ao.weight_decay = 0.1f;
  kraken::optim::AdamW opt(kraken::optim::param_refs(params), ao);
  // As the trainer does under mixed precision: AdamW rewrites the model's bf16 weight copies in its
  // update, and the forwards after a step cast nothing (KrakenModel::compute_copy_targets).
  const bool optimizer_writes_copies = kraken::train::share_compute_copies(model, opt);
  // KRAKEN_BENCH_IDS=text: the tokens drawn as text has them (zipf_ids) instead of uniformly — what the
  // embedding backward sees in real training (its frequent rows).
  const char* ids_env = std::getenv("KRAKEN_BENCH_IDS");
  const bool text_ids = ids_env && std::strcmp(ids_env, "text") == 0;
  // On the host, as the trainer's batches: the embedding and the loss check them there and upload them
  // without waiting for the GPU (runtime/ops.h).
  const Device host = Device::cpu();
  const Tensor x = text_ids ? zipf_ids(B * T, c.vocab_size, 1, host).reshape({B, T}) : ids(B, T, c.vocab_size, 1, host);
  const Tensor y = text_ids ? zipf_ids(B * T, c.vocab_size, 2, host).reshape({B, T}) : ids(B, T, c.vocab_size, 2, host);
  double last_loss = 0.0;
  // Between steps the gradients' buffers are released (Module::release_grads), as the trainer does;
  // KRAKEN_BENCH_ZERO_GRADS=1 zeroes them in place instead (zero_grad), to measure what that saves.
  const char* zero_env = std::getenv("KRAKEN_BENCH_ZERO_GRADS");
  const bool zero_grads_in_place = zero_env && std::strcmp(zero_env, "1") == 0;
  // Where the GPU waits for the host: the host's time to issue the forward and the backward against the
  // GPU's time from the step's first kernel to the end of each (events on the compute stream, recorded
  // as the host passes). A phase whose GPU time is no longer than its host time kept the GPU waiting.
  // With --accumulate A, a step is A micro-batches' forward and backward (each loss scaled by 1/A, as the
  // trainer's grad_accum: the gradients add up in the f32 masters' buffers), then one update; the host /
  // GPU columns sum the micro-batches'.
  using Clock = std::chrono::steady_clock;
  double host_forward = 0.0, host_backward = 0.0, gpu_forward = 0.0, gpu_backward = 0.0;
  const int64_t A = o.accumulate;
  const float micro_scale = 1.0f / static_cast<float>(A);
  std::vector<cudaEvent_t> marks(static_cast<size_t>(3 * A));
  for (cudaEvent_t& e : marks) BENCH_CUDA(cudaEventCreate(&e));
  bool timed = false;
  auto step = [&] {
    Tensor loss;
    for (int64_t a = 0; a < A; ++a) {
      cudaEvent_t* m = marks.data() + 3 * a;
      const auto h0 = Clock::now();
      if (timed) BENCH_CUDA(cudaEventRecord(m[0], nullptr));
      loss = A == 1 ? model.loss(x, y) : model.loss(x, y, nullptr, true, micro_scale);
      const auto h1 = Clock::now();
      if (timed) BENCH_CUDA(cudaEventRecord(m[1], nullptr));
      kraken::runtime::backward(A == 1 ? loss : kraken::runtime::ops::scale(loss, micro_scale));
      const auto h2 = Clock::now();
      if (timed) {
        BENCH_CUDA(cudaEventRecord(m[2], nullptr));
        host_forward += std::chrono::duration<double>(h1 - h0).count();
        host_backward += std::chrono::duration<double>(h2 - h1).count();
      }
    }
    {
      std::vector<Tensor> grads;
      for (const auto& p : params) grads.push_back(p.tensor.grad());
      // As the trainer does: the clipping factor goes into the update (no separate pass scaling every
      // gradient).
      const double norm = kraken::optim::global_grad_norm(grads);  // (waits for the backward)
      // Read here, as the trainer does, the loss adds no second wait, and the update and the next step's
      // forward are queued behind each other with the GPU never idle between them.
      last_loss = loss.item();
      opt.step(grads, 6e-4f, static_cast<float>(kraken::optim::clip_coefficient(norm, 1.0)));
    }
    model.set_compute_copies_current(optimizer_writes_copies);  // the step rewrote them
    // As the trainer does (KRAKEN_BENCH_ZERO_GRADS=1: zeroed in place instead, for the A/B).
    if (zero_grads_in_place) model.zero_grad();
    else model.release_grads();
    if (timed) {
      for (int64_t a = 0; a < A; ++a) {
        const cudaEvent_t* m = marks.data() + 3 * a;
        float f = 0.0f, b = 0.0f;
        BENCH_CUDA(cudaEventElapsedTime(&f, m[0], m[1]));
        BENCH_CUDA(cudaEventElapsedTime(&b, m[1], m[2]));
        gpu_forward += 1e-3 * f, gpu_backward += 1e-3 * b;
      }
    }
  };
  // The host probe's operands (below) exist from the start, so that the allocator's cache holds what the
  // steps need when the probe runs one more; the peak reported leaves them out.
  const int64_t probe_rows = 8 * 1024, probe_k = 768, probe_cols = 32 * probe_k;
  Tensor probe_a, probe_w, probe_out;
  int64_t probe_bytes = 0;
  if (o.host_probe) {
    const int64_t before = kraken::runtime::device_allocator_stats(0).bytes_in_use;
    probe_a = normal({probe_rows, probe_k}, 40), probe_w = normal({probe_cols, probe_k}, 41),
    probe_out = normal({probe_rows, probe_cols}, 42);
    probe_bytes = kraken::runtime::device_allocator_stats(0).bytes_in_use - before;
  }
  for (int i = 0; i < o.warmup; ++i) step();
  kraken::runtime::synchronize(gpu);
  const int64_t mallocs_before = kraken::runtime::device_allocator_stats(0).system_allocations;
  const auto t0 = Clock::now();
  const kraken::runtime::MemoryTraffic traffic_before = kraken::runtime::memory_traffic();
  timed = true;
  // The timed steps are what a profiler started with collection off (ncu --profile-from-start off:
  // tools/gpu-profile.sh) records: steady-state steps, after the warm-up's first allocations, plans and
  // gradients. (Without a profiler these do nothing; their status is not the benchmark's concern.)
  (void)cudaProfilerStart();
  for (int i = 0; i < o.steps; ++i) step();
  kraken::runtime::synchronize(gpu);
  (void)cudaProfilerStop();
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count() / o.steps;
  // Passes the runtime makes outside kernels (cudaMemcpyAsync, cudaMemsetAsync: a profile of kernels does
  // not list them), per step.
  const kraken::runtime::MemoryTraffic traffic = kraken::runtime::memory_traffic() - traffic_before;
  for (cudaEvent_t& e : marks) cudaEventDestroy(e);
  const kraken::runtime::AllocatorStats mem = kraken::runtime::device_allocator_stats(0);  // before the extras below
  // cudaMallocs the timed steps made: 0 in a steady state; more near the device's capacity, where the
  // allocator gives free segments back to make room (runtime/block_pool.h: cudaFree synchronises).
  const double mallocs_per_step = static_cast<double>(mem.system_allocations - mallocs_before) / o.steps;
  // The host's own cost of issuing the forward and the backward: ~100 ms of queued fp32 products, then
  // the forward and the backward of one more step, so that the host never waits for the GPU unless they
  // synchronise (an issue time near the queued work's would say one does) — or unless the launches fill
  // the stream's queue: it holds about 1,000 kernels, and a launch beyond that waits for the oldest to
  // finish. Hence 16 long products (~6 ms each on an H200) rather than many short ones; a step of more
  // launches than the room left still reads as waiting (the Kraken preset's backward, which launches
  // ~1,600 kernels a step, may have, behind 128 products: bench/RESULTS.md). (Until the ids and the
  // targets came from the host, the forward waited twice for the GPU to check them: then only the
  // backward was timed so.)
  char busy[48] = "-";
  if (o.host_probe) {
    timed = false;
    for (int i = 0; i < 16; ++i)  // about 6 ms each on an H200
      kraken::kernels::matmul_cuda(probe_out.data<float>(), probe_a.data<float>(), probe_w.data<float>(), probe_rows,
                                   probe_cols, probe_k, false, true, 1.0f, 0.0f, nullptr);
    const auto h0 = Clock::now();
    Tensor loss = model.loss(x, y);
    const auto h1 = Clock::now();
    kraken::runtime::backward(loss);
    std::snprintf(busy, sizeof busy, "%.1f + %.1f", 1e3 * std::chrono::duration<double>(h1 - h0).count(),
                  1e3 * std::chrono::duration<double>(Clock::now() - h1).count());
    if (zero_grads_in_place) model.zero_grad();
    else model.release_grads();
    kraken::runtime::synchronize(gpu);
  }
  const double tokens_per_s = static_cast<double>(A * B * T) / seconds;
  const double achieved = c.training_flops_per_token(T) * tokens_per_s;
  const double achieved_full_attention = c.full_attention_training_flops_per_token(T) * tokens_per_s;
  char mfu[48];
  if (dev.peak_flops > 0)
    std::snprintf(mfu, sizeof mfu, "%.2f%% / %.2f%%", 100.0 * achieved / dev.peak_flops,
                  100.0 * achieved_full_attention / dev.peak_flops);
  else std::snprintf(mfu, sizeof mfu, "n/a");
  // The bf16 rows name the attention kernels their heads take (kernels/attention.h).
  std::string precision = compute == DType::BF16 ? "bf16" : "fp32";
  if (compute == DType::BF16)
    precision += ", attention " + kraken::kernels::attention_bf16_kernels_label(c.head_size());
  const double n = o.steps;
  // B×T, or A×B×T with micro-batches
  const std::string shape = (A > 1 ? std::to_string(A) + "×" : "") + std::to_string(B) + "×" + std::to_string(T);
  r.line("| %s | %s | %.1fM | %s | %.1f | %.0f | %.1f | %s | %.1f / %.1f | %.1f / %.1f (%s) | %.2f / %.2f, %.3g | "
         "%.1f | %.1f / %.3g | %.3f |",
         label, precision.c_str(), c.parameter_count() / 1e6, shape.c_str(),
         seconds * 1e3, tokens_per_s, achieved / 1e12, mfu, 1e3 * host_forward / n, 1e3 * gpu_forward / n,
         1e3 * host_backward / n, 1e3 * gpu_backward / n, busy, traffic.copied_bytes / n / 1e9,
         traffic.zeroed_bytes / n / 1e9, static_cast<double>(traffic.host_waits) / n,
         (mem.peak_bytes_in_use - probe_bytes) / 1e9,
         (mem.bytes_reserved - probe_bytes) / 1e9, mallocs_per_step, last_loss);

  // --timeline: one more step, under CUPTI (after the row: its numbers are the timed steps' alone).
  if (o.timeline) {
    const std::string what = std::string(label) + ", " + precision + ", B = " + std::to_string(B);
#if KRAKEN_BENCH_CUPTI
    try {
      kraken::bench::KernelTimeline timeline;
      timed = false;
      timeline.start();
      const auto h0 = Clock::now();
      step();
      std::vector<kraken::bench::Span> spans = timeline.stop();  // (synchronises)
      const double step_ms = 1e3 * std::chrono::duration<double>(Clock::now() - h0).count();
      for (std::string& line : timeline_lines(what, step_ms, seconds * 1e3, spans)) timelines.push_back(std::move(line));
    } catch (const std::exception& e) {
      timelines.push_back("**" + what + "**: no timeline: " + e.what());
      timelines.push_back("");
    }
#else
    timelines.push_back("**" + what + "**: no timeline: gpu_train_bench was built without CUPTI.");
    timelines.push_back("");
#endif
  }
}

void bench_kernels(const DeviceInfo& dev, Report& r) {
  using namespace kraken::kernels;
  const int64_t N = 8 * 1024, C = 768, Vp = 50304, V = 50257, P = 124475904;
  // A row whose launcher may decline the shape (returns false, nothing done) clears `launched` in its timed
  // call; the row then says so instead of timing nothing.
  bool launched = true;
  auto row = [&](const char* name, double bytes, double seconds) {
    if (!launched) {
      r.line("| %s | declined by its launcher: not timed | | | |", name);
      launched = true;
      return;
    }
    r.line("| %s | %.1f | %.3f | %.0f | %.0f%% |", name, bytes / 1e6, seconds * 1e3, bytes / seconds / 1e9,
           dev.peak_bw > 0 ? 100.0 * bytes / seconds / dev.peak_bw : 0.0);
  };
  const double f = sizeof(float);
  {
    Tensor x = normal({N, C}, 1), gamma = normal({C}, 2), beta = normal({C}, 3), out = normal({N, C}, 4);
    Tensor mean = normal({N}, 5), rstd = normal({N}, 6), dout = normal({N, C}, 7), dx = normal({N, C}, 8);
    Tensor dgamma = normal({C}, 9), dbeta = normal({C}, 10);
    row("layernorm forward (8192×768)", f * (2.0 * N * C + 2 * N),
        time_kernel([&] { layernorm_forward_cuda(out.data<float>(), mean.data<float>(), rstd.data<float>(), x.data<float>(),
                                                 gamma.data<float>(), beta.data<float>(), N, C, 1e-5f, nullptr); }));
    // One pass (C = 768 is within the fused kernel's reach): reads dout, x and dx (as dx_in), writes dx;
    // dgamma/dbeta from the same reads.
    row("layernorm backward", f * (4.0 * N * C + 2 * N),
        time_kernel([&] { layernorm_backward_cuda(dx.data<float>(), dx.data<float>(), dgamma.data<float>(), dbeta.data<float>(),
                                                  dout.data<float>(), x.data<float>(), gamma.data<float>(),
                                                  mean.data<float>(), rstd.data<float>(), N, C, nullptr); }));
  }
  {
    const int64_t n = N * 4 * C;
    Tensor x = normal({n}, 11), out = normal({n}, 12), dout = normal({n}, 13), dx = normal({n}, 14);
    row("GELU forward (8192×3072)", f * 2.0 * n, time_kernel([&] { gelu_forward_cuda(out.data<float>(), x.data<float>(), n, nullptr); }));
    row("GELU backward", f * 4.0 * n,
        time_kernel([&] { gelu_backward_cuda(dx.data<float>(), x.data<float>(), dout.data<float>(), n, nullptr); }));
  }
  {  // the same kernels with bf16 activations (mixed precision): half the bytes, the same f32 arithmetic
    const double h = 2.0;
    auto bf16 = [](const Tensor& t) { return t.to(DType::BF16); };
    const int64_t n = N * 4 * C;
    Tensor x = bf16(normal({N, C}, 60)), a = bf16(normal({N, C}, 61)), out = bf16(normal({N, C}, 62));
    Tensor s = bf16(normal({N, C}, 63)), dout = bf16(normal({N, C}, 64)), dx = bf16(normal({N, C}, 65));
    Tensor gamma = normal({C}, 66), beta = normal({C}, 67), mean = normal({N}, 68), rstd = normal({N}, 69);
    Tensor dgamma = normal({C}, 70), dbeta = normal({C}, 71);
    row("bf16 layernorm forward", h * 2.0 * N * C + f * 2 * N,
        time_kernel([&] { layernorm_forward_bf16_cuda(out.data<uint16_t>(), mean.data<float>(), rstd.data<float>(),
                                                      x.data<uint16_t>(), gamma.data<float>(), beta.data<float>(), N, C,
                                                      1e-5f, nullptr); }));
    row("bf16 residual add + layernorm forward (fused)", h * 4.0 * N * C + f * 2 * N,
        time_kernel([&] { add_layernorm_forward_bf16_cuda(s.data<uint16_t>(), out.data<uint16_t>(), mean.data<float>(),
                                                          rstd.data<float>(), x.data<uint16_t>(), a.data<uint16_t>(),
                                                          gamma.data<float>(), beta.data<float>(), N, C, 1e-5f,
                                                          nullptr); }));
    // dx = dx_in + …: reads dout, x and dx_in, writes dx; dgamma and dbeta come from the same reads. (Rows
    // recorded before the fifth session's LayerNorm change counted their separate pass: 6 × N·C bytes.)
    // Without another path's gradient (dx_in null) dx is only written, where the ninth session's ops
    // zeroed it first and the kernel read it back. Then again at the Kraken preset's shape at B = 64: one
    // sub-layer's (64·1024) × 504 block.
    row("bf16 layernorm backward (dx, dgamma, dbeta in one pass)", h * 4.0 * N * C + f * 2 * N,
        time_kernel([&] { layernorm_backward_bf16_cuda(dx.data<uint16_t>(), s.data<uint16_t>(), dgamma.data<float>(),
                                                       dbeta.data<float>(), dout.data<uint16_t>(), x.data<uint16_t>(),
                                                       gamma.data<float>(), mean.data<float>(), rstd.data<float>(), N, C,
                                                       nullptr); }));
    row("bf16 layernorm backward, dx written only (no dx_in)", h * 3.0 * N * C + f * 2 * N,
        time_kernel([&] { layernorm_backward_bf16_cuda(dx.data<uint16_t>(), nullptr, dgamma.data<float>(),
                                                       dbeta.data<float>(), dout.data<uint16_t>(), x.data<uint16_t>(),
                                                       gamma.data<float>(), mean.data<float>(), rstd.data<float>(), N, C,
                                                       nullptr); }));
    {
      // GPT-2's attention and MLP projection biases at B = 64 (65536 rows × 768): their gradient Σ_rows ds
      // summed in the LayerNorm backward's pass (ops::add_bias_layernorm) against the LayerNorm backward and
      // then the column sums of its dx (what the product's backward did) — same bytes counted for both, so
      // the second row's GB/s are the useful ones.
      const int64_t rows = 64 * 1024, width = 768;
      Tensor gx = bf16(normal({rows, width}, 91)), gdout = bf16(normal({rows, width}, 92));
      Tensor gin = bf16(normal({rows, width}, 93)), gdx = bf16(normal({rows, width}, 94));
      Tensor ggamma = normal({width}, 95), gmean = normal({rows}, 96), grstd = normal({rows}, 97);
      Tensor gdgamma = normal({width}, 98), gdbeta = normal({width}, 99), gdbias = bf16(normal({width}, 100));
      const double bytes = h * 4.0 * rows * width + f * 2 * rows;
      row("bf16 layernorm backward + bias gradient in one pass, 65536×768 (GPT-2 B = 64)", bytes, time_kernel([&] {
            const LayerNormGroupGradients one{ggamma.data<float>(), gdgamma.data<float>(), gdbeta.data<float>()};
            launched &= layernorm_backward_summing_dx_bf16_cuda(
                gdx.data<uint16_t>(), gin.data<uint16_t>(), &one, 1, gdbias.data<uint16_t>(), gdout.data<uint16_t>(),
                gx.data<uint16_t>(), gmean.data<float>(), grstd.data<float>(), rows, width, nullptr);
          }));
      row("bf16 layernorm backward, then the bias gradient's column sums, 65536×768", bytes, time_kernel([&] {
            layernorm_backward_bf16_cuda(gdx.data<uint16_t>(), gin.data<uint16_t>(), gdgamma.data<float>(),
                                         gdbeta.data<float>(), gdout.data<uint16_t>(), gx.data<uint16_t>(),
                                         ggamma.data<float>(), gmean.data<float>(), grstd.data<float>(), rows, width,
                                         nullptr);
            sum_rows_bf16_cuda(gdbias.data<uint16_t>(), gdx.data<uint16_t>(), rows, width, nullptr);
          }));
      // The same at GPT-2's shape at degree 4, B = 32 (4 sub-layers × 32768 rows × 768): the MLP projections'
      // biases in the next layer's LN1 (grouped), against the grouped backward and the grouped column sums.
      const int64_t G = 4, per_group = 32 * 1024, wrows = G * per_group;
      Tensor wx = bf16(normal({wrows, width}, 105)), wdout = bf16(normal({wrows, width}, 106));
      Tensor win = bf16(normal({wrows, width}, 107)), wdx = bf16(normal({wrows, width}, 108));
      Tensor wmean = normal({wrows}, 109), wrstd = normal({wrows}, 110);
      Tensor wgammas = normal({G, width}, 101), wdgammas = normal({G, width}, 102), wdbetas = normal({G, width}, 103);
      Tensor wdbias = bf16(normal({G, width}, 104));
      const double wbytes = h * 4.0 * wrows * width + f * 2 * wrows;
      std::vector<LayerNormGroupGradients> groups;
      for (int64_t g = 0; g < G; ++g)
        groups.push_back({wgammas.data<float>() + g * width, wdgammas.data<float>() + g * width,
                          wdbetas.data<float>() + g * width});
      row("bf16 grouped layernorm backward + bias gradients in one pass, 4 × 32768×768", wbytes, time_kernel([&] {
            launched &= layernorm_backward_summing_dx_bf16_cuda(
                wdx.data<uint16_t>(), win.data<uint16_t>(), groups.data(), G, wdbias.data<uint16_t>(),
                wdout.data<uint16_t>(), wx.data<uint16_t>(), wmean.data<float>(), wrstd.data<float>(), per_group,
                width, nullptr);
          }));
      row("bf16 grouped layernorm backward, then the grouped column sums, 4 × 32768×768", wbytes, time_kernel([&] {
            layernorm_backward_grouped_bf16_cuda(wdx.data<uint16_t>(), win.data<uint16_t>(), groups.data(), G,
                                                 wdout.data<uint16_t>(), wx.data<uint16_t>(), wmean.data<float>(),
                                                 wrstd.data<float>(), per_group, width, nullptr);
            sum_rows_grouped_bf16_cuda(wdbias.data<uint16_t>(), wdx.data<uint16_t>(), G, per_group, width, nullptr);
          }));
    }
    {
      const int64_t rows = 64 * 1024, width = 504;
      Tensor kx = bf16(normal({rows, width}, 80)), kdout = bf16(normal({rows, width}, 81));
      Tensor kin = bf16(normal({rows, width}, 82)), kdx = bf16(normal({rows, width}, 83));
      Tensor kgamma = normal({width}, 84), kmean = normal({rows}, 85), krstd = normal({rows}, 86);
      Tensor kdgamma = normal({width}, 87), kdbeta = normal({width}, 88);
      row("bf16 layernorm backward, 65536×504 (Kraken B = 64)", h * 4.0 * rows * width + f * 2 * rows,
          time_kernel([&] { layernorm_backward_bf16_cuda(kdx.data<uint16_t>(), kin.data<uint16_t>(),
                                                         kdgamma.data<float>(), kdbeta.data<float>(),
                                                         kdout.data<uint16_t>(), kx.data<uint16_t>(),
                                                         kgamma.data<float>(), kmean.data<float>(), krstd.data<float>(),
                                                         rows, width, nullptr); }));
      // A Kraken layer's four sub-layers at B = 8 (4 × 8192 rows, the same buffers' first quarter), one call
      // per sub-layer against one grouped call (kernels/layernorm.h): 256 chunks of 32 rows a call fill
      // under half the blocks an H100 holds at once.
      const int64_t G = 4, group_rows = 8192;
      Tensor group_dgamma = normal({G, width}, 89), group_dbeta = normal({G, width}, 90);
      std::vector<LayerNormGroupGradients> groups;
      for (int64_t g = 0; g < G; ++g)
        groups.push_back({kgamma.data<float>(), group_dgamma.data<float>() + g * width,
                          group_dbeta.data<float>() + g * width});
      row("bf16 layernorm backward, 4 × 8192×504 (Kraken B = 8), one call per sub-layer",
          h * 4.0 * G * group_rows * width + f * 2 * G * group_rows, time_kernel([&] {
            for (int64_t g = 0; g < G; ++g) {
              const int64_t e = g * group_rows * width;
              layernorm_backward_bf16_cuda(kdx.data<uint16_t>() + e, kin.data<uint16_t>() + e, groups[g].dgamma,
                                           groups[g].dbeta, kdout.data<uint16_t>() + e, kx.data<uint16_t>() + e,
                                           kgamma.data<float>(), kmean.data<float>() + g * group_rows,
                                           krstd.data<float>() + g * group_rows, group_rows, width, nullptr);
            }
          }));
      row("bf16 layernorm backward, 4 × 8192×504 (Kraken B = 8), grouped",
          h * 4.0 * G * group_rows * width + f * 2 * G * group_rows, time_kernel([&] {
            layernorm_backward_grouped_bf16_cuda(kdx.data<uint16_t>(), kin.data<uint16_t>(), groups.data(), G,
                                                 kdout.data<uint16_t>(), kx.data<uint16_t>(), kmean.data<float>(),
                                                 krstd.data<float>(), group_rows, width, nullptr);
          }));
    }
    {
      // The Kraken preset's residual fork with S summed in it and each sub-layer's LN2 (one call a layer at
      // B = 64: 4 groups of 65536 × 504): reads x and y, writes a, m and LN2's output, and the statistics.
      // The eighteenth session's profile had the kernel then at 663 µs a call (60% of the bandwidth).
      const int64_t G = 4, rows = 64 * 1024, width = 504, elems = G * rows * width;
      Tensor fx = bf16(normal({elems}, 101)), fy = bf16(normal({elems}, 102)), fa = bf16(normal({elems}, 103));
      Tensor fm = bf16(normal({elems}, 104)), fout = bf16(normal({elems}, 105));
      Tensor fgamma = normal({G, width}, 106), fbeta = normal({G, width}, 107);
      Tensor fmean = normal({G * rows}, 108), frstd = normal({G * rows}, 109);
      std::vector<const float*> gammas, betas;
      for (int64_t g = 0; g < G; ++g) {
        gammas.push_back(fgamma.data<float>() + g * width);
        betas.push_back(fbeta.data<float>() + g * width);
      }
      row("bf16 Kraken fork with S summed + LN2, 4 × 65536×504 (Kraken B = 64)", h * 5.0 * elems + f * 2 * G * rows,
          time_kernel([&] {
            if (!residual_fork_summed_layernorm_bf16_cuda(fa.data<uint16_t>(), fm.data<uint16_t>(),
                                                          fout.data<uint16_t>(), fmean.data<float>(),
                                                          frstd.data<float>(), fx.data<uint16_t>(), fy.data<uint16_t>(),
                                                          gammas.data(), betas.data(), G, rows, width, 1e-5f, nullptr))
              std::fprintf(stderr, "gpu_train_bench: the fork with LN2 declined the preset's shape\n"), std::exit(1);
          }));
    }
    {
      // Its backward at GPT-2's width at degree 4 (one call a layer at B = 32: 4 groups of 32768 × 768): LN2's
      // grouped backward writing dm and the summed fork's backward reading it back (7 passes over a stream),
      // against the one pass that keeps dm in registers (5 passes; its dgamma/dbeta slices take 192 KiB of
      // shared memory a block). Each row's bytes are what it moves, so compare the times.
      const int64_t G = 4, rows = 32 * 1024, width = 768, elems = G * rows * width;
      Tensor bda = bf16(normal({elems}, 111)), bdout = bf16(normal({elems}, 112)), bm = bf16(normal({elems}, 113));
      Tensor bdm = bf16(normal({elems}, 114)), bdx = bf16(normal({elems}, 115)), bdy = bf16(normal({elems}, 116));
      Tensor bgamma = normal({G, width}, 117), bdgamma = normal({G, width}, 118), bdbeta = normal({G, width}, 119);
      Tensor bmean = normal({G * rows}, 120), brstd = normal({G * rows}, 121);
      std::vector<LayerNormGroupGradients> groups;
      for (int64_t g = 0; g < G; ++g)
        groups.push_back({bgamma.data<float>() + g * width, bdgamma.data<float>() + g * width,
                          bdbeta.data<float>() + g * width});
      row("bf16 LN2 backward, then the summed fork's, 4 × 32768×768 (GPT-2 at degree 4, B = 32)",
          h * 7.0 * elems + f * 2 * G * rows, time_kernel([&] {
            layernorm_backward_grouped_bf16_cuda(bdm.data<uint16_t>(), nullptr, groups.data(), G,
                                                 bdout.data<uint16_t>(), bm.data<uint16_t>(), bmean.data<float>(),
                                                 brstd.data<float>(), rows, width, nullptr);
            launched &= residual_fork_summed_backward_bf16_cuda(bdx.data<uint16_t>(), bdy.data<uint16_t>(),
                                                                bda.data<uint16_t>(), bdm.data<uint16_t>(), G,
                                                                rows * width, nullptr);
          }));
      row("bf16 LN2 and the summed fork's backward in one pass, 4 × 32768×768", h * 5.0 * elems + f * 2 * G * rows,
          time_kernel([&] {
            if (!residual_fork_summed_layernorm_backward_bf16_cuda(
                    bdx.data<uint16_t>(), bdy.data<uint16_t>(), groups.data(), G, bda.data<uint16_t>(),
                    bdout.data<uint16_t>(), bm.data<uint16_t>(), bmean.data<float>(), brstd.data<float>(), rows,
                    width, nullptr))
              std::fprintf(stderr, "gpu_train_bench: the fork's backward with LN2's declined 4 × 768\n"), std::exit(1);
          }));
    }
    Tensor u = bf16(normal({n}, 72)), gu = bf16(normal({n}, 73)), du = bf16(normal({n}, 74)), gx = bf16(normal({n}, 75));
    row("bf16 GELU forward", h * 2.0 * n,
        time_kernel([&] { gelu_forward_bf16_cuda(gu.data<uint16_t>(), u.data<uint16_t>(), n, nullptr); }));
    row("bf16 GELU backward", h * 4.0 * n,
        time_kernel([&] { gelu_backward_bf16_cuda(gx.data<uint16_t>(), u.data<uint16_t>(), du.data<uint16_t>(), n,
                                                  nullptr); }));
  }
  {
    Tensor logits = normal({N, Vp}, 76).to(DType::BF16), dlogits = Tensor::empty({N, Vp}, DType::BF16, Device::cuda(0));
    Tensor losses = normal({N}, 77), lse = normal({N}, 78), targets = ids(N, 1, V, 4);
    Tensor dloss = Tensor::full({1}, 1.0f, Device::cuda(0));
    row("bf16 cross-entropy forward", 2.0 * N * V + f * 3 * N,
        time_kernel([&] { cross_entropy_forward_bf16_cuda(losses.data<float>(), lse.data<float>(),
                                                          logits.data<uint16_t>(), targets.data<int32_t>(), N, Vp, V, -1,
                                                          nullptr); }));
    row("bf16 cross-entropy backward", 2.0 * N * V + 2.0 * N * Vp + f * 2 * N,
        time_kernel([&] { cross_entropy_backward_bf16_cuda(dlogits.data<uint16_t>(), logits.data<uint16_t>(),
                                                           lse.data<float>(), targets.data<int32_t>(),
                                                           dloss.data<float>(), N, N, Vp, V, -1, nullptr); }));
    // What training runs: both in one pass over the logits, the bytes of one read and one write; then the
    // backward's check of dloss (nothing to rescale). The row's second read from memory or L2, from the
    // shared memory the first pass kept it in (the default), or from shared memory the block filled while
    // it worked on its previous row (kernels/cross_entropy.h).
    for (const auto reads : {CrossEntropyRowReads::kTwice, CrossEntropyRowReads::kStagedInSharedMemory,
                             CrossEntropyRowReads::kPipelined}) {
      row(reads == CrossEntropyRowReads::kTwice ? "bf16 cross-entropy forward + backward in one pass (fused)"
          : reads == CrossEntropyRowReads::kStagedInSharedMemory
              ? "bf16 cross-entropy forward + backward in one pass (fused, row staged)"
              : "bf16 cross-entropy forward + backward in one pass (fused, pipelined)",
          2.0 * N * V + 2.0 * N * Vp + f * 2 * N, time_kernel([&] {
            cross_entropy_fused_bf16_cuda(losses.data<float>(), lse.data<float>(), dlogits.data<uint16_t>(),
                                          logits.data<uint16_t>(), targets.data<int32_t>(), 1.0f, N, N, Vp, V, -1,
                                          nullptr, reads);
            cross_entropy_rescale_bf16_cuda(dlogits.data<uint16_t>(), dloss.data<float>(), dloss.data<float>(),
                                            N * Vp, nullptr);
          }));
    }
  }
  {
    Tensor p = normal({P}, 15, 0.02f), g = normal({P}, 16, 0.01f), m = normal({P}, 17, 0.01f), v = normal({P}, 18, 0.01f);
    {  // v ≥ 0 as a real second moment
      kraken::runtime::NoGrad no_grad;
      v = kraken::runtime::ops::mul(v, v);
    }
    int64_t step = 1;
    row("AdamW (124.5M parameters)", f * 7.0 * P,
        time_kernel([&] { adamw_update_cuda(p.data<float>(), g.data<float>(), m.data<float>(), v.data<float>(), P, 6e-4f,
                                            0.9f, 0.95f, 1e-8f, 0.1f, step++, nullptr); }));
    // The trainer's path: the many-tensor kernel (one slice here), 16-byte accesses.
    const AdamWSlice slice{p.data<float>(), g.data<float>(), m.data<float>(), v.data<float>(), P, 0.1f};
    row("AdamW, many-tensor kernel (what the trainer runs)", f * 7.0 * P,
        time_kernel([&] { adamw_update_many_cuda(&slice, 1, 6e-4f, 0.9f, 0.95f, 1e-8f, step++, nullptr); }));
    // The parameters' casts before each bf16 forward, and their gradients' way back.
    Tensor p16 = Tensor::empty({P}, DType::BF16, Device::cuda(0));
    row("cast f32 → bf16 (124.5M)", f * P + 2.0 * P,
        time_kernel([&] { cast_f32_to_bf16_cuda(p16.data<uint16_t>(), p.data<float>(), P, nullptr); }));
    row("f32 += bf16 (124.5M)", f * 2.0 * P + 2.0 * P,
        time_kernel([&] { accumulate_bf16_cuda(g.data<float>(), p16.data<uint16_t>(), P, nullptr); }));
  }
  {  // The casts as the bf16 model makes them: GPT-2's 97 product weights, one launch per tensor (as the
     // model did) against one launch for all (cast_*_many_cuda, what ops::cast_many runs)
    std::vector<Tensor> masters, copies;
    std::vector<const float*> from32;
    std::vector<float*> to32;
    std::vector<const uint16_t*> from16;
    std::vector<uint16_t*> to16;
    std::vector<int64_t> ns;
    double elements = 0.0;
    auto add = [&](int64_t n) {
      masters.push_back(normal({n}, 90 + masters.size(), 0.02f));
      copies.push_back(Tensor::empty({n}, DType::BF16, Device::cuda(0)));
      from32.push_back(masters.back().data<float>()), to32.push_back(masters.back().data<float>());
      from16.push_back(copies.back().data<uint16_t>()), to16.push_back(copies.back().data<uint16_t>());
      ns.push_back(n), elements += static_cast<double>(n);
    };
    for (int layer = 0; layer < 12; ++layer)
      for (int64_t n : {3 * C * C, 3 * C, C * C, C, 4 * C * C, 4 * C, 4 * C * C, C}) add(n);
    add(Vp * C);
    const int64_t count = static_cast<int64_t>(ns.size());
    const double bytes = (f + 2.0) * elements;
    row("cast f32 → bf16, GPT-2's 97 weights, one launch each", bytes, time_kernel([&] {
          for (int64_t k = 0; k < count; ++k) cast_f32_to_bf16_cuda(to16[k], from32[k], ns[k], nullptr);
        }));
    row("cast f32 → bf16, the same 97 in one launch (cast_many)", bytes,
        time_kernel([&] { cast_f32_to_bf16_many_cuda(to16.data(), from32.data(), ns.data(), count, nullptr); }));
    row("cast bf16 → f32, GPT-2's 97 gradients, one launch each", bytes, time_kernel([&] {
          for (int64_t k = 0; k < count; ++k) cast_bf16_to_f32_cuda(to32[k], from16[k], ns[k], nullptr);
        }));
    row("cast bf16 → f32, the same 97 in one launch (cast_many)", bytes,
        time_kernel([&] { cast_bf16_to_f32_many_cuda(to32.data(), from16.data(), ns.data(), count, nullptr); }));
    // The gradients coming back onto f32 gradients that exist (every step after the first): added in one
    // launch, where the engine casts each into a new tensor and adds it (an axpy of 12 bytes per element).
    row("add bf16 → f32, the same 97 gradients in one launch (accumulate_bf16_many)", (2.0 * f + 2.0) * elements,
        time_kernel([&] { accumulate_bf16_many_cuda(to32.data(), from16.data(), ns.data(), count, nullptr); }));
  }
  {  // GPT-2's first activation: bf16(wte[ids] + wpe[t]) in one pass, and wte's scatter from the bf16 gradient
    // (the bytes: the looked-up f32 rows, wpe's T rows, the bf16 rows out; backward the bf16 gradient,
    // the ids, and a row of wte read and written per position — an upper bound: repeated ids share one)
    const int64_t T = 1024, Vt = 50257;
    Tensor wte = normal({Vt, C}, 81), wpe = normal({T, C}, 82), tokens = ids(N / T, T, Vt, 5);
    Tensor x0 = normal({N, C}, 83).to(DType::BF16), dwte = normal({Vt, C}, 84);
    row("token + position embedding forward, bf16 out (8192×768)", f * (1.0 * N * C + 1.0 * T * C) + 2.0 * N * C + 4.0 * N,
        time_kernel([&] { embedding_positions_forward_bf16_cuda(x0.data<uint16_t>(), wte.data<float>(), wpe.data<float>(),
                                                                tokens.data<int32_t>(), N, T, Vt, C, nullptr); }));
    row("embedding backward from the bf16 gradient (8192×768)", 2.0 * N * C + 4.0 * N + 2.0 * f * N * C,
        time_kernel([&] { embedding_backward_bf16_cuda(dwte.data<float>(), x0.data<uint16_t>(), tokens.data<int32_t>(), N,
                                                       Vt, C, nullptr); }));
    // At GPT-2's B = 64, with uniform ids (as the training rows below feed the model) and with ids as
    // text has them (zipf_ids: a few rows take thousands of positions each; the bytes counted the same).
    const int64_t N64 = 64 * T;
    Tensor dx64 = normal({N64, C}, 85).to(DType::BF16);
    const Tensor uniform64 = ids(64, T, Vt, 6), text64 = zipf_ids(N64, Vt, 7);
    for (const auto& [name, tok] : {std::pair<const char*, const Tensor*>{"uniform ids", &uniform64},
                                    std::pair<const char*, const Tensor*>{"text-like (Zipf) ids", &text64}}) {
      const std::string what = std::string("embedding backward from the bf16 gradient (65536×768, ") + name + ")";
      row(what.c_str(), 2.0 * N64 * C + 4.0 * N64 + 2.0 * f * N64 * C,
          time_kernel([&] { embedding_backward_bf16_cuda(dwte.data<float>(), dx64.data<uint16_t>(),
                                                         tok->data<int32_t>(), N64, Vt, C, nullptr); }));
    }
  }
  // Bias gradients: Σ over B·T rows of dy, the column sums of column_sums.h — c_fc's 3072 columns at B = 8,
  // and GPT-2's four at B = 64 (C, 3C, 4C: what the step's 48 launches run; their chunks follow
  // KRAKEN_CUDA_COLUMN_CHUNKS, kernels/cuda/column_chunks.h).
  for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{N, 4 * C}, std::pair<int64_t, int64_t>{8 * N, C},
                                   std::pair<int64_t, int64_t>{8 * N, 3 * C}, std::pair<int64_t, int64_t>{8 * N, 4 * C}}) {
    Tensor dy = normal({rows, cols}, 79).to(DType::BF16), db = normal({cols}, 80).to(DType::BF16);
    const std::string what = "bf16 bias gradient (sum of " + std::to_string(rows) + " rows × " + std::to_string(cols) + ")";
    row(what.c_str(), 2.0 * rows * cols + 4.0 * cols,
        time_kernel([&] { sum_rows_bf16_cuda(db.data<uint16_t>(), dy.data<uint16_t>(), rows, cols, nullptr); }));
  }
  {
    // c_attn's bias gradient with the keys' third skipped (ops::BiasColumns: its sum is zero), at GPT-2's
    // B = 64 and at its shape at degree 4, B = 32 (4 sub-layers): bytes are what each reads, so the rows'
    // GB/s compare the kernels and their times the saving, against the rows above / the grouped sums.
    const int64_t rows = 8 * N, cols = 3 * C;
    Tensor dy = normal({rows, cols}, 83).to(DType::BF16), db = normal({cols}, 84).to(DType::BF16);
    row("bf16 qkv bias gradient, keys' columns skipped (sum of 65536 rows × 1536 of 2304)",
        2.0 * rows * 2 * C + 4.0 * cols, time_kernel([&] {
          launched &= sum_rows_skipping_bf16_cuda(db.data<uint16_t>(), dy.data<uint16_t>(), 1, rows, cols, C, C, nullptr);
        }));
    const int64_t G = 4, per_group = 4 * N;  // B = 32
    Tensor gdy = normal({G * per_group, cols}, 85).to(DType::BF16), gdb = normal({G * cols}, 86).to(DType::BF16);
    row("bf16 grouped qkv bias gradients, 4 × 32768 rows × 2304", 2.0 * G * per_group * cols + 4.0 * G * cols,
        time_kernel([&] {
          sum_rows_grouped_bf16_cuda(gdb.data<uint16_t>(), gdy.data<uint16_t>(), G, per_group, cols, nullptr);
        }));
    row("bf16 grouped qkv bias gradients, keys' columns skipped, 4 × 32768 rows × 1536 of 2304",
        2.0 * G * per_group * 2 * C + 4.0 * G * cols, time_kernel([&] {
          launched &= sum_rows_skipping_bf16_cuda(gdb.data<uint16_t>(), gdy.data<uint16_t>(), G, per_group, cols, C, C,
                                                  nullptr);
        }));
  }
  {
    // The position embedding's gradient at B = 64: f32 wpe.grad += Σ over the 64 sequences of the bf16
    // gradient, 64 rows of T·C columns — one chunk of column_sums.h, whose totals pass took 0.27 ms of the
    // fifteenth session's step profile before one or two chunks got a thread per column.
    const int64_t rows = 64, cols = 1024 * C;  // T = 1024
    Tensor dx = normal({rows, cols}, 81).to(DType::BF16), dwpe = normal({cols}, 82);
    row("position-embedding gradient, f32 += sum of 64 rows × 786432 bf16 (GPT-2 B = 64)",
        2.0 * rows * cols + 8.0 * cols,
        time_kernel([&] { sum_rows_bf16_to_f32_cuda(dwpe.data<float>(), dx.data<uint16_t>(), rows, cols, nullptr); }));
  }
  {
    Tensor logits = normal({N, Vp}, 19), dlogits = normal({N, Vp}, 20), losses = normal({N}, 21), lse = normal({N}, 22);
    Tensor targets = ids(N, 1, V, 3), dloss = Tensor::full({1}, 1.0f, Device::cuda(0));
    row("cross-entropy forward (8192×50304)", f * (1.0 * N * V + 3 * N),
        time_kernel([&] { cross_entropy_forward_cuda(losses.data<float>(), lse.data<float>(), logits.data<float>(),
                                                     targets.data<int32_t>(), N, Vp, V, -1, nullptr); }));
    row("cross-entropy backward", f * (1.0 * N * V + 1.0 * N * Vp + 2 * N),
        time_kernel([&] { cross_entropy_backward_cuda(dlogits.data<float>(), logits.data<float>(), lse.data<float>(),
                                                      targets.data<int32_t>(), dloss.data<float>(), N, N, Vp, V, -1,
                                                      nullptr); }));
  }
}

// GPT-2's MLP block (c_fc → GELU → c_proj, ops::mlp) in bf16, forward and backward, at every
// EpilogueFusion level (runtime/ops/mlp.cpp): the GELU as its own kernels, in cuBLASLt's epilogues, and the
// bias gradients there too. The weights are bf16 casts of f32 masters, as in the model, and x a bf16
// leaf; the casts, the masters' gradient accumulation and dx's add into x.grad (8192×768 bf16) are in
// every row alike, ~20 µs of memory traffic.
void bench_mlp(Report& r) {
  namespace ops = kraken::runtime::ops;
  const int64_t B = 8, T = 1024, C = 768, H = 4 * C, N = B * T;
  auto master = [](const kraken::runtime::Shape& s, uint64_t seed, float std) {
    Tensor t = normal(s, seed, std);
    t.set_requires_grad(true);
    return t;
  };
  Tensor x = normal({B, T, C}, 50, 1.0f).to(DType::BF16);
  x.set_requires_grad(true);
  Tensor w_fc = master({H, C}, 51, 0.02f), b_fc = master({H}, 52, 0.02f);
  Tensor w_proj = master({C, H}, 53, 0.02f), b_proj = master({C}, 54, 0.02f);
  const Tensor dy = normal({B, T, C}, 55, 1.0f).to(DType::BF16);
  const double flops = 6.0 * 2.0 * N * C * H;  // 2 products forward, 4 backward
  const struct {
    ops::EpilogueFusion level;
    const char* name;
  } levels[] = {{ops::EpilogueFusion::kOff, "GELU and bias gradients as kernels (KRAKEN_CUDA_EPILOGUES=0)"},
                {ops::EpilogueFusion::kGelu, "GELU in the epilogues, bias gradients as column sums (=1, default)"},
                {ops::EpilogueFusion::kGeluAndBiasGrads, "GELU and bias gradients in the epilogues (=2)"},
                {ops::EpilogueFusion::kGeluAndFcBiasGrad, "GELU and c_fc's bias gradient in the epilogues (=3)"}};
  for (const auto& level : levels) {
    ops::EpilogueFusionScope scope(level.level);
    const double s = time_kernel([&] {
      const std::vector<Tensor> w = ops::cast_many({w_fc, b_fc, w_proj, b_proj}, DType::BF16);
      Tensor y = ops::mlp(x, w[0], w[1], w[2], w[3]);
      kraken::runtime::backward(y, dy);
    }, 5);
    r.line("| bf16 MLP block forward + backward, B=8 T=1024 C=768 H=3072, %s | %.3f | %.1f TFLOP/s |", level.name,
           s * 1e3, flops / s / 1e12);
  }
}

// The Kraken 4-way preset's sub-layer products (C = 504, B·T = 8192), one product per sub-layer against
// the four as one strided-batch product (kernels::matmul_bf16_batched_cuda), which the model runs since
// it stacks a layer's sub-layers (the grouped ops): what the stacking gained. The weight gradients are
// the products with few output tiles (504 × 1512 from a K of 8192), where cuBLASLt splits K.
void bench_kraken_products(Report& r) {
  using namespace kraken::kernels;
  const int64_t rows = 8 * 1024, C = 504, k = 4;
  struct Shape {
    const char* name;
    int64_t M, N, K;
    bool ta, tb;
  } shapes[] = {{"c_attn forward (8192×504)·(504×1512)", rows, 3 * C, C, false, true},
                {"c_attn weight gradient (1512×8192)·(8192×504)", 3 * C, C, rows, true, false},
                {"MLP c_proj weight gradient (504×8192)·(8192×1008)", C, 2 * C, rows, true, false},
                // B = 32 and 64: a K four and eight times longer over the same few output tiles (the batched
                // entry point takes one strided batch up to K = 32,768, one product per matrix above)
                {"c_attn weight gradient at B = 32 (1512×32768)·(32768×504)", 3 * C, C, 4 * rows, true, false},
                {"MLP c_proj weight gradient at B = 32 (504×32768)·(32768×1008)", C, 2 * C, 4 * rows, true, false},
                {"c_attn weight gradient at B = 64 (1512×65536)·(65536×504)", 3 * C, C, 8 * rows, true, false},
                {"MLP c_proj weight gradient at B = 64 (504×65536)·(65536×1008)", C, 2 * C, 8 * rows, true, false}};
  for (const Shape& sh : shapes) {
    const int64_t sa = sh.M * sh.K, sb = sh.K * sh.N, so = sh.M * sh.N;
    const Tensor a = normal({k * sa}, 70).to(DType::BF16), b = normal({k * sb}, 71).to(DType::BF16);
    Tensor out = Tensor::empty({k * so}, DType::BF16, Device::cuda(0));
    const double flops = 2.0 * k * sh.M * sh.N * sh.K;
    const double one_each = time_kernel([&] {
      for (int64_t i = 0; i < k; ++i)
        matmul_bf16_cuda(out.data<uint16_t>() + i * so, true, a.data<uint16_t>() + i * sa, b.data<uint16_t>() + i * sb,
                         nullptr, sh.M, sh.N, sh.K, sh.ta, sh.tb, MatmulEpilogue::kNone, nullptr);
    });
    const double batched = time_kernel([&] {
      matmul_bf16_batched_cuda(out.data_ptr(), true, a.data<uint16_t>(), b.data<uint16_t>(), k, sh.M, sh.N, sh.K,
                               sh.ta, sh.tb, so, sa, sb, nullptr);
    });
    r.line("| Kraken 4-way %s, 4 sub-layers: one product each | %.3f | %.1f TFLOP/s |", sh.name, one_each * 1e3,
           flops / one_each / 1e12);
    r.line("| the same 4 through matmul_bf16_batched_cuda (%s) | %.3f | %.1f TFLOP/s |",
           sh.K > 32768 ? "above K = 32,768: one product each" : "one strided-batch product", batched * 1e3,
           flops / batched / 1e12);
  }
}

// Whether the Kraken preset's odd widths cost its products their speed: the step's products at B = 64 (a
// sub-layer's 65536 rows; C = 504, 3C = 1512, 2C = 1008) against the same products with every dimension
// rounded up to a multiple of 64 (512, 1536, 1024), both timed as the step runs them (the forward and
// input-gradient products one strided batch of the 4 sub-layers, each weight gradient one product per
// matrix, K = 65,536). The rate counts the unpadded FLOPs for both rows: where the padded row's is the
// higher, a model holding its widths padded (zero columns that stay zero) would gain that much in these
// products. The eighteenth session measured the preset's products at ~470 TFLOP/s against GPT-2's ~650, the
// dGELU product at 367. A measurement for a decision; the model does not pad.
void bench_kraken_padded_products(Report& r) {
  using namespace kraken::kernels;
  const int64_t rows = 64 * 1024, C = 504, k = 4;
  const auto up = [](int64_t n) { return (n + 63) / 64 * 64; };
  struct Shape {
    const char* name;
    int64_t M, N, K;
    bool ta, tb, batched;
  } shapes[] = {{"c_attn forward (65536×504)·(504×1512)", rows, 3 * C, C, false, true, true},
                {"attention projection forward (65536×504)·(504×504)", rows, C, C, false, true, true},
                {"MLP c_fc forward (65536×504)·(504×1008)", rows, 2 * C, C, false, true, true},
                {"MLP c_proj forward (65536×1008)·(1008×504)", rows, C, 2 * C, false, true, true},
                {"c_attn input gradient (65536×1512)·(1512×504)", rows, C, 3 * C, false, false, true},
                {"MLP c_fc input gradient (65536×1008)·(1008×504)", rows, C, 2 * C, false, false, true},
                {"MLP c_proj input gradient, the dGELU product's shape (65536×504)·(504×1008)", rows, 2 * C, C, false,
                 false, true},
                {"c_attn weight gradient (1512×65536)·(65536×504)", 3 * C, C, rows, true, false, false},
                {"MLP c_fc weight gradient (1008×65536)·(65536×504)", 2 * C, C, rows, true, false, false}};
  for (const Shape& sh : shapes) {
    const double useful = 2.0 * k * sh.M * sh.N * sh.K;
    double ms[2] = {0.0, 0.0};
    for (int padded = 0; padded < 2; ++padded) {
      const int64_t M = padded ? up(sh.M) : sh.M, N = padded ? up(sh.N) : sh.N, K = padded ? up(sh.K) : sh.K;
      const int64_t sa = M * K, sb = K * N, so = M * N;
      const Tensor a = normal({k * sa}, 72).to(DType::BF16), b = normal({k * sb}, 73).to(DType::BF16);
      Tensor out = Tensor::empty({k * so}, DType::BF16, Device::cuda(0));
      ms[padded] = 1e3 * time_kernel([&] {
        if (sh.batched) {
          matmul_bf16_batched_cuda(out.data_ptr(), true, a.data<uint16_t>(), b.data<uint16_t>(), k, M, N, K, sh.ta,
                                   sh.tb, so, sa, sb, nullptr);
        } else {
          for (int64_t i = 0; i < k; ++i)
            matmul_bf16_cuda(out.data<uint16_t>() + i * so, true, a.data<uint16_t>() + i * sa,
                             b.data<uint16_t>() + i * sb, nullptr, M, N, K, sh.ta, sh.tb, MatmulEpilogue::kNone, nullptr);
        }
      }, 5);
    }
    r.line("| Kraken 4-way B = 64, 4 sub-layers' %s: as is / widths padded to 64 | %.3f / %.3f | %.1f / %.1f useful "
           "TFLOP/s |", sh.name, ms[0], ms[1], useful / ms[0] / 1e9, useful / ms[1] / 1e9);
  }
}

// Where GPT-2's shape at degree 4 could lose its bias gradients' column sums (8.4 ms of a 173.5 ms step in
// the twenty-fifth session's H100 profile, 49 launches): each sub-layer's weight and bias gradients at B = 32
// (32768 rows a sub-layer, 4 sub-layers) as the model runs them — the weight gradients one strided batch,
// then every sub-layer's bias gradient in one grouped column-sum launch pair — against one product per
// sub-layer with the bias gradient in cuBLASLt's BGRADB epilogue (matmul_bias_grad_bf16_batched_cuda, what
// the model runs at KRAKEN_CUDA_EPILOGUES=2). A measurement for a decision: gpu-check's wideepi2 variant
// times the steps.
void bench_grouped_bias_gradients(Report& r) {
  using namespace kraken::kernels;
  const int64_t rows = 32 * 1024, G = 4, C = 768;
  struct Shape {
    const char* name;
    int64_t out, in;  // dW (out, in) = dyᵀ·x, dy (rows, out), x (rows, in); db (out) = Σ_rows dy
  } shapes[] = {{"c_attn (2304 × 768)", 3 * C, C},
                {"attention projection (768 × 768)", C, C},
                {"MLP c_fc (3072 × 768)", 4 * C, C},
                {"MLP c_proj (768 × 3072)", C, 4 * C}};
  for (const Shape& sh : shapes) {
    const Tensor dy = normal({G * rows * sh.out}, 74, 0.01f).to(DType::BF16);
    const Tensor x = normal({G * rows * sh.in}, 75).to(DType::BF16);
    Tensor dw = Tensor::empty({G * sh.out * sh.in}, DType::BF16, Device::cuda(0));
    Tensor db = Tensor::zeros({G * sh.out}, DType::BF16, Device::cuda(0));
    const double separate = time_kernel([&] {
      matmul_bf16_batched_cuda(dw.data_ptr(), true, dy.data<uint16_t>(), x.data<uint16_t>(), G, sh.out, sh.in, rows,
                               true, false, sh.out * sh.in, rows * sh.out, rows * sh.in, nullptr);
      sum_rows_grouped_bf16_cuda(db.data<uint16_t>(), dy.data<uint16_t>(), G, rows, sh.out, nullptr);
    }, 5);
    bool fused = true;
    const double epilogue = time_kernel([&] {
      if (fused)
        fused = matmul_bias_grad_bf16_batched_cuda(dw.data<uint16_t>(), db.data<uint16_t>(), dy.data<uint16_t>(),
                                                   x.data<uint16_t>(), G, sh.out, sh.in, rows, true, false,
                                                   sh.out * sh.in, rows * sh.out, rows * sh.in, sh.out, nullptr);
    }, 5);
    if (fused)
      r.line("| GPT-2's shape at degree 4, B = 32, 4 sub-layers' %s weight + bias gradients: batched product + grouped "
             "column sums / a BGRADB product each | %.3f / %.3f | |", sh.name, separate * 1e3, epilogue * 1e3);
    else
      r.line("| GPT-2's shape at degree 4, B = 32, 4 sub-layers' %s weight + bias gradients: batched product + grouped "
             "column sums | %.3f | cuBLASLt has no BGRADB algorithm here |", sh.name, separate * 1e3);
  }
}

void bench_compute(Report& r) {
  using namespace kraken::kernels;
  const int64_t N = 8 * 1024, C = 768;
  bench_mlp(r);
  bench_kraken_products(r);
  bench_kraken_padded_products(r);
  bench_grouped_bias_gradients(r);
  {
    Tensor a = normal({N, C}, 30), w = normal({4 * C, C}, 31), out = normal({N, 4 * C}, 32);
    const double s = time_kernel([&] { matmul_cuda(out.data<float>(), a.data<float>(), w.data<float>(), N, 4 * C, C, false,
                                                   true, 1.0f, 0.0f, nullptr); });
    r.line("| fp32 matmul (8192×768)·(768×3072), cuBLAS SGEMM | %.3f | %.1f TFLOP/s |", s * 1e3, 2.0 * N * 4 * C * C / s / 1e12);
    // The same product in bf16 through cuBLASLt with the bias + GELU epilogue (kernels/cuda/matmul_lt.cu):
    // what the mixed-precision path will start from.
    const Tensor a16 = a.to(DType::BF16), w16 = w.to(DType::BF16), bias16 = normal({4 * C}, 38).to(DType::BF16);
    Tensor out16 = Tensor::empty({N, 4 * C}, DType::BF16, Device::cuda(0));
    const double s16 = time_kernel([&] {
      matmul_bf16_cuda(out16.data_ptr(), true, a16.data<uint16_t>(), w16.data<uint16_t>(), bias16.data_ptr(), N, 4 * C, C,
                       false, true, MatmulEpilogue::kBiasGelu, nullptr);
    });
    r.line("| bf16 matmul, same shape, cuBLASLt with bias + GELU epilogue | %.3f | %.1f TFLOP/s |", s16 * 1e3,
           2.0 * N * 4 * C * C / s16 / 1e12);
  }
  {
    const int64_t B = 8, T = 1024, H = 12;
    Tensor qkv = normal({B, T, 3 * C}, 33), out = normal({B, T, C}, 34), lse = normal({B, H, T}, 35);
    Tensor dout = normal({B, T, C}, 36), dqkv = normal({B, T, 3 * C}, 37);
    // Causal: half of the 4·T²·C multiply-adds of S = q·kᵀ and P·v per sequence (forward), 2.5× that backward.
    const double fwd_flops = 2.0 * B * T * T * C;
    const double fs = time_kernel([&] { attention_forward_cuda(out.data<float>(), lse.data<float>(), qkv.data<float>(), B, T, C, H, nullptr); }, 5);
    const double bs = time_kernel([&] { attention_backward_cuda(dqkv.data<float>(), dout.data<float>(), qkv.data<float>(),
                                                                out.data<float>(), lse.data<float>(), B, T, C, H, nullptr); }, 5);
    r.line("| fused attention forward, B=8 T=1024 C=768 H=12 | %.3f | %.1f TFLOP/s |", fs * 1e3, fwd_flops / fs / 1e12);
    r.line("| fused attention backward | %.3f | %.1f TFLOP/s |", bs * 1e3, 2.5 * fwd_flops / bs / 1e12);
    // bf16 storage (mixed precision), the same shape and FLOP counts: the two tensor-core families (bf16
    // products, f32 accumulation: kernels/cuda/attention_mma.cu with the scores in registers,
    // attention_tc.cu through WMMA) and the CUDA-core kernels. Then one sub-layer of the Kraken 4-way
    // preset on both tensor-core families: C = 504, 3 heads of D = 168 (padded to 176 by mma, to 192 by
    // WMMA); the model runs four of these per layer.
    const Tensor qkv16 = qkv.to(DType::BF16), dout16 = dout.to(DType::BF16);
    Tensor out16 = out.to(DType::BF16), dqkv16 = dqkv.to(DType::BF16);
    struct Bf16Attention {
      const char* name;
      decltype(&attention_forward_bf16_mma_cuda) forward;
      decltype(&attention_backward_bf16_mma_cuda) backward;
    };
    const Bf16Attention paths[] = {
        {"tensor cores, mma.sync", attention_forward_bf16_mma_cuda, attention_backward_bf16_mma_cuda},
        {"tensor cores, WMMA", attention_forward_bf16_tc_cuda, attention_backward_bf16_tc_cuda},
        {"CUDA cores (simt)", attention_forward_bf16_simt_cuda, attention_backward_bf16_simt_cuda}};
    for (const Bf16Attention& path : paths) {
      const double f16 = time_kernel([&] {
        path.forward(out16.data<uint16_t>(), lse.data<float>(), qkv16.data<uint16_t>(), B, T, C, H, nullptr);
      }, 5);
      // (the forward just wrote out and lse: the backward runs on real probabilities)
      const double b16 = time_kernel([&] {
        path.backward(dqkv16.data<uint16_t>(), dout16.data<uint16_t>(), qkv16.data<uint16_t>(), out16.data<uint16_t>(),
                      lse.data<float>(), B, T, C, H, nullptr);
      }, 5);
      r.line("| bf16 attention forward, %s, B=8 T=1024 C=768 H=12 | %.3f | %.1f TFLOP/s |", path.name, f16 * 1e3,
             fwd_flops / f16 / 1e12);
      r.line("| bf16 attention backward, %s | %.3f | %.1f TFLOP/s |", path.name, b16 * 1e3,
             2.5 * fwd_flops / b16 / 1e12);
    }
    // cuDNN's fused flash attention (kernels/cuda/attention_cudnn.cu) on the same buffers: a row each way,
    // or why cuDNN refused the shape. Its first call per shape builds (and caches) the plan: time_kernel's
    // untimed first call.
    const auto cudnn_rows = [&](const char* label, int64_t Bc, int64_t Tc, int64_t Cc, int64_t Hc, const Tensor& q,
                                Tensor& o, Tensor& l, const Tensor& dO, Tensor& dq, double flops) {
      std::string why = attention_bf16_cudnn_why_not(Bc, Tc, Cc, Hc);
      double fc = 0.0, bc = 0.0;
      if (why.empty()) {
        try {
          fc = time_kernel([&] {
            attention_forward_bf16_cudnn_cuda(o.data<uint16_t>(), l.data<float>(), q.data<uint16_t>(), Bc, Tc, Cc, Hc,
                                              nullptr);
          }, 5);
          bc = time_kernel([&] {
            attention_backward_bf16_cudnn_cuda(dq.data<uint16_t>(), dO.data<uint16_t>(), q.data<uint16_t>(),
                                               o.data<uint16_t>(), l.data<float>(), Bc, Tc, Cc, Hc, nullptr);
          }, 5);
        } catch (const std::exception& e) {
          why = std::string("failed: ") + e.what();
        }
      }
      if (!why.empty()) {
        std::replace(why.begin(), why.end(), '|', '/');
        std::replace(why.begin(), why.end(), '\n', ' ');
        r.line("| bf16 attention, cuDNN fused, %s | cuDNN: not supported: %s | |", label, why.c_str());
        return;
      }
      r.line("| bf16 attention forward, cuDNN fused (backend API graph), %s | %.3f | %.1f TFLOP/s |", label, fc * 1e3,
             flops / fc / 1e12);
      r.line("| bf16 attention backward, cuDNN fused (deterministic graph, overwrites dqkv), %s | %.3f | %.1f "
             "TFLOP/s |", label, bc * 1e3, 2.5 * flops / bc / 1e12);
    };
    cudnn_rows("B=8 T=1024 C=768 H=12", B, T, C, H, qkv16, out16, lse, dout16, dqkv16, fwd_flops);
    // Hopper's wgmma kernels (kernels/cuda/attention_wgmma.cu; compute capability 9.0 only) on the same
    // buffers as cuDNN's rows, to set beside them. The backward row counts the 2.5 forwards of FLOPs the
    // others do, though it runs 3.5 (S and dP recomputed by both its kernels: no atomics).
    // KRAKEN_BENCH_WGMMA=0 leaves them out: tools/gpu-check.sh sets it where the wgmma tests failed, so that
    // a faulting kernel costs these rows, not the benchmark.
    const char* wgmma_env = std::getenv("KRAKEN_BENCH_WGMMA");
    const bool wgmma_left_out = wgmma_env && std::strcmp(wgmma_env, "0") == 0;
    const auto wgmma_rows = [&](const char* label, int64_t Bc, int64_t Tc, int64_t Cc, int64_t Hc, const Tensor& q,
                                Tensor& o, Tensor& l, const Tensor& dO, Tensor& dq, double flops) {
      if (wgmma_left_out) {
        r.line("| bf16 attention, wgmma, %s | left out (KRAKEN_BENCH_WGMMA=0) | |", label);
        return;
      }
      if (!attention_bf16_wgmma_usable(o.data<uint16_t>(), q.data<uint16_t>(), Cc, Hc)) {
        r.line("| bf16 attention, wgmma, %s | not supported here (compute capability 9.0, D = 64, 128, 168 or 256) "
               "| |", label);
        return;
      }
      // Each kernel as named (the _kernel(s)_ entry points), those KRAKEN_CUDA_WGMMA allows: where gpu-check
      // found the pipelined kernels wrong or hung on this card it sets no-ping-pong or lockstep, and the
      // rows of the kernels it ruled out are left out rather than run.
      const bool pipelined = attention_bf16_wgmma_pipelined_supported(Cc / Hc);
      int left_out = 0;
      struct Forward {
        bool pipelined, ping_pong;
        const char* what;
      };
      for (const Forward& f : {Forward{true, true, "pipelined: producer warpgroup + mbarriers, ping-pong"},
                               Forward{true, false, "pipelined without ping-pong"},
                               Forward{false, false, "lockstep"}}) {
        if (f.pipelined && !pipelined) continue;
        if (!attention_wgmma_kernels_allow(f.pipelined, f.ping_pong)) {
          ++left_out;
          continue;
        }
        const double fw = time_kernel([&] {
          attention_forward_bf16_wgmma_kernel_cuda(o.data<uint16_t>(), l.data<float>(), q.data<uint16_t>(), Bc, Tc, Cc,
                                                   Hc, f.pipelined, f.ping_pong, nullptr);
        }, 5);
        r.line("| bf16 attention forward, wgmma (ours, sm_90a, %s), %s | %.3f | %.1f TFLOP/s |", f.what, label,
               fw * 1e3, flops / fw / 1e12);
      }
      if (attention_bf16_wgmma_backward_usable(dq.data<uint16_t>(), dO.data<uint16_t>(), q.data<uint16_t>(),
                                               o.data<uint16_t>(), Cc, Hc)) {
        // all pipelined, all lockstep, pipelined without the ping-pong turns, and one kernel pipelined with the
        // other lockstep: what each gains on its own
        struct Backward {
          bool dq, kv, ping_pong;
          const char* what;
        };
        for (const Backward& m : {Backward{true, true, true, "pipelined"}, Backward{false, false, false, "lockstep"},
                                  Backward{true, true, false, "pipelined without ping-pong"},
                                  Backward{true, false, true, "dq pipelined, dk/dv lockstep"},
                                  Backward{false, true, true, "dk/dv pipelined, dq lockstep"}}) {
          if ((m.dq || m.kv) && !pipelined) continue;
          if (!attention_wgmma_kernels_allow(m.dq || m.kv, m.ping_pong)) {
            ++left_out;
            continue;
          }
          const double bm = time_kernel([&] {
            attention_backward_bf16_wgmma_kernels_cuda(dq.data<uint16_t>(), dO.data<uint16_t>(), q.data<uint16_t>(),
                                                       o.data<uint16_t>(), l.data<float>(), Bc, Tc, Cc, Hc, m.dq, m.kv,
                                                       m.ping_pong, nullptr);
          }, 5);
          r.line("| bf16 attention backward, wgmma (ours, %s kernels, adds into dqkv; %s), %s | %.3f | %.1f "
                 "TFLOP/s |", Cc / Hc == 256 ? "three (dV, dK, dq)" : "two", m.what, label, bm * 1e3,
                 2.5 * flops / bm / 1e12);
        }
      }
      if (left_out > 0)
        r.line("| bf16 attention, wgmma, %s | %d rows left out: KRAKEN_CUDA_WGMMA=%s | |", label, left_out,
               attention_wgmma_kernels() == AttentionWgmmaKernels::kLockstep ? "lockstep" : "no-ping-pong");
    };
    wgmma_rows("B=8 T=1024 C=768 H=12", B, T, C, H, qkv16, out16, lse, dout16, dqkv16, fwd_flops);
    {
      const int64_t Ck = 504, Hk = 3;
      const Tensor qkv_k = normal({B, T, 3 * Ck}, 39).to(DType::BF16), dout_k = normal({B, T, Ck}, 40).to(DType::BF16);
      Tensor out_k = Tensor::empty({B, T, Ck}, DType::BF16, Device::cuda(0));
      Tensor dqkv_k = normal({B, T, 3 * Ck}, 41).to(DType::BF16);
      const double flops_k = 2.0 * B * T * T * Ck;
      for (size_t i = 0; i < 2; ++i) {  // the two tensor-core families
        const Bf16Attention& path = paths[i];
        const double fk = time_kernel([&] {
          path.forward(out_k.data<uint16_t>(), lse.data<float>(), qkv_k.data<uint16_t>(), B, T, Ck, Hk, nullptr);
        }, 5);
        const double bk = time_kernel([&] {
          path.backward(dqkv_k.data<uint16_t>(), dout_k.data<uint16_t>(), qkv_k.data<uint16_t>(),
                        out_k.data<uint16_t>(), lse.data<float>(), B, T, Ck, Hk, nullptr);
        }, 5);
        r.line("| bf16 attention forward, %s, one Kraken 4-way sub-layer: C=504 H=3 (D=168) | %.3f | %.1f "
               "TFLOP/s |", path.name, fk * 1e3, flops_k / fk / 1e12);
        r.line("| bf16 attention backward, %s, D=168 | %.3f | %.1f TFLOP/s |", path.name, bk * 1e3,
               2.5 * flops_k / bk / 1e12);
      }
      cudnn_rows("one Kraken 4-way sub-layer: C=504 H=3 (D=168)", B, T, Ck, Hk, qkv_k, out_k, lse, dout_k, dqkv_k,
                 flops_k);
      wgmma_rows("one Kraken 4-way sub-layer: C=504 H=3 (D=168)", B, T, Ck, Hk, qkv_k, out_k, lse, dout_k, dqkv_k,
                 flops_k);
      // A layer's 4 sub-layers in one grouped mma launch (attention_*_bf16_mma_group_cuda; the model, which
      // stacks its sub-layers, runs them as one attention over 4·B sequences), against 4 launches (4 × the
      // single sub-layer's time above).
      constexpr int kSubLayers = 4;
      std::vector<Tensor> q4, o4, d4, g4, l4;
      for (int k = 0; k < kSubLayers; ++k) {
        q4.push_back(qkv_k.clone()), o4.push_back(out_k.clone()), d4.push_back(dout_k.clone());
        g4.push_back(dqkv_k.clone()), l4.push_back(Tensor::empty({B, Hk, T}, DType::F32, Device::cuda(0)));
      }
      std::vector<uint16_t*> outs, dqkvs;
      std::vector<float*> lses;
      std::vector<const uint16_t*> qkvs, douts, outs_c;
      std::vector<const float*> lses_c;
      for (int k = 0; k < kSubLayers; ++k) {
        outs.push_back(o4[k].data<uint16_t>()), lses.push_back(l4[k].data<float>());
        qkvs.push_back(q4[k].data<uint16_t>()), douts.push_back(d4[k].data<uint16_t>());
        dqkvs.push_back(g4[k].data<uint16_t>()), outs_c.push_back(o4[k].data<uint16_t>());
        lses_c.push_back(l4[k].data<float>());
      }
      const double fg = time_kernel([&] {
        attention_forward_bf16_mma_group_cuda(outs.data(), lses.data(), qkvs.data(), kSubLayers, B, T, Ck, Hk, nullptr);
      }, 5);
      const double bg = time_kernel([&] {
        attention_backward_bf16_mma_group_cuda(dqkvs.data(), douts.data(), qkvs.data(), outs_c.data(), lses_c.data(),
                                               kSubLayers, B, T, Ck, Hk, nullptr);
      }, 5);
      r.line("| bf16 attention forward, mma.sync, a Kraken 4-way layer's 4 sub-layers in one launch | %.3f | %.1f "
             "TFLOP/s |", fg * 1e3, kSubLayers * flops_k / fg / 1e12);
      r.line("| bf16 attention backward, mma.sync, 4 sub-layers in one launch | %.3f | %.1f TFLOP/s |", bg * 1e3,
             2.5 * kSubLayers * flops_k / bg / 1e12);
    }
    {
      // GPT-2's shape at degree 4: a sub-layer's 3 heads of D = 256 (30.1 ms of cuDNN's attention in the
      // twenty-fifth session's H100 profile at B = 32, its backward at ~260 TFLOP/s), cuDNN against the wgmma
      // kernels — whose D = 256 backward (lockstep; dK and dV in two kernels) KRAKEN_CUDA_ATTENTION=wgmma-backward
      // puts beside cuDNN's forward.
      const int64_t Cw = 768, Hw = 3;
      const Tensor qkv_w = normal({B, T, 3 * Cw}, 42).to(DType::BF16), dout_w = normal({B, T, Cw}, 43).to(DType::BF16);
      Tensor out_w = Tensor::empty({B, T, Cw}, DType::BF16, Device::cuda(0));
      Tensor dqkv_w = normal({B, T, 3 * Cw}, 44).to(DType::BF16);
      const double flops_w = 2.0 * B * T * T * Cw;
      const char* label = "one degree-4 sub-layer of GPT-2's shape: C=768 H=3 (D=256)";
      cudnn_rows(label, B, T, Cw, Hw, qkv_w, out_w, lse, dout_w, dqkv_w, flops_w);
      wgmma_rows(label, B, T, Cw, Hw, qkv_w, out_w, lse, dout_w, dqkv_w, flops_w);
    }
  }
}

#endif  // KRAKEN_WITH_CUDA

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  Report r;
  r.open(o.out);
  r.line("## GPU benchmark (bench/gpu_train_bench.cpp)");
  std::string why;
  if (!kraken::runtime::cuda_available(&why)) {
    r.line("skipped: %s", why.c_str());
    return 0;
  }
#if KRAKEN_WITH_CUDA
  const DeviceInfo dev = device_info(o);
  r.blank();
  r.line("device: %s, %d SMs, %.1f GB; peak memory bandwidth %.0f GB/s (memory clock × bus width); dense bf16 peak %s",
         dev.name.c_str(), dev.sms, dev.memory_gb, dev.peak_bw / 1e9,
         dev.peak_flops > 0 ? (std::to_string(static_cast<int>(dev.peak_flops / 1e12)) + " TFLOP/s").c_str()
                            : "unknown (pass --peak-tflops)");
  if (o.model != "none") {  // (--model none: the kernel tables alone)
    r.blank();
    r.line("### Training step (%d timed steps after %d warm-up)", o.steps, o.warmup);
    r.line("The host / GPU columns: ms the host took to issue the forward (backward), and ms the GPU took from the");
    r.line("step's first kernel to the end of it — where the two are close the GPU waited for the host, or the host");
    r.line("for the GPU (a synchronisation, or a stream's launch queue of ~1,000 kernels full); in brackets, the host's");
    r.line("time to issue the forward + the backward behind ~100 ms of queued GPU work (16 launches), which a step free");
    r.line("of synchronisation and of fewer launches than the queue's room never waits for: the host's own cost.");
    r.line("Copies / fills: GB a step the runtime moved outside kernels (copies within the GPU, zero fills:");
    r.line("runtime::memory_traffic), which a profile of kernels does not list; waits: its copies a step that waited for");
    r.line("the GPU (2 expected: the gradient norm and the loss, read on the host). Reserved: what the caching allocator");
    r.line("holds from the driver after the timed steps (blocks of each size kept apart: the peak in use or more);");
    r.line("cudaMalloc a step: its calls to the driver in the timed steps (0 in a steady state).");
    r.blank();
    r.line("MFU: against the dense bf16 peak, with the FLOPs llm.c counts (6·N + 6·L·C·T a token, L·C summed over the");
    r.line("sub-layers: attention over the causal half of the scores) / with attention over all of them and the matrix");
    r.line("parameters only (PaLM's count; these reports' MFU up to the twenty-eighth session). TFLOP/s: llm.c's count.");
    if (o.accumulate > 1)
      r.line("A step: %lld micro-batches' forward and backward, then one update (--accumulate); tokens/s and MFU count "
             "them all.", static_cast<long long>(o.accumulate));
    r.blank();
    r.line("| model | precision | params | (A×)B×T | ms/step | tokens/s | TFLOP/s | MFU: llm.c's / full attention | forward host / GPU ms | "
           "backward host / GPU ms | copies / fills GB, waits | peak GB | reserved GB / cudaMalloc a step | loss |");
    r.line("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
  }
  KrakenConfig gpt2;  // the defaults: L = 12, C = 768, H = 12, T = 1024, degree 1, e = 4, biases, vocab 50257
  KrakenConfig k4;
  k4.n_embd = 504;
  k4.degree = 4;
  k4.mlp_expansion = 2;
  k4.bias = false;
  k4.vocab_size = 50304;
  KrakenConfig k4_768;  // GPT-2's shape, every layer four full-width sub-layers
  k4_768.degree = 4;
  if (o.layers > 0) gpt2.n_layer = k4.n_layer = k4_768.n_layer = o.layers;
  const bool want_gpt2 = o.model == "gpt2" || o.model == "all", want_k4 = o.model == "kraken4" || o.model == "all";
  const bool want_k4_768 = o.model == "kraken4-768";
  std::vector<std::string> timelines;  // --timeline's lines, after the table
  for (DType compute : {DType::BF16, DType::F32}) {
    if (o.precision != "all" && o.precision != (compute == DType::BF16 ? "bf16" : "fp32")) continue;
    for (const int64_t B : o.batches) {
      if (compute == DType::F32 && B != o.batches.front()) continue;
      // A batch too large for this device's memory (or any other failure) is a row that says so.
      auto run = [&](const char* label, const KrakenConfig& c) {
        try {
          bench_model(label, c, compute, B, o, dev, r, timelines);
        } catch (const std::exception& e) {
          r.line("| %s | %s | | %lld×%lld | failed: %s | | | | | | | | |", label, compute == DType::BF16 ? "bf16" : "fp32",
                 static_cast<long long>(B), static_cast<long long>(c.context), e.what());
        }
      };
      if (o.layers > 0) {
        const std::string g = "GPT-2 124M shapes, degree 1, L = " + std::to_string(o.layers),
                          k = "Kraken 125M shapes, degree 4, L = " + std::to_string(o.layers);
        const std::string w = "GPT-2 124M shapes, degree 4, L = " + std::to_string(o.layers);
        if (want_gpt2) run(g.c_str(), gpt2);
        if (want_k4) run(k.c_str(), k4);
        if (want_k4_768) run(w.c_str(), k4_768);
        continue;
      }
      if (want_gpt2) run("GPT-2 124M, degree 1", gpt2);
      if (want_k4) run("Kraken 125M, degree 4", k4);
      if (want_k4_768) run("GPT-2 124M's shape, degree 4 (C = 768, D = 256)", k4_768);
    }
  }
  if (!timelines.empty()) {
    r.blank();
    r.line("### One step's timeline (--timeline: CUPTI's records of kernels, copies and fills)");
    r.line("The window runs from the step's first GPU operation to its last; idle is the window less the time some");
    r.line("operation ran. The kernels' times are in the step, beside other work and under its clocks: set them");
    r.line("beside tools/gpu-profile.sh's, which times each kernel alone.");
    r.blank();
    for (const std::string& line : timelines) r.line("%s", line.c_str());
  }
  if (o.training_only) return 0;
  r.blank();
  r.line("### Memory-bound kernels (bytes each must move ÷ time; 10 calls after one warm-up)");
  r.line("| kernel | MB | ms | GB/s | of peak |");
  r.line("|---|---|---|---|---|");
  bench_kernels(dev, r);
  r.blank();
  r.line("### Compute-bound kernels, for context");
  r.line("| kernel | ms | rate |");
  r.line("|---|---|---|");
  bench_compute(r);
#endif
  return 0;
}
