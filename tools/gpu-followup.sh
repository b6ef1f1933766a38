#!/usr/bin/env bash
# A second, short GPU call after tools/gpu-check.sh on the same lease: what a change made since that call
# needs, in ~3 minutes of device time instead of gpu-check's ~6. It builds only the GPU tests and the
# benchmark (the same configuration as gpu-check), runs the GPU tests a gtest filter names, the whole
# benchmark once with the SM clock and power sampled (tools/gpu-clocks.sh), then the benchmark's bf16
# training rows once per variant: each argument one set of VAR=value words, each in a process of its own
# (the switches are read once per process).
#
#   KRAKEN_FOLLOWUP_TESTS='GpuLayerNorm.*:GpuModel.*' bash tools/gpu-followup.sh 'KRAKEN_CUBLASLT_PICKS=0' ...
#
# An empty argument is a variant with the defaults. A variant may end with benchmark arguments of its own,
# which override the common ones: 'KRAKEN_CUDNN_ATTENTION_BACKWARD=atomic --model gpt2 --batch 64', or
# '--model none --kernel-tables' (the kernel tables alone, after a common --training-only).
# For one model's rows alone on a card that gpu-check
# did not run on (the H100 of the issue's target), without the whole benchmark first:
#
#   KRAKEN_FOLLOWUP_WHOLE_BENCH=0 KRAKEN_FOLLOWUP_BENCH_ARGS='--training-only --precision bf16
#     --model kraken4-768 --batch 32' bash tools/gpu-followup.sh '' KRAKEN_CUBLASLT_TUNE=8 ...
#
# Environment: KRAKEN_FOLLOWUP_TESTS (gtest filter; unset: no tests, and the GPU tests are not built),
# KRAKEN_FOLLOWUP_WHOLE_BENCH (0: skip the whole benchmark's run; default 1), KRAKEN_FOLLOWUP_BENCH_ARGS (the
# variants' gpu_train_bench arguments, default "--training-only --precision bf16 --batch 8,64"),
# KRAKEN_FOLLOWUP_BUDGET (seconds from the start; a variant is skipped, and the report says so, where the
# longest one so far would end past it, and one that starts is cut where the budget ends (its rows so far
# kept: the benchmark writes its report as it goes) — so that the call ends inside the device's limit with
# its report; unset or 0: no budget, 120 s a variant; put the variants in the order they matter),
# KRAKEN_GPU_CHECK_BUILD and KRAKEN_THIRD_PARTY as for gpu-check. Writes $OUT/followup.md when OUT is set
# (else <build>/followup.md), the logs in <build>/followup/; exit status 0 when everything that ran passed.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
root="$PWD"
build="${KRAKEN_GPU_CHECK_BUILD:-build-gpu}"
third_party="${KRAKEN_THIRD_PARTY:-third_party}"
[[ "$third_party" = /* ]] || third_party="$root/$third_party"
[[ "$build" = /* ]] || build="$root/$build"
# The logs stay in the build folder: the device tool brings back only so many files from $OUT, and the
# report must be among them.
out="$build/followup"
mkdir -p "$out"
report="${OUT:-$build}/followup.md"
: > "$report"
start=$(date +%s)
status=0
md() { printf '%s\n' "$*" >> "$report"; }
say() { echo "gpu-followup [$(( $(date +%s) - start ))s]: $*"; }

md "# GPU follow-up (tools/gpu-followup.sh) at $(git -C "$root" rev-parse --short HEAD 2> /dev/null)$(git -C "$root" diff --quiet 2> /dev/null || echo ' + changes')"
say "configure and build"
source "$root/tools/gpu-libraries.sh"
targets=(gpu_train_bench)
[[ -n "${KRAKEN_FOLLOWUP_TESTS:-}" ]] && targets+=(kraken_tests_gpu)
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKRAKEN_CUDA=ON -DKRAKEN_MPI=OFF \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DKRAKEN_CUDA_EMU_ASAN=OFF -DKRAKEN_THIRD_PARTY="$third_party" > "$out/configure.log" 2>&1 &&
  ninja -C "$build" "${targets[@]}" > "$out/build.log" 2>&1
rc=$?
md "Build (${targets[*]}): exit status $rc after $(( $(date +%s) - start )) s."
md "$(grep -m1 'Kraken: CUDA' "$out/configure.log" | sed 's/^-- //')"
if [[ $rc -ne 0 ]]; then
  { echo '```'; tail -n 40 "$out/configure.log" "$out/build.log"; echo '```'; } >> "$report"
  cat "$report"
  exit 1
fi

if [[ -n "${KRAKEN_FOLLOWUP_TESTS:-}" ]]; then
  say "GPU tests $KRAKEN_FOLLOWUP_TESTS"
  KRAKEN_SOURCE_DIR="$root" timeout 240 "$build/tests/kraken_tests_gpu" --gtest_filter="$KRAKEN_FOLLOWUP_TESTS" \
    > "$out/tests.log" 2>&1
  rc=$?
  md ""
  md "GPU tests \`$KRAKEN_FOLLOWUP_TESTS\`: exit status $rc."
  { echo '```'; grep -E '^\[( +OK|  FAILED|  SKIPPED|  PASSED) |Failure|error' "$out/tests.log" | tail -n 60; echo '```'; } >> "$report"
  [[ $rc -eq 0 ]] || status=1
fi

if [[ "${KRAKEN_FOLLOWUP_WHOLE_BENCH:-1}" != 0 ]]; then
  say "benchmark"
  rm -f "$out/bench.md"  # (a warm machine keeps the build folder: no earlier call's table read as this one's)
  bash "$root/tools/gpu-clocks.sh" "$out/bench-clocks.csv" timeout 180 "$build/bin/gpu_train_bench" --out "$out/bench.md" \
    > "$out/bench.log" 2>&1
  rc=$?
  md ""
  md "bench/gpu_train_bench: exit status $rc."
  grep '^gpu-clocks:' "$out/bench.log" >> "$report"
  if [[ -f "$out/bench.md" ]]; then cat "$out/bench.md" >> "$report"; else tail -n 30 "$out/bench.log" >> "$report"; fi
  [[ $rc -eq 0 ]] || status=1
fi

# (-d '': every line of the arguments, where a plain read would take the first line only)
read -r -d '' -a bench_args <<< "${KRAKEN_FOLLOWUP_BENCH_ARGS:---training-only --precision bf16 --batch 8,64}"
n=0
budget="${KRAKEN_FOLLOWUP_BUDGET:-0}"
longest=0  # the longest variant so far, in seconds
for setting in "$@"; do
  n=$((n + 1))
  began=$(date +%s)
  if [[ "$budget" -gt 0 && $(( began - start + longest )) -gt "$budget" ]]; then
    say "skipped ${setting:-the defaults} (budget)"
    md ""
    md "With ${setting:-the defaults}: skipped — $(( began - start )) s spent and the longest variant took ${longest} s, against a budget of ${budget} s."
    continue
  fi
  say "benchmark with ${setting:-the defaults}"
  # A setting's VAR=value words go to the environment, its other words (from the first one starting with
  # "--") after the common arguments, where the benchmark's parser lets the later value win.
  words=() variables=() extra_args=()
  read -r -a words <<< "$setting"
  for w in ${words[@]+"${words[@]}"}; do
    if [[ ${#extra_args[@]} -eq 0 && "$w" != --* ]]; then variables+=("$w"); else extra_args+=("$w"); fi
  done
  # At most 120 s, and no later than the budget allows (the estimate above is the longest so far: a longer
  # variant is cut at the budget, its line still written).
  limit=120
  if [[ "$budget" -gt 0 ]]; then
    left=$(( budget - (began - start) ))
    [[ $left -lt $limit ]] && limit=$left
    [[ $limit -lt 10 ]] && limit=10
  fi
  rm -f "$out/bench-$n.md"  # (see the whole benchmark's run above)
  env ${variables[@]+"${variables[@]}"} bash "$root/tools/gpu-clocks.sh" "$out/bench-$n-clocks.csv" timeout "$limit" \
    "$build/bin/gpu_train_bench" "${bench_args[@]}" ${extra_args[@]+"${extra_args[@]}"} --out "$out/bench-$n.md" \
    > "$out/bench-$n.log" 2>&1
  rc=$?
  md ""
  md "With ${setting:-the defaults}: exit status $rc (limit ${limit} s)."
  grep -E '^gpu-clocks:|^cuDNN attention' "$out/bench-$n.log" | sort -u >> "$report"
  # KRAKEN_CUBLASLT_TUNE's entries for kernels/cuda/cublaslt_picks.inc, where the variant asked for them
  grep -E '^cuBLASLt (pick|tune)' "$out/bench-$n.log" | sort -u | sed 's/^/    /' >> "$report"
  if [[ -f "$out/bench-$n.md" ]]; then
    # The table, then a --timeline section whole (KRAKEN_BENCH_TIMELINE=1 as a variant's setting).
    sed "/^### One step's timeline/q" "$out/bench-$n.md" | grep -E '^\|' >> "$report"
    grep -q "^### One step's timeline" "$out/bench-$n.md" && sed -n "/^### One step's timeline/,\$p" "$out/bench-$n.md" >> "$report"
  else
    tail -n 20 "$out/bench-$n.log" >> "$report"
  fi
  [[ $rc -eq 0 ]] || status=1
  took=$(( $(date +%s) - began ))
  [[ $took -gt $longest ]] && longest=$took
done
md ""
md "Done in $(( $(date +%s) - start )) s, exit status $status."
cat "$report"
exit $status
