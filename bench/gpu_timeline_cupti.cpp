// KernelTimeline (gpu_timeline.h) on CUPTI's activity API: CUPTI hands us buffers to fill with records of
// the kinds enabled — CONCURRENT_KERNEL (which, unlike KIND_KERNEL, leaves kernels to overlap as they
// would), MEMCPY and MEMSET — and gives them back full, or at a forced flush; each record carries the
// operation's GPU start and end in ns. Built only where CMake found CUPTI (KRAKEN_BENCH_CUPTI).
#include <cupti.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench/gpu_timeline.h"

namespace kraken::bench {
namespace {

std::mutex spans_mutex;
std::vector<Span>* collecting = nullptr;  // the running collector's spans

void check(CUptiResult r, const char* what) {
  if (r == CUPTI_SUCCESS) return;
  const char* text = nullptr;
  cuptiGetResultString(r, &text);
  throw std::runtime_error(std::string("CUPTI: ") + what + ": " + (text ? text : "unknown error"));
}

constexpr size_t kBufferBytes = size_t{8} << 20;  // ~50,000 kernel records a buffer

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *size = *buffer ? kBufferBytes : 0;
  *max_records = 0;  // as many as fit
}

std::string memcpy_name(uint8_t kind, uint64_t bytes) {
  const char* what = kind == CUPTI_ACTIVITY_MEMCPY_KIND_HTOD   ? "host to device"
                     : kind == CUPTI_ACTIVITY_MEMCPY_KIND_DTOH ? "device to host"
                     : kind == CUPTI_ACTIVITY_MEMCPY_KIND_DTOD ? "device to device"
                                                               : "other";
  // Sizes by order of magnitude, so that copies of one kind and size class sum together.
  const char* size = bytes < (1u << 10) ? "< 1 KB" : bytes < (1u << 20) ? "1 KB – 1 MB" : "≥ 1 MB";
  return std::string("memcpy ") + what + " (" + size + ")";
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  std::vector<Span> got;
  CUpti_Activity* record = nullptr;
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    switch (record->kind) {
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
      case CUPTI_ACTIVITY_KIND_KERNEL: {
        const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
        got.push_back({k->start, k->end, short_kernel_name(k->name)});
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMCPY: {
        const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(record);
        got.push_back({m->start, m->end, memcpy_name(m->copyKind, m->bytes)});
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMSET: {
        const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(record);
        got.push_back({m->start, m->end, "memset"});
        break;
      }
      default: break;
    }
  }
  std::free(buffer);
  std::lock_guard<std::mutex> lock(spans_mutex);
  if (collecting) collecting->insert(collecting->end(), got.begin(), got.end());
}

constexpr CUpti_ActivityKind kKinds[] = {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, CUPTI_ACTIVITY_KIND_MEMCPY,
                                         CUPTI_ACTIVITY_KIND_MEMSET};

}  // namespace

KernelTimeline::KernelTimeline() {
  // Once a process: CUPTI takes the callbacks before any activity kind is first enabled.
  static const CUptiResult registered = cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed);
  check(registered, "registering the buffer callbacks");
}

KernelTimeline::~KernelTimeline() {
  std::lock_guard<std::mutex> lock(spans_mutex);
  delete collecting;
  collecting = nullptr;
}

void KernelTimeline::start() {
  if (cudaDeviceSynchronize() != cudaSuccess) throw std::runtime_error("KernelTimeline: the device failed before start");
  {
    std::lock_guard<std::mutex> lock(spans_mutex);
    delete collecting;
    collecting = new std::vector<Span>();
  }
  for (CUpti_ActivityKind kind : kKinds) check(cuptiActivityEnable(kind), "enabling an activity kind");
}

std::vector<Span> KernelTimeline::stop() {
  if (cudaDeviceSynchronize() != cudaSuccess) throw std::runtime_error("KernelTimeline: the device failed in the step");
  for (CUpti_ActivityKind kind : kKinds) check(cuptiActivityDisable(kind), "disabling an activity kind");
  check(cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED), "flushing the records");
  std::lock_guard<std::mutex> lock(spans_mutex);
  std::vector<Span> out = collecting ? std::move(*collecting) : std::vector<Span>();
  delete collecting;
  collecting = nullptr;
  return out;
}

}  // namespace kraken::bench
