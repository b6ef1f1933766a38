# Sourced by tools/gpu-check.sh: the wgmma attention tests' ladder. Runs the GPU test binary's
# GpuAttentionWgmma.* under KRAKEN_CUDA_WGMMA=pipelined, and where that fails or hangs (status 124 from the
# tests' HangWatch or from timeout), under no-ping-pong, then lockstep; the first setting that passes is
# exported as KRAKEN_CUDA_WGMMA for the rest of the caller. Sets wgmma_ok (1: a setting passed),
# wgmma_setting and ctest_exclude (the ctest -E arguments for the GPU tests still to come). Needs from the
# caller: the functions say, md, md_tail and fail, and logs (a folder). tests/tools/gpu_wgmma_ladder_test.sh
# runs it with stand-in test binaries.
#   wgmma_ladder <test binary> <source dir> [first limit, s (90)] [later limits, s (60)]
wgmma_ladder() {
  local binary=$1 source_dir=$2 limit=${3:-90} later_limit=${4:-60} setting t0 rc
  wgmma_ok=0
  wgmma_setting=
  ctest_exclude=()
  for setting in pipelined no-ping-pong lockstep; do
    say "the wgmma kernels' tests, KRAKEN_CUDA_WGMMA=$setting"
    t0=$(date +%s)
    KRAKEN_CUDA_WGMMA=$setting KRAKEN_SOURCE_DIR="$source_dir" OMP_NUM_THREADS=2 timeout "$limit" \
      "$binary" --gtest_filter='GpuAttentionWgmma.*' > "$logs/gpu-tests-wgmma-$setting.log" 2>&1
    rc=$?
    md "The wgmma kernels' tests first (GpuAttentionWgmma.*, KRAKEN_CUDA_WGMMA=$setting): exit status $rc in $(( $(date +%s) - t0 )) s."
    grep -E '^\[gpu-wgmma\]|^\[gpu-hang\]|^\[( +OK|  FAILED|  SKIPPED|  PASSED) ' "$logs/gpu-tests-wgmma-$setting.log" | head -n 40 \
      > "$logs/gpu-tests-wgmma-$setting-summary.log"
    md_tail "$logs/gpu-tests-wgmma-$setting-summary.log" 40
    if [[ $rc -eq 0 ]]; then
      wgmma_ok=1
      wgmma_setting=$setting
      break
    fi
    md_tail "$logs/gpu-tests-wgmma-$setting.log" 30
    fail "the wgmma kernels' tests under KRAKEN_CUDA_WGMMA=$setting (exit status $rc)"
    limit=$later_limit
  done
  if [[ $wgmma_ok -eq 1 ]]; then
    export KRAKEN_CUDA_WGMMA=$wgmma_setting
    if [[ $wgmma_setting != pipelined ]]; then
      md "From here on KRAKEN_CUDA_WGMMA=$wgmma_setting: the kernels it rules out are left out of the tests and the benchmark."
      # (under lockstep the pipelined kernels' tests and the mbarrier probe skip; the failure is recorded above)
      [[ $wgmma_setting == lockstep ]] && ctest_exclude=(-E 'GpuAttentionWgmma[.](MbarrierPipelineProbe|PipelinedKernels)')
    fi
  else
    wgmma_setting=pipelined  # (nothing wgmma runs after this; the name only labels what was tried first)
    md "No KRAKEN_CUDA_WGMMA setting passed: the wgmma kernels are left out of the tests and the benchmark."
    ctest_exclude=(-E 'GpuAttentionWgmma')  # (they would fail or hang again under ctest's 300 s)
  fi
  return 0
}
