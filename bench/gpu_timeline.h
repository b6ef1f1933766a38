// Where a GPU step's wall time goes between its kernels: the spans CUPTI records for one step (kernels,
// copies, fills, each with its GPU start and end), summed into busy time, idle gaps and per-kernel totals.
//
// Why: ncu times each kernel alone (tools/gpu-profile.sh), and the Kraken models' steps run ~13% longer
// than those sums (bench/RESULTS.md, twenty-second session: the preset 180 ms against 159 of kernels, on an
// H200; GPT-2 ~6%, 109.7 against 103.5 on an H100 in the eighteenth). Either the GPU idles between
// kernels (the host late, a synchronisation) or kernels run slower in a step than alone (clocks under the
// power cap, caches). The timeline tells the two apart:
// idle time is the window less the union of the spans; in-step durations compare with ncu's per kernel.
//
// summarize_timeline is plain C++ (tested on the CPU: tests/bench); KernelTimeline, the CUPTI collector,
// exists where the build found CUPTI (KRAKEN_BENCH_CUPTI, bench/CMakeLists.txt).
#pragma once

#include <cxxabi.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace kraken::bench {

struct Span {
  uint64_t start_ns = 0, end_ns = 0;  // GPU timestamps, end ≥ start
  std::string name;                   // a kernel's name, or "memcpy …" / "memset"
};

struct Gap {
  uint64_t start_ns = 0, length_ns = 0;
  std::string before, after;  // the span that ended last before it, the one that starts it again
};

struct NameTotal {
  std::string name;
  uint64_t total_ns = 0;
  int64_t count = 0;
};

struct TimelineSummary {
  size_t spans = 0;
  uint64_t window_ns = 0;      // first start to last end
  uint64_t busy_ns = 0;        // the union of the spans (overlapping ones counted once)
  std::vector<Gap> gaps;       // every idle interval inside the window, longest first
  std::vector<NameTotal> by_name;  // every name's summed span time (overlaps not removed), largest first
  uint64_t idle_ns() const { return window_ns - busy_ns; }
};

inline TimelineSummary summarize_timeline(std::vector<Span> spans) {
  TimelineSummary s;
  s.spans = spans.size();
  if (spans.empty()) return s;
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.start_ns != b.start_ns ? a.start_ns < b.start_ns : a.end_ns < b.end_ns;
  });
  std::map<std::string, NameTotal> totals;
  const Span* last = &spans.front();  // the span whose end is the current union segment's end
  uint64_t seg_start = spans.front().start_ns, seg_end = spans.front().end_ns;
  for (const Span& sp : spans) {
    NameTotal& t = totals[sp.name];
    t.name = sp.name;
    t.total_ns += sp.end_ns - sp.start_ns;
    ++t.count;
    if (sp.start_ns > seg_end) {  // idle from seg_end to sp.start
      s.busy_ns += seg_end - seg_start;
      s.gaps.push_back({seg_end, sp.start_ns - seg_end, last->name, sp.name});
      seg_start = sp.start_ns, seg_end = sp.end_ns, last = &sp;
    } else if (sp.end_ns >= seg_end) {
      seg_end = sp.end_ns, last = &sp;
    }
  }
  s.busy_ns += seg_end - seg_start;
  s.window_ns = seg_end - spans.front().start_ns;
  std::stable_sort(s.gaps.begin(), s.gaps.end(), [](const Gap& a, const Gap& b) { return a.length_ns > b.length_ns; });
  for (auto& [name, t] : totals) s.by_name.push_back(t);
  std::stable_sort(s.by_name.begin(), s.by_name.end(),
                   [](const NameTotal& a, const NameTotal& b) { return a.total_ns > b.total_ns; });
  return s;
}

// A kernel's name as a report shows it: demangled where it can be, the parameter list and our namespaces
// dropped (tools/gpu-profile.sh's rule), so that launches of one kernel with different arguments sum.
inline std::string short_kernel_name(const char* mangled) {
  if (mangled == nullptr) return "?";
  int status = 0;
  char* demangled = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
  std::string name = status == 0 && demangled ? demangled : mangled;
  std::free(demangled);
  for (const std::string cut : {"(anonymous namespace)::", "kraken::kernels::"}) {
    for (size_t at = name.find(cut); at != std::string::npos; at = name.find(cut)) name.erase(at, cut.size());
  }
  const size_t paren = name.find('(');
  if (paren != std::string::npos) name.erase(paren);
  if (name.rfind("void ", 0) == 0) name.erase(0, 5);
  return name;
}

#if KRAKEN_BENCH_CUPTI
// CUPTI's activity records (concurrent kernels, copies, fills) between start() and stop(), which
// synchronises the device and flushes CUPTI's buffers. One collector at a time in a process.
class KernelTimeline {
 public:
  KernelTimeline();
  ~KernelTimeline();
  KernelTimeline(const KernelTimeline&) = delete;
  KernelTimeline& operator=(const KernelTimeline&) = delete;
  void start();
  std::vector<Span> stop();
};
#endif

}  // namespace kraken::bench
