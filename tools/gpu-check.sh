#!/usr/bin/env bash
# One command that verifies the CUDA backend on a GPU machine and writes one report.
#
# Made for the device tool's bare GPU machines (nvcc, CMake, ninja, python3; no system packages, no
# MPI, no network): it needs the repository and third_party/ (scripts/pack-third-party.sh, carried
# along), nothing else. In order, within a time budget (KRAKEN_GPU_CHECK_BUDGET seconds, default 540,
# so that the device tool's 600-second call returns with the report):
#   1. the machine: nvidia-smi, nvcc, cmake, compiler;
#   2. configure (-DKRAKEN_CUDA=ON -DKRAKEN_MPI=OFF -DCMAKE_CUDA_ARCHITECTURES=90, no ASan copy of the
#      emulation tests, dependencies from third_party/) and build everything with all cores;
#   3. the GPU tests: the wgmma attention tests alone first (90 s at most), stepping KRAKEN_CUDA_WGMMA down
#      from pipelined to no-ping-pong to lockstep where they fail or hang, the first setting that passes
#      kept for the rest of the check (where none does, step 4 leaves their rows and variants out), then
#      ctest -L gpu (tests/gpu), each result and every measured GPU-vs-CPU difference;
#      then the attention tests once more with KRAKEN_CUDNN_ATTENTION_BACKWARD=atomic (cuDNN's f32 atomic
#      dQ), KRAKEN_CUDA_ATTENTION=mma (the grouped mma launch, the dispatch without cuDNN), =cudnn (cuDNN
#      for every shape it takes), =wgmma (the Hopper kernels) and =wgmma-backward (their backward beside
#      cuDNN's forward), the product tests with
#      KRAKEN_CUBLASLT_TUNE=8, the bias gradients with KRAKEN_CUDA_COLUMN_CHUNKS=long, the models with
#      KRAKEN_PROJECTION_BIASES=products;
#   4. the GPU benchmark (bench/gpu_train_bench.cpp): tokens/s, MFU, kernel bandwidth, the backward ops
#      that keep the host (KRAKEN_AUTOGRAD_SLOW_NODE_MS), the SM clock and power meanwhile
#      (tools/gpu-clocks.sh); then its bf16 training rows again with one
#      switch changed each (bench_variant below), while time is left — first one step of each under CUPTI
#      (--timeline: the GPU's idle time between kernels and each kernel's time in the step);
#   5. compute-sanitizer memcheck on a short GPU training run (kraken-train, checkpoint included), then
#      memcheck and racecheck on the GPU kernel tests while time remains (after the benchmark, since
#      the sanitizers take whatever time is left);
#   6. the CPU suite (ctest -LE gpu) with the time left;
#   7. nvidia-smi at the end.
# The report: $OUT/gpu-report.md when OUT is set (the device tool fetches it), else
# <build>/gpu-report.md. Exit status 0 only when every stage that ran passed and the GPU tests ran
# (skipped GPU tests on a machine with a GPU count as a failure).
#
# Environment: KRAKEN_GPU_CHECK_BUILD (build folder, default build-gpu), KRAKEN_THIRD_PARTY (default
# third_party), KRAKEN_GPU_CHECK_CMAKE_ARGS (extra configure arguments), KRAKEN_GPU_CHECK_BUDGET.
# On a machine without a GPU it still configures, builds and runs what needs no GPU (the GPU tests
# then skip), which is how this script is tested where no GPU is available.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
root="$PWD"
start=$(date +%s)
budget="${KRAKEN_GPU_CHECK_BUDGET:-540}"
build="${KRAKEN_GPU_CHECK_BUILD:-build-gpu}"
third_party="${KRAKEN_THIRD_PARTY:-third_party}"
[[ "$third_party" = /* ]] || third_party="$root/$third_party"
[[ "$build" = /* ]] || build="$root/$build"
mkdir -p "$build/gpu-check"
logs="$build/gpu-check"
if [[ -n "${OUT:-}" ]]; then report="$OUT/gpu-report.md"; else report="$build/gpu-report.md"; fi
jobs=$(nproc)
failures=()

elapsed() { echo $(( $(date +%s) - start )); }
left() { echo $(( budget - $(elapsed) )); }
say() { echo "gpu-check [$(elapsed)s]: $*"; }
md() { printf '%s\n' "$*" >> "$report"; }
# The last n lines of a log, fenced, in the report.
md_tail() {
  md '```'
  tail -n "$2" "$1" >> "$report"
  md '```'
}
fail() { failures+=("$1"); md "**FAILED: $1**"; say "FAILED: $1"; }

: > "$report"
md "# Kraken GPU check"
md ""
md "tools/gpu-check.sh, $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${budget} s, ${jobs} cores."
commit=$(git rev-parse --short HEAD 2>/dev/null || echo "unknown (no git metadata on this machine)")
md "Commit: $commit."
md ""

# ---- 1. the machine --------------------------------------------------------------------------------
say "machine"
md "## 1. Machine"
have_gpu=0
if command -v nvidia-smi > /dev/null && nvidia-smi -L > "$logs/gpus.txt" 2>&1; then
  have_gpu=1
  md '```'
  cat "$logs/gpus.txt" >> "$report"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,power.limit --format=csv >> "$report" 2>&1
  md '```'
else
  md "No GPU visible (nvidia-smi missing or failing): GPU tests will skip, sanitizer and benchmark stages are skipped."
fi
nvcc_bin=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
md '```'
{
  echo "nvcc: $("$nvcc_bin" --version 2>&1 | tail -n 2 | head -n 1)"
  echo "cmake: $(cmake --version | head -n 1)"
  echo "ninja: $(ninja --version)"
  echo "c++: $(c++ --version | head -n 1)"
  echo "python3: $(python3 --version 2>&1)"
  echo "compute-sanitizer: $([[ -x "$sanitizer" ]] && echo "$sanitizer" || echo missing)"
  echo "third_party: $([[ -f "$third_party/SOURCES.txt" ]] && tr '\n' ' ' < "$third_party/SOURCES.txt" || echo "MISSING ($third_party)")"
} >> "$report"
md '```'
if [[ ! -d "$third_party/include" ]]; then
  fail "third_party/ is missing: run scripts/pack-third-party.sh where the Debian packages are, and carry third_party"
  md ""
  md "## Result: FAILED (${failures[*]})"
  [[ -n "${OUT:-}" ]] && cp "$report" "$build/gpu-report.md" 2>/dev/null
  exit 1
fi

source "$root/tools/gpu-libraries.sh"
md "cuDNN from: ${CUDNN_ROOT:-/usr/local/cuda, if there}; NCCL from: ${NCCL_ROOT:-the toolkit or the system, if there}"\
   "(the Kraken line of the configure step says what CMake found)."

# ---- 2. configure and build ------------------------------------------------------------------------------
say "configure"
md ""
md "## 2. Configure and build"
t0=$(date +%s)
# (The emulation's AddressSanitizer copy is left out: CI runs it, and here it would only lengthen the build.)
# shellcheck disable=SC2086
if cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKRAKEN_CUDA=ON -DKRAKEN_MPI=OFF \
     -DCMAKE_CUDA_ARCHITECTURES=90 -DKRAKEN_CUDA_EMU_ASAN=OFF -DKRAKEN_THIRD_PARTY="$third_party" \
     ${KRAKEN_GPU_CHECK_CMAKE_ARGS:-} \
     > "$logs/configure.log" 2>&1; then
  md "Configured in $(( $(date +%s) - t0 )) s: $(grep -m1 'Kraken: CUDA' "$logs/configure.log" | sed 's/^-- //')"
else
  fail "configure"
  md_tail "$logs/configure.log" 40
fi
built=0
if [[ ${#failures[@]} -eq 0 ]]; then
  say "build with $jobs jobs"
  t0=$(date +%s)
  if ninja -C "$build" -j "$jobs" > "$logs/build.log" 2>&1; then
    built=1
    md "Built in $(( $(date +%s) - t0 )) s ($(grep -c 'Building' "$logs/build.log") compilations, $(grep -ci 'warning' "$logs/build.log") warnings)."
  else
    fail "build"
    grep -B2 -A12 -m5 -E 'error|FAILED' "$logs/build.log" > "$logs/build-errors.log"
    md_tail "$logs/build-errors.log" 80
  fi
fi
if [[ $built -eq 0 ]]; then
  md ""
  md "## Result: FAILED (${failures[*]})"
  exit 1
fi
# The bf16 kernels' global accesses by width in the machine code (the PTX guard in the tests reads nvcc's
# PTX; this is what ptxas made of it): 128-bit against 32-bit loads and stores per file.
if command -v cuobjdump > /dev/null 2>&1; then
  for f in layernorm cross_entropy elementwise embedding; do
    o="$build/kernels/CMakeFiles/kraken_kernels_cuda.dir/cuda/$f.cu.o"
    [[ -f "$o" ]] || continue
    cuobjdump --dump-sass "$o" > "$logs/sass-$f.txt" 2>&1 || continue
    md "SASS of kernels/cuda/$f.cu: $(grep -c 'LDG\.E\.128' "$logs/sass-$f.txt") LDG.E.128, $(grep -cE 'LDG\.E(\.CONSTANT)? ' "$logs/sass-$f.txt") 32-bit LDG, $(grep -c 'STG\.E\.128' "$logs/sass-$f.txt") STG.E.128, $(grep -cE 'STG\.E ' "$logs/sass-$f.txt") 32-bit STG."
  done
fi

# Summarises a ctest JUnit file: counts, the failed and skipped tests, and the [gpu-vs-*],
# [gpu-allocator] and [gpu-wgmma] lines.
summarise_junit() {
  python3 - "$1" "$2" <<'PY' >> "$report"
import sys, xml.etree.ElementTree as ET
path, detail = sys.argv[1], sys.argv[2] == "detail"
try:
    suite = ET.parse(path).getroot()
except Exception as e:
    print(f"(no results: {e})"); sys.exit(0)
cases = suite.iter("testcase")
passed, failed, skipped, lines = [], [], [], []
for c in cases:
    name, t = c.get("name"), float(c.get("time") or 0)
    status = c.get("status", "")
    if c.find("failure") is not None or status == "fail": failed.append((name, t, c))
    elif c.find("skipped") is not None or status in ("notrun", "disabled"): skipped.append((name, t, c))
    else: passed.append((name, t, c))
    out = c.findtext("system-out") or ""
    lines += [l.strip() for l in out.splitlines() if l.strip().startswith(("[gpu-vs-", "[gpu-allocator]", "[gpu-wgmma]"))]
total = len(passed) + len(failed) + len(skipped)
print(f"{len(passed)} passed, {len(failed)} failed, {len(skipped)} skipped of {total}; "
      f"{sum(t for _, t, _ in passed + failed + skipped):.1f} s of test time.")
if detail:
    print("\n| test | result | s |\n|---|---|---|")
    for group, label in ((failed, "FAILED"), (skipped, "skipped"), (passed, "passed")):
        for name, t, _ in sorted(group, key=lambda x: x[0]):
            print(f"| {name} | {label} | {t:.2f} |")
for name, _, c in failed:
    out = (c.findtext("system-out") or "").splitlines()
    keep = [l for l in out if "Failure" in l or "Expected" in l or "Which is" in l or "allowed" in l or "error" in l.lower()]
    print(f"\nFailure output of {name}:\n```\n" + "\n".join((keep or out)[-40:]) + "\n```")
if skipped:
    print("\nSkipped: " + ", ".join(name for name, _, _ in skipped) + ".")
for name, _, c in skipped[:3]:
    out = (c.findtext("system-out") or "").splitlines()
    why = [l for l in out if "no GPU" in l or "Skipped" in l or "dry run" in l]
    if why: print(f"\n{name} skipped: {why[-1].strip()}")
if lines:
    print("\nMeasured differences (tests/gpu print one line per comparison), the allocator near the "
          "device's capacity and the wgmma layout probe:\n```")
    print("\n".join(lines))
    print("```")
print(f"@@counts {len(passed)} {len(failed)} {len(skipped)}")
PY
}
# Reads the counts line the summary ended with (and removes it from the report).
counts_of_last_summary() {
  local line
  line=$(grep '^@@counts' "$report" | tail -n 1)
  sed -i '/^@@counts/d' "$report"
  echo "${line#@@counts }"
}

# ---- 3. GPU tests ------------------------------------------------------------------------------------------
md ""
md "## 3. GPU tests (ctest -L gpu)"
# The wgmma kernels (kernels/cuda/attention_wgmma.cu, twentieth session) first and alone, under a short
# limit: their layout probe's [gpu-wgmma] lines open the section, and where they fail, the benchmark leaves
# their rows out (KRAKEN_BENCH_WGMMA=0) and the wgmma variants below do not run — a faulting kernel would
# otherwise take the benchmark's process with it. (With them since the twenty-second session: the mbarrier
# pipeline probe, kernels/cuda/mbarrier.h's first GPU run, whose [gpu-wgmma] lines say how many of its sums
# were wrong.) Every wgmma test runs under a HangWatch (tests/gpu/gpu_test_util.h): a hung kernel ends the
# process in seconds with a [gpu-hang] line naming it.
# The pipelined kernels (twenty-third to twenty-fifth sessions) head a ladder (tools/gpu-wgmma-ladder.sh):
# where the tests fail or hang under KRAKEN_CUDA_WGMMA=pipelined, they run again under no-ping-pong (the
# pipelined kernels without their warpgroups' turns), then lockstep (the kernels that passed in the
# twenty-second session), and the first setting that passes is exported for everything after — the tests,
# the benchmark's rows and variants, the sanitizers — so that one call still measures the kernels that
# work. A failed step is a failure of the check all the same.
wgmma_ok=1
wgmma_setting=pipelined
ctest_exclude=()
source "$root/tools/gpu-wgmma-ladder.sh"
if [[ $have_gpu -eq 1 && -x "$build/tests/kraken_tests_gpu" ]]; then
  wgmma_ladder "$build/tests/kraken_tests_gpu" "$root"
fi
say "GPU tests"
t0=$(date +%s)
ctest --test-dir "$build" -L gpu ${ctest_exclude[@]+"${ctest_exclude[@]}"} -j 4 --timeout 300 --output-junit "$logs/gpu-tests.xml" \
  > "$logs/gpu-tests.log" 2>&1
gpu_rc=$?
md "ctest exit status $gpu_rc after $(( $(date +%s) - t0 )) s."
summarise_junit "$logs/gpu-tests.xml" detail
read -r g_pass g_fail g_skip <<< "$(counts_of_last_summary)"
if [[ "$gpu_rc" -ne 0 || "${g_fail:-1}" -ne 0 ]]; then fail "GPU tests"; md_tail "$logs/gpu-tests.log" 30; fi
if [[ $have_gpu -eq 1 && "${g_skip:-0}" -ne 0 ]]; then fail "GPU tests skipped on a machine with a GPU"; fi
if [[ "${g_pass:-0}" -eq 0 && $have_gpu -eq 1 ]]; then fail "no GPU test passed"; fi
# Some of the GPU tests again with one switch set, in a process of their own (the switches are read once
# per process), while time is left: name, VAR=value (one or more, space-separated), timeout (s), gtest
# filter, what they cover. The report keeps each test's result and every line naming cuDNN's attention
# (its refusals, the plan's graph).
test_variant() {
  local name=$1 setting=$2 limit=$3 filter=$4 what=$5
  [[ $have_gpu -eq 1 && $(left) -gt 240 ]] || return 0
  say "GPU tests with $setting"
  local t0 rc
  t0=$(date +%s)
  # shellcheck disable=SC2086  # $setting may hold several VAR=value words
  env $setting KRAKEN_SOURCE_DIR="$root" OMP_NUM_THREADS=2 timeout "$limit" "$build/tests/kraken_tests_gpu" \
    --gtest_filter="$filter" > "$logs/gpu-tests-$name.log" 2>&1
  rc=$?
  md ""
  md "With $setting ($what): exit status $rc in $(( $(date +%s) - t0 )) s."
  grep -E '^\[( +OK|  FAILED|  SKIPPED|  PASSED) |not supported|cuDNN attention' "$logs/gpu-tests-$name.log" | head -n 30 \
    > "$logs/gpu-tests-$name-summary.log"
  md_tail "$logs/gpu-tests-$name-summary.log" 30
  [[ $rc -eq 0 ]] || fail "GPU tests with $setting (exit status $rc)"
}
# The wgmma attention kernels (kernels/cuda/attention_wgmma.cu, twentieth session; first run and passed in the
# twenty-second, bench/RESULTS.md): their own tests,
# the dispatch, the attention op in mixed precision at D = 64 and 168 against the CPU, the models and the
# allocator's degree-4 model (D = 128) and the trainer with them.
[[ $wgmma_ok -eq 1 ]] && test_variant wgmma KRAKEN_CUDA_ATTENTION=wgmma 120 \
  'GpuAttentionWgmma.*:GpuAttentionTc.DispatchTakesOnePathForForwardAndBackward:GpuMixedPrecision.*:GpuModel.*:GpuAllocator.*:GpuTrainer.MixedPrecision*' \
  "the wgmma kernels: their tests, the dispatch, the attention op at D = 64, 168 and 256, the models, the trainer"
# The wgmma backward beside the default's forward (KRAKEN_CUDA_ATTENTION=wgmma-backward, twenty-sixth session;
# D = 256's backward, dK and dV in kernels of their own, is new there): the dispatch, the attention op at
# D = 64, 168 and 256 against the CPU, the models and the trainer.
[[ $wgmma_ok -eq 1 ]] && test_variant wgmmabackward KRAKEN_CUDA_ATTENTION=wgmma-backward 120 \
  'GpuAttentionTc.DispatchTakesOnePathForForwardAndBackward:GpuMixedPrecision.*:GpuModel.*:GpuTrainer.MixedPrecision*' \
  "the wgmma backward beside cuDNN's forward: the dispatch, the attention op, the models, the trainer"
# cuDNN's backward with dQ summed in f32 with atomics (KRAKEN_CUDNN_ATTENTION_BACKWARD=atomic; built in the
# eleventh session, first run in the twelfth): whether cuDNN plans that graph, its results against the CPU and mma, and the
# mixed-precision models and trainer on it (cuDNN for every shape, small ones included).
test_variant atomic "KRAKEN_CUDNN_ATTENTION_BACKWARD=atomic KRAKEN_CUDA_ATTENTION=cudnn" 120 \
  'GpuAttentionCudnn.*:GpuModel.Degree2*:GpuTrainer.MixedPrecision*' \
  "cuDNN's atomic dQ: the attention tests, a degree-2 model, the mixed-precision trainer"
# The column sums' long chunks (KRAKEN_CUDA_COLUMN_CHUNKS=long, kernels/cuda/column_chunks.h; built in the
# thirteenth session, first run in the fifteenth): the bias gradients at a step's scale and in the models' linears.
test_variant colchunks KRAKEN_CUDA_COLUMN_CHUNKS=long 90 \
  'GpuBf16Kernels.SumRows*:GpuBf16Kernels.BroadcastAdd*:GpuLinear.*:GpuMlp.*:GpuModel.*' \
  "the bias gradients' sums, the linears, the MLP, the models"
# GPT-2's projection biases in the products' epilogues again (KRAKEN_PROJECTION_BIASES=products; the default
# adds them in the LayerNorms after the residual adds since the fourteenth session): the models still right.
test_variant biases KRAKEN_PROJECTION_BIASES=products 90 'GpuModel.*:GpuTrainer.MixedPrecision*' \
  "the models and the mixed-precision trainer"
# The mma kernels where cuDNN would take the call (the default's): their dispatch and the grouped launch
# of a Kraken layer's sub-layers, which only the mma kernels have.
test_variant mma KRAKEN_CUDA_ATTENTION=mma 90 \
  'GpuAttentionMma.*:GpuAttentionTc.DispatchTakesOnePathForForwardAndBackward:GpuAttentionCudnn.DispatchHonoursKrakenCudaAttention' \
  "GpuAttentionMma.*, the dispatches"
# cuDNN for every shape it takes, small ones included (the default keeps it for B·T ≥ 2048).
test_variant cudnn KRAKEN_CUDA_ATTENTION=cudnn 120 \
  'GpuAttentionCudnn.*:GpuAttentionTc.DispatchTakesOnePathForForwardAndBackward:GpuAttentionMma.GroupIsEachInputsOwnAttention:GpuModel.*:GpuTrainer.MixedPrecision*' \
  "GpuAttentionCudnn.*, the dispatch, the group, the models"
# Every product on the fastest of cuBLASLt's algorithms by timing (KRAKEN_CUBLASLT_TUNE, a measurement
# mode): the products still right on whichever algorithm wins.
test_variant tune KRAKEN_CUBLASLT_TUNE=8 90 'GpuMatmulBf16.*:GpuMlp.*:GpuGroupedLinear.*:GpuLinear.*' \
  "the products and the MLP"

# ---- 4. benchmark ------------------------------------------------------------------------------------------
md ""
md "## 4. Benchmark"
if [[ -x "$build/bin/gpu_train_bench" ]]; then
  say "benchmark"
  t0=$(date +%s)
  # KRAKEN_AUTOGRAD_SLOW_NODE_MS names the backward ops that keep the host 20 ms or more: behind the host
  # probe's ~100 ms of queued work, an op that synchronises, or the one whose launch found the stream's
  # queue full (runtime/autograd.cpp).
  # tools/gpu-clocks.sh samples the SM clock and power meanwhile: whether the GPU held its clock under the
  # training rows' load (a step longer than its kernels under ncu: idle, or slower clocks).
  rm -f "$logs/bench.md"  # (a warm machine keeps the build folder: no earlier call's table read as this one's)
  KRAKEN_BENCH_WGMMA=$wgmma_ok KRAKEN_AUTOGRAD_SLOW_NODE_MS=20 bash "$root/tools/gpu-clocks.sh" "$logs/bench-clocks.csv" \
    timeout $(( $(left) > 200 ? 180 : 90 )) "$build/bin/gpu_train_bench" --out "$logs/bench.md" > "$logs/bench.log" 2>&1
  rc=$?
  md "bench/gpu_train_bench: exit status $rc in $(( $(date +%s) - t0 )) s."
  grep '^gpu-clocks:' "$logs/bench.log" >> "$report"
  if grep -q '^autograd:' "$logs/bench.log"; then
    md "Backward ops that kept the host 20 ms or more (a first call's set-up; behind the host probe's queue, a synchronisation or a full launch queue):"
    grep '^autograd:' "$logs/bench.log" > "$logs/bench-slow-nodes.log"
    md_tail "$logs/bench-slow-nodes.log" 20
  fi
  if [[ -f "$logs/bench.md" ]]; then cat "$logs/bench.md" >> "$report"; else md_tail "$logs/bench.log" 30; fi
  [[ $rc -eq 0 ]] || fail "benchmark (exit status $rc)"
  # The bf16 rows again with one switch changed, each in a process of its own (the switches are read once
  # per process), most wanted first, while time is left: name, VAR=value (one or more, space-separated),
  # the least time left (s) to start it, its timeout (s), what it shows, and gpu_train_bench's arguments.
  bench_variant() {
    local name=$1 setting=$2 min_left=$3 limit=$4 what=$5
    shift 5
    [[ $have_gpu -eq 1 && $(left) -gt $min_left ]] || return 0
    say "benchmark, $what"
    local t0 rc
    t0=$(date +%s)
    rm -f "$logs/bench-$name.md"
    # shellcheck disable=SC2086  # $setting may hold several VAR=value words
    env $setting timeout "$limit" "$build/bin/gpu_train_bench" --precision bf16 "$@" \
      --out "$logs/bench-$name.md" > "$logs/bench-$name.log" 2>&1
    rc=$?
    md ""
    md "With ${setting:-the defaults} ($what): exit status $rc in $(( $(date +%s) - t0 )) s."
    grep -E '^cuDNN attention' "$logs/bench-$name.log" | sort -u | head -n 10 >> "$report"
    # KRAKEN_CUBLASLT_TUNE's lines, the largest gains first (kernels/cuda/matmul_lt.cu)
    grep -E '^cuBLASLt tune' "$logs/bench-$name.log" | sort -u | sed -E 's/.*\(([0-9]+)% faster\)$/\1\t&/' |
      sort -t$'\t' -k1,1nr | cut -f2- | head -n 30 | sed 's/^/    /' >> "$report"
    # and the entries that would commit those choices (kernels/cuda/cublaslt_picks.inc), ready to paste
    if grep -qE '^cuBLASLt pick' "$logs/bench-$name.log"; then
      md "Entries for kernels/cuda/cublaslt_picks.inc (every plan whose fastest candidate was not cuBLASLt's first):"
      grep -E '^cuBLASLt pick' "$logs/bench-$name.log" | sort -u | sed -E 's/^cuBLASLt pick: /    /' >> "$report"
    fi
    if [[ -f "$logs/bench-$name.md" ]]; then
      # The table, then --timeline's section whole (its lines are not all table rows).
      sed "/^### One step's timeline/q" "$logs/bench-$name.md" | grep -E '^\|' >> "$report"
      if grep -q "^### One step's timeline" "$logs/bench-$name.md"; then
        md ""
        sed -n "/^### One step's timeline/,\$p" "$logs/bench-$name.md" >> "$report"
      fi
    else
      md_tail "$logs/bench-$name.log" 20
    fi
    [[ $rc -eq 0 ]] || fail "benchmark with ${setting:-the defaults}, $what (exit status $rc)"
  }
  # Where the step's wall time goes between kernels (gpu_train_bench --timeline, CUPTI; twenty-second
  # session, never run): the Kraken steps ran ~13% past ncu's sum of their kernels, GPT-2's ~6% — idle
  # GPU or slower kernels in the step.
  bench_variant timeline KRAKEN_BENCH_TIMELINE=1 150 90 "one step of each row under CUPTI" --training-only --batch 8,64
  # GPT-2 124M's own shape at degree 4 (C = 768: 3 heads of D = 256 a sub-layer, ≈ 382M parameters), the
  # shape issue 5 names for both degrees read literally, beside the paper's 125M preset above; B = 64 does
  # not fit an 80 GB card. Its sub-layers' biases moved into the products' epilogues and one grouped
  # column sum in the twenty-second session (11.7 ms of kernels a step before, at B = 32), with its timeline.
  bench_variant wide "" 120 90 "GPT-2's shape at degree 4" --training-only --model kraken4-768 --batch 8,32 --timeline
  # (Each of these starts only with 200 s left, so that the sanitizers after the benchmark keep their time:
  # the D = 256 wgmma backward kernels are new to racecheck.)
  # GPT-2 124M, 3% short of 50% on an H100 as llm.c counts MFU (twenty-ninth session): a step of 128
  # sequences (~68 GB), and llm.c's own recipe on one GPU — 0.5M tokens a step, 8 micro-batches of 64 —
  # over which the update's fixed cost (AdamW, the norm) spreads.
  bench_variant gpt2big "" 200 90 "GPT-2 124M, B = 128" --training-only --model gpt2 --batch 128
  bench_variant gpt2accum "" 200 90 "GPT-2 124M, 8 micro-batches of 64 a step" --training-only \
    --model gpt2 --batch 64 --accumulate 8
  # The same 0.5M tokens a step at degree 4 (16 micro-batches of 32: AdamW over its 382M parameters, 3.9 ms
  # of the B = 32 step on an H100, and the norm then come once in 16).
  bench_variant wideaccum "" 200 120 "GPT-2's shape at degree 4, 16 micro-batches of 32 a step" --training-only \
    --model kraken4-768 --batch 32 --accumulate 16
  # Where the ~6 points to 50% MFU at degree 4 (llm.c's count: 44.1% on an H100) could come from (the
  # twenty-fifth session's H100 profile of this shape, bench/RESULTS.md): cuDNN's backward at D = 256
  # writes dS to its dP workspace and reads it back for dQ (5.4 ms of 173.5 at B = 32), which its atomic dQ
  # graph does not (non-deterministic: a measurement),
  # and its other engine configurations at D = 256 (30.1 ms of attention in all) may be faster;
  # cuBLASLt's algorithms timed for this shape's products (no committed pick covers them; the pick entries
  # it prints are for this card only); the bias gradients in the products' epilogues, a product per
  # sub-layer — BGRADB and DGELU_BGRAD at level 2, DGELU_BGRAD alone at 3 (8.4 ms of column sums); and its
  # weight gradients (K = 32,768 rows at B = 32) one product per sub-layer, as K = 65,536 runs them (where the
  # preset's took 0.541 ms against a strided batch's 0.757).
  # First the default's newest piece against what it replaced: the fork's and LN2's backward as the two
  # kernels (the same bits; the one-pass kernel holds 192 KiB of shared memory a block at this shape, one
  # block an SM — if `wide` is not faster than this, make separate the default).
  bench_variant widefork KRAKEN_CUDA_FORK_NORM_BACKWARD=separate 200 90 \
    "GPT-2's shape at degree 4, the fork's and LN2's backward as two kernels" --training-only --model kraken4-768 --batch 32
  # The sub-layers' projection biases back in the products' epilogues (the default: the MLP projections'
  # in the next layer's LN1, layer 0's attention projections' in its LN2, their gradients summed in those
  # LayerNorms' backward pass, where the products' column sums read the gradient again; twenty-eighth
  # session). If `wide` is not faster than this, the placement at degree > 1 is not worth its node.
  bench_variant widebiases KRAKEN_PROJECTION_BIASES=products 200 90 \
    "GPT-2's shape at degree 4, the projection biases in the products" --training-only --model kraken4-768 --batch 32
  # Then the attention's backward at D = 256 on the wgmma kernels (cuDNN's forward kept: ours is slower):
  # cuDNN's backward there ran at ~260 TFLOP/s with its dQ product.
  [[ $wgmma_ok -eq 1 ]] &&
    bench_variant widewgmmabwd KRAKEN_CUDA_ATTENTION=wgmma-backward 200 90 \
      "GPT-2's shape at degree 4, the wgmma backward ($wgmma_setting) beside cuDNN's forward" \
      --training-only --model kraken4-768 --batch 32
  bench_variant wideloop KRAKEN_CUDA_BATCHED_PRODUCTS=0 200 90 "GPT-2's shape at degree 4, a product per sub-layer" \
    --training-only --model kraken4-768 --batch 32
  bench_variant wideatomic KRAKEN_CUDNN_ATTENTION_BACKWARD=atomic 200 90 "GPT-2's shape at degree 4, cuDNN's atomic dQ" \
    --training-only --model kraken4-768 --batch 32
  bench_variant wideattntune KRAKEN_CUDNN_ATTENTION_TUNE=10 200 150 "GPT-2's shape at degree 4, cuDNN's attention configurations timed (D = 256)" \
    --training-only --model kraken4-768 --batch 32
  bench_variant widetune KRAKEN_CUBLASLT_TUNE=8 200 120 "GPT-2's shape at degree 4, cuBLASLt's algorithms timed" \
    --training-only --model kraken4-768 --batch 32
  bench_variant wideepi2 KRAKEN_CUDA_EPILOGUES=2 200 90 "GPT-2's shape at degree 4, the bias gradients in the epilogues" \
    --training-only --model kraken4-768 --batch 32
  bench_variant wideepi3 KRAKEN_CUDA_EPILOGUES=3 200 90 "GPT-2's shape at degree 4, c_fc's bias gradient in DGELU_BGRAD" \
    --training-only --model kraken4-768 --batch 32
  # The wgmma attention kernels (opt-in; slower than cuDNN's at both head sizes in the twenty-second
  # session's step, bench/RESULTS.md) in the training step, against the defaults' rows above: the
  # pipelined kernels (the default of KRAKEN_CUDA_WGMMA), then the lockstep ones on the same card.
  # (KRAKEN_CUDA_WGMMA as the wgmma tests' ladder left it; where that is lockstep, the second is the first.)
  [[ $wgmma_ok -eq 1 ]] &&
    bench_variant wgmma KRAKEN_CUDA_ATTENTION=wgmma 150 90 "the wgmma attention kernels ($wgmma_setting)" \
      --training-only --batch 8,64
  [[ $wgmma_ok -eq 1 ]] &&
    bench_variant wgmmabackward KRAKEN_CUDA_ATTENTION=wgmma-backward 150 90 \
      "the wgmma backward ($wgmma_setting) beside cuDNN's forward" --training-only --batch 8,64
  [[ $wgmma_ok -eq 1 && $wgmma_setting != lockstep ]] &&
    bench_variant wgmmalockstep "KRAKEN_CUDA_ATTENTION=wgmma KRAKEN_CUDA_WGMMA=lockstep" 150 90 \
      "the lockstep wgmma attention kernels" --training-only --batch 8,64
  # GPT-2's step on token ids as text has them (KRAKEN_BENCH_IDS=text: Zipf's law; uniform ids, the
  # default rows, never give the embedding backward a frequent row — text gives it thousands of positions
  # a step on " the": the sixteenth session's sliced sums, bench/RESULTS.md).
  bench_variant textids KRAKEN_BENCH_IDS=text 120 90 "GPT-2 on text-like token ids" \
    --training-only --model gpt2 --batch 8,64
  # cuDNN's attention on the fastest of its own engine configurations (KRAKEN_CUDNN_ATTENTION_TUNE: modes A, B
  # and FALLBACK, and each with one knob moved; kernels/cuda/attention_cudnn.cu): one line a shape with every
  # configuration's time, and the steps on the winners. The Kraken preset's D = 168 is the case that asks.
  # (A measurement only: before a configuration it finds becomes anyone's default, the attention tests run
  # on it — KRAKEN_FOLLOWUP_TESTS='GpuAttentionCudnn.*' with the variable set, tools/gpu-followup.sh.)
  bench_variant attntune KRAKEN_CUDNN_ATTENTION_TUNE=10 200 180 "cuDNN's attention configurations timed" \
    --training-only --batch 64
  # The gradients zeroed in place between steps (KRAKEN_BENCH_ZERO_GRADS=1, the way before the sixteenth
  # session) against the default's released buffers (Module::release_grads).
  bench_variant zerograds KRAKEN_BENCH_ZERO_GRADS=1 120 90 "gradients zeroed in place, not released" \
    --training-only --model gpt2 --batch 8,64
  # The cross-entropy's staged kernel (KRAKEN_CUDA_CROSS_ENTROPY=staged, the default before the fifteenth
  # session, which made the pipelined kernel the default) in the steps: both kernels' rows are in the main
  # benchmark's table.
  bench_variant cestaged KRAKEN_CUDA_CROSS_ENTROPY=staged 120 90 "the cross-entropy's staged kernel" \
    --training-only --batch 8,64
  # GPT-2's projection biases back in the products' epilogues (KRAKEN_PROJECTION_BIASES=products, the default
  # before the fourteenth session), against the default's, added in the LayerNorms after the residual adds
  # and their gradients summed in the LayerNorm backward's pass (ops::add_bias_layernorm; its kernel rows are
  # in the main benchmark's table).
  bench_variant biases KRAKEN_PROJECTION_BIASES=products 120 90 "GPT-2's projection biases in the products" \
    --training-only --model gpt2 --batch 8,64
  # GPT-2 at B = 96 and 128 (B = 64 took 35 GB of the 80): the optimizer's pass and the step's fixed costs
  # over more tokens.
  bench_variant big "" 120 90 "GPT-2 at larger batches" --training-only --model gpt2 --batch 96,128
  # The column sums' long chunks (kernels/cuda/column_chunks.h): the bias-gradient kernel rows at B = 8 and
  # 64 (with the other kernel rows) and GPT-2's steps.
  bench_variant colchunks KRAKEN_CUDA_COLUMN_CHUNKS=long 120 120 "the column sums' long chunks" --model gpt2 \
    --batch 8,64
  # cuDNN's attention backward with dQ summed in f32 with atomics (kernels/cuda/attention_cudnn.cu): 0.2-0.5
  # points of MFU over the deterministic default in the twelfth session's three runs, the default's
  # candidate if it grows.
  bench_variant atomic KRAKEN_CUDNN_ATTENTION_BACKWARD=atomic 120 90 "cuDNN's atomic dQ backward" \
    --training-only --batch 8,64
  # The committed cuBLASLt picks (kernels/cuda/cublaslt_picks.inc) against cuBLASLt's first choices: whether
  # they still pay on this machine's cuBLASLt (they apply only to the version they were timed on).
  bench_variant picks KRAKEN_CUBLASLT_PICKS=0 120 90 "cuBLASLt's first choices, the committed picks ignored" \
    --training-only --batch 8,64
  # Every product's plan timing 8 of cuBLASLt's algorithms and keeping the fastest (a measurement mode:
  # kernels/cuda/matmul_lt.cu): what cuBLASLt's first choice leaves on the table, per product and per step.
  bench_variant tune KRAKEN_CUBLASLT_TUNE=8 120 120 "cuBLASLt's algorithms timed, the fastest kept" \
    --training-only --batch 8,64
  # The Kraken preset's grouped products: by default one strided batch up to K = 32,768, one product per
  # matrix above (the weight gradients at B = 64: kernels/cuda/matmul_lt.cu). Always batched at B = 32 and
  # 64, never at 32: where between K = 8,192 and 65,536 the loop starts to win (bench/RESULTS.md).
  bench_variant batched KRAKEN_CUDA_BATCHED_PRODUCTS=1 150 90 "every grouped product one strided batch" \
    --training-only --model kraken4 --batch 32,64
  bench_variant loop KRAKEN_CUDA_BATCHED_PRODUCTS=0 150 90 "the grouped products one per sub-layer" \
    --training-only --model kraken4 --batch 32
  # The mma attention kernels, the default before cuDNN's (kernels/attention.h), at B = 8 and 64.
  bench_variant mma KRAKEN_CUDA_ATTENTION=mma 150 90 "the mma attention kernels" --training-only --batch 8,64
  # (Measured and settled, so no longer rerun: KRAKEN_CUDA_EPILOGUES=0 and =2 on cuBLASLt's first choices
  # (H200), =2 with the algorithms timed and =3 (H100), all slower than the default 1 at degree 1; cuDNN's
  # non-deterministic engines for the deterministic graph, no faster; bench/RESULTS.md.)
else
  fail "benchmark not built"
fi

# ---- 5. compute-sanitizer ----------------------------------------------------------------------------------
md ""
md "## 5. compute-sanitizer"
if [[ $have_gpu -eq 1 && -x "$sanitizer" ]]; then
  say "memcheck on a short training run"
  run="$build/gpu-check/train-run"
  rm -rf "$run" && mkdir -p "$run"
  # Token shards in nanoGPT's raw uint16 format: a noisy counting sequence, as the trainer tests use.
  python3 - "$run" <<'PY'
import array, random, sys
random.seed(5)
for name in ("train_000.bin", "val_000.bin"):
    t, toks = 0, array.array("H")
    for _ in range(20000):
        t = (t + 1 + (random.randrange(5) if random.randrange(8) == 0 else 0)) % 200
        toks.append(t)
    with open(f"{sys.argv[1]}/{name}", "wb") as f:
        toks.tofile(f)
PY
  cat > "$run/config.toml" <<EOF
[model]
n_layer = 2
n_embd = 64
n_head = 4
degree = 2
context = 40
vocab_size = 200
dropout = 0.1
[data]
train = "$run/train_*.bin"
val = "$run/val_*.bin"
format = "raw"
[train]
device = "cuda"
batch_size = 3
seq_len = 37
max_steps = 3
eval_batches = 1
out_dir = "$run/out"
[optim]
lr = 1e-3
EOF
  t0=$(date +%s)
  "$sanitizer" --tool memcheck --error-exitcode 17 --leak-check no "$build/bin/kraken-train" "$run/config.toml" --quiet \
    > "$logs/memcheck-train.log" 2>&1
  rc=$?
  md "memcheck, kraken-train (degree 2, dropout, T = 37, 3 steps, evaluation, checkpoint): exit status $rc in $(( $(date +%s) - t0 )) s."
  md_tail "$logs/memcheck-train.log" 6
  [[ $rc -eq 0 ]] || fail "memcheck on the training run"
  # The kernel tests under memcheck and racecheck (shared-memory hazards in the tiled kernels), while
  # the budget allows: both are much slower than a plain run. Of the tensor-core attention, the small
  # cases (every copy width, head sizes 5 to 96) and the heads above 128, of both families (WMMA, mma.sync).
  # GpuMlp.OddShapesMatchTheCpu: the cuBLASLt GELU epilogues' aux and bias-gradient writes at odd shapes.
  # The wgmma kernels (GpuAttentionWgmma.*: asynchronous shared-memory reads up to each wait, which the
  # emulation checks and racecheck watches on the GPU; clean under memcheck, racecheck and synccheck in the
  # twenty-second session, ~16 s under racecheck) where their own first run passed.
  kernel_filter='GpuMlp.OddShapesMatchTheCpu:GpuAttention.*:GpuAttentionTc.MatchesTheRoundedCpuWithUnalignedBuffersAndSmallHeads:GpuAttentionTc.MatchesTheRoundedCpuForHeadsAbove128:GpuAttentionMma.MatchesTheRoundedCpuWithUnalignedBuffersAndSmallHeads:GpuAttentionMma.MatchesTheRoundedCpuForHeadsAbove128:GpuBf16Kernels.*:GpuLayerNorm.*:GpuEmbedding.*:GpuSoftmax.*:GpuCrossEntropy.*:GpuElementwise.*:GpuMatmul*:GpuDropout.*:GpuPhilox.*'
  # racecheck leaves out the tests that run cuBLASLt's products at large shapes: it reports shared-memory
  # hazards inside cuBLASLt's own Hopper kernels (nvjet_sm90_*, warp-specialised, synchronised through
  # mbarriers racecheck does not follow; 11 reports in GpuMatmulBf16.GeluEpilogueIsTheTanhForm and
  # …TrainingEpiloguesHaveAlgorithmsAtGpt2Shapes on an H200, none in our kernels: bench/RESULTS.md).
  race_filter='GpuAttention.*:GpuAttentionTc.MatchesTheRoundedCpuWithUnalignedBuffersAndSmallHeads:GpuAttentionTc.MatchesTheRoundedCpuForHeadsAbove128:GpuAttentionMma.MatchesTheRoundedCpuWithUnalignedBuffersAndSmallHeads:GpuAttentionMma.MatchesTheRoundedCpuForHeadsAbove128:GpuBf16Kernels.*:GpuLayerNorm.*:GpuEmbedding.*:GpuSoftmax.*:GpuCrossEntropy.*:GpuElementwise.*:GpuDropout.*:GpuPhilox.*:GpuCastMany.*:GpuReduce*:GpuOptimizer.*'
  # (The pipelined forward's training shapes stay out: T = 1024 over hundreds of blocks; its small shapes
  # are in. racecheck's reading of its mbarrier hand-overs is new in the twenty-third session.)
  if [[ $wgmma_ok -eq 1 ]]; then
    kernel_filter+=':GpuAttentionWgmma.*'
    race_filter+=':GpuAttentionWgmma.*'
  fi
  kernel_filter+='-GpuAttentionWgmma.*AtTrainingShapes'
  race_filter+='-GpuAttentionWgmma.*AtTrainingShapes'
  for tool in memcheck racecheck; do
    filter=$kernel_filter
    [[ $tool == racecheck ]] && filter=$race_filter
    if [[ $(left) -lt 120 ]]; then
      md "$tool on the kernel tests: not run (time budget)."
      continue
    fi
    say "$tool on the kernel tests"
    t0=$(date +%s)
    KRAKEN_HANG_WATCH_SCALE=20 KRAKEN_SOURCE_DIR="$root" OMP_NUM_THREADS=2 timeout $(( $(left) - 60 )) "$sanitizer" --tool "$tool" --error-exitcode 17 \
      "$build/tests/kraken_tests_gpu" --gtest_filter="$filter" > "$logs/$tool-kernels.log" 2>&1
    rc=$?
    md "$tool, tests/gpu kernel tests ($filter): exit status $rc in $(( $(date +%s) - t0 )) s."
    md_tail "$logs/$tool-kernels.log" 5
    # Each error the tool reports, with the test it came from and the kernel it names (addresses cut), so
    # the report says where without the log.
    awk '/^\[ RUN +\]/ { test = $NF } /========= (Error|Warning|Invalid|Race|Program hit)|=========  +and / {
           line = $0; gsub(/0x[0-9a-f]+/, "0x…", line); print test ": " line }' "$logs/$tool-kernels.log" |
      sort | uniq -c | sort -rn | head -n 40 > "$logs/$tool-kernels-errors.log"
    if [[ -s "$logs/$tool-kernels-errors.log" ]]; then
      md "Reports by test (count, test, line):"
      md_tail "$logs/$tool-kernels-errors.log" 40
    fi
    if [[ $rc -eq 124 ]]; then md "(stopped by the time budget: inconclusive)"
    elif [[ $rc -ne 0 ]]; then fail "$tool on the kernel tests"; fi
  done
else
  md "Not run: $([[ $have_gpu -eq 1 ]] && echo "compute-sanitizer not found" || echo "no GPU")."
fi

# ---- 6. CPU suite ------------------------------------------------------------------------------------------
md ""
md "## 6. CPU suite (ctest -LE gpu)"
cpu_time=$(( $(left) - 20 ))
if [[ $cpu_time -gt 30 ]]; then
  say "CPU suite, ${cpu_time} s at most"
  t0=$(date +%s)
  timeout "$cpu_time" ctest --test-dir "$build" -LE gpu -j "$jobs" --timeout 120 \
    --output-junit "$logs/cpu-tests.xml" > "$logs/cpu-tests.log" 2>&1
  rc=$?
  md "ctest exit status $rc after $(( $(date +%s) - t0 )) s$([[ $rc -eq 124 ]] && echo " (stopped by the time budget: the CPU suite is incomplete here; CI runs it in full)")."
  if [[ -f "$logs/cpu-tests.xml" ]]; then
    summarise_junit "$logs/cpu-tests.xml" brief
    read -r _ c_fail _ <<< "$(counts_of_last_summary)"
    [[ "${c_fail:-0}" -eq 0 ]] || fail "CPU suite (${c_fail} failed)"
  else
    grep -E "tests passed|Failed|\*\*\*" "$logs/cpu-tests.log" | tail -n 20 > "$logs/cpu-tests-summary.log"
    md_tail "$logs/cpu-tests-summary.log" 20
    [[ $rc -eq 124 ]] || fail "CPU suite"
  fi
else
  md "Not run: no time left in the budget (CI runs it in full)."
fi

# ---- 7. nvidia-smi -----------------------------------------------------------------------------------------
md ""
md "## 7. nvidia-smi"
md '```'
if [[ $have_gpu -eq 1 ]]; then nvidia-smi >> "$report" 2>&1; else echo "no GPU" >> "$report"; fi
md '```'
[[ $have_gpu -eq 1 ]] && nvidia-smi

md ""
if [[ ${#failures[@]} -eq 0 ]]; then
  md "## Result: PASSED in $(elapsed) s$([[ $have_gpu -eq 1 ]] || echo " (no GPU here: the GPU stages skipped)")"
  status=0
else
  md "## Result: FAILED in $(elapsed) s: $(IFS='; '; echo "${failures[*]}")"
  status=1
fi
[[ -n "${OUT:-}" ]] && cp "$report" "$build/gpu-report.md"
# The device tool returns the last 12,000 characters of the output: the report without its long
# per-test table and per-comparison lines (both stay in the file).
grep -v -E '^\| gpu\.|^\[gpu-vs-' "$report" | tail -c 11000
say "report: $report"
exit $status
