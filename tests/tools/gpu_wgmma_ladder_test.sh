#!/usr/bin/env bash
# tools/gpu-wgmma-ladder.sh on the CPU, with a stand-in for the GPU test binary whose result under each
# KRAKEN_CUDA_WGMMA setting the case chooses: pass (0), fail (1), a HangWatch's exit (124) or a hang that
# the ladder's own limit ends. Checks the setting exported, the ctest exclusions, the failures recorded
# and what the stand-in was run with. (gpu-check runs the ladder only on a GPU machine, which is rare.)
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
errors=0
check() {  # what, got, want
  if [[ "$2" != "$3" ]]; then
    echo "FAILED: $1: got '$2', want '$3'"
    errors=$((errors + 1))
  fi
}

# The stand-in: records its setting and filter, then does what $work/outcome-<setting> says.
cat > "$work/tests_gpu" <<'STUB'
#!/usr/bin/env bash
echo "$KRAKEN_CUDA_WGMMA $*" >> "$STUB_CALLS"
case "$(cat "$STUB_DIR/outcome-$KRAKEN_CUDA_WGMMA")" in
  pass) echo "[  PASSED  ] 7 tests."; exit 0 ;;
  fail) echo "[  FAILED  ] GpuAttentionWgmma.PipelinedKernelsAreTheLockstepOnesBits"; exit 1 ;;
  watch) echo "[gpu-hang] pipelined kernels B=2 T=1 D=64: the forward with ping-pong did not finish in 10 s" >&2; exit 124 ;;
  hang) sleep 30; exit 0 ;;
esac
STUB
chmod +x "$work/tests_gpu"
export STUB_DIR=$work STUB_CALLS=$work/calls

# case name, outcome under pipelined, no-ping-pong, lockstep; then the expected wgmma_ok, setting, exclusion,
# failures recorded and the settings run
run_case() {
  local name=$1
  echo "$2" > "$work/outcome-pipelined"
  echo "$3" > "$work/outcome-no-ping-pong"
  echo "$4" > "$work/outcome-lockstep"
  : > "$STUB_CALLS"
  (
    logs=$work/logs-$name
    mkdir -p "$logs"
    report=$work/report-$name.md
    failures=()
    say() { :; }
    md() { printf '%s\n' "$*" >> "$report"; }
    md_tail() { tail -n "$2" "$1" >> "$report"; }
    fail() { failures+=("$1"); }
    unset KRAKEN_CUDA_WGMMA
    source "$root/tools/gpu-wgmma-ladder.sh"
    wgmma_ladder "$work/tests_gpu" "$root" 2 2
    printf "%s\t%s\t%s\t%s\t%s\n" "$wgmma_ok" "$wgmma_setting" "${KRAKEN_CUDA_WGMMA:-unset}" "${ctest_exclude[*]:-none}" "${#failures[@]}"
  ) > "$work/result-$name"
  IFS=$'\t' read -r ok setting exported exclude failed < "$work/result-$name"
  check "$name: wgmma_ok" "$ok" "$5"
  check "$name: setting" "$setting" "$6"
  check "$name: KRAKEN_CUDA_WGMMA exported" "$exported" "$7"
  check "$name: ctest exclusion" "$exclude" "$8"
  check "$name: failures recorded" "$failed" "$9"
  check "$name: settings run" "$(cut -d' ' -f1 "$STUB_CALLS" | tr '\n' ' ')" "${10}"
  check "$name: filter" "$(cut -d' ' -f2- "$STUB_CALLS" | sort -u)" "--gtest_filter=GpuAttentionWgmma.*"
}

run_case all-pass pass pass pass 1 pipelined pipelined none 0 "pipelined "
run_case turns-hang watch pass pass 1 no-ping-pong no-ping-pong none 1 "pipelined no-ping-pong "
run_case hang-then-fail hang fail pass 1 lockstep lockstep \
  "-E GpuAttentionWgmma[.](MbarrierPipelineProbe|PipelinedKernels)" 2 "pipelined no-ping-pong lockstep "
run_case none-pass fail watch fail 0 pipelined unset "-E GpuAttentionWgmma" 3 "pipelined no-ping-pong lockstep "
grep -q "KRAKEN_CUDA_WGMMA=lockstep): exit status 0" "$work/report-hang-then-fail.md" ||
  { echo "FAILED: the report does not say lockstep passed"; errors=$((errors + 1)); }
grep -q "KRAKEN_CUDA_WGMMA=pipelined): exit status 124" "$work/report-hang-then-fail.md" ||
  { echo "FAILED: the report does not give the hang's status 124"; errors=$((errors + 1)); }

if [[ $errors -eq 0 ]]; then echo "gpu-wgmma-ladder: all cases as expected"; fi
exit $((errors > 0))
