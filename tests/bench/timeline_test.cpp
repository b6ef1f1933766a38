// bench/gpu_timeline.h's arithmetic on spans made up here (the CUPTI collector needs a GPU): busy time
// is the union of the spans, idle the window less it, every gap named by the span that ended last before
// it and the one after, and each kernel's total summed over its launches.
#include "bench/gpu_timeline.h"

#include <gtest/gtest.h>

namespace kraken::bench {
namespace {

TEST(GpuTimeline, BusyIsTheUnionAndGapsAreNamedByTheirNeighbours) {
  // a [0, 10), b [5, 8) inside it, c [8, 20) overlapping a's end, gap 20–30, d [30, 35), gap 35–100,
  // a again [100, 110). Given out of order.
  const std::vector<Span> spans = {{30, 35, "d"}, {0, 10, "a"}, {100, 110, "a"}, {8, 20, "c"}, {5, 8, "b"}};
  const TimelineSummary t = summarize_timeline(spans);
  EXPECT_EQ(t.spans, 5u);
  EXPECT_EQ(t.window_ns, 110u);
  EXPECT_EQ(t.busy_ns, 20u + 5u + 10u);
  EXPECT_EQ(t.idle_ns(), 75u);
  ASSERT_EQ(t.gaps.size(), 2u);
  EXPECT_EQ(t.gaps[0].start_ns, 35u);  // longest first
  EXPECT_EQ(t.gaps[0].length_ns, 65u);
  EXPECT_EQ(t.gaps[0].before, "d");
  EXPECT_EQ(t.gaps[0].after, "a");
  EXPECT_EQ(t.gaps[1].start_ns, 20u);
  EXPECT_EQ(t.gaps[1].length_ns, 10u);
  EXPECT_EQ(t.gaps[1].before, "c");  // c ended the busy stretch, not a (which started it)
  EXPECT_EQ(t.gaps[1].after, "d");
  ASSERT_EQ(t.by_name.size(), 4u);
  EXPECT_EQ(t.by_name[0].name, "a");  // 20 ns in two launches
  EXPECT_EQ(t.by_name[0].total_ns, 20u);
  EXPECT_EQ(t.by_name[0].count, 2);
  EXPECT_EQ(t.by_name[1].name, "c");
  EXPECT_EQ(t.by_name[1].total_ns, 12u);
}

TEST(GpuTimeline, TouchingSpansLeaveNoGapAndNothingIsEmpty) {
  const TimelineSummary t = summarize_timeline({{0, 4, "x"}, {4, 9, "y"}, {9, 9, "z"}});
  EXPECT_EQ(t.window_ns, 9u);
  EXPECT_EQ(t.busy_ns, 9u);
  EXPECT_TRUE(t.gaps.empty());
  const TimelineSummary none = summarize_timeline({});
  EXPECT_EQ(none.spans, 0u);
  EXPECT_EQ(none.window_ns, 0u);
  EXPECT_TRUE(none.gaps.empty());
}

TEST(GpuTimeline, KernelNamesLoseTheirParametersAndOurNamespaces) {
  // kraken::kernels::(anonymous namespace)::add_kernel<float>(float*, int): a template, so "void" leads.
  EXPECT_EQ(short_kernel_name("_ZN6kraken7kernels12_GLOBAL__N_110add_kernelIfEEvPfi"), "add_kernel<float>");
  // cuBLAS's kernels have C names: kept as they are.
  EXPECT_EQ(short_kernel_name("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NNN"),
            "nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NNN");
  EXPECT_EQ(short_kernel_name(nullptr), "?");
}

}  // namespace
}  // namespace kraken::bench
