#!/usr/bin/env bash
# Where a training step's GPU time goes: every kernel of one bf16 step of each benchmark model, timed
# by Nsight Compute (ncu), summed per kernel and ranked. Run after tools/gpu-check.sh on the same
# machine (it uses that build, build-gpu/bin/gpu_train_bench):
#
#   bash tools/gpu-check.sh; bash tools/gpu-profile.sh [gpt2|kraken4 ...]     (default: both)
#
# KRAKEN_PROFILE_BATCH=B profiles a step of B sequences (default 8; the benchmark's largest is 64).
# ncu runs the program with --warmup 1 --steps 1 and collection off until the timed step starts
# (--profile-from-start off; gpu_train_bench brackets its timed steps with cudaProfilerStart/Stop), so
# the list is one steady-state step: its gradients already exist and are added into, the optimizer's
# bf16 copies are current, every plan is built — none of the first step's set-up, and no weight
# initialisation (until the eleventh session: the first step, from fresh). Each kernel is timed alone (ncu
# serialises them), with the clocks and caches left as they are (--clock-control none --cache-control
# none): the sum is the step's GPU time without overlap, close to the step time for this runtime,
# which issues everything on one stream. Then, where KRAKEN_PROFILE_KERNELS (regexes) or
# KRAKEN_PROFILE_ATTENTION=1 asks, single kernels under ncu --set full (below). Report:
# $OUT/gpu-profile.md (and gpu-profile-kernels.txt) when OUT is set, else build-gpu/.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
build="${KRAKEN_GPU_CHECK_BUILD:-build-gpu}"
bench="$build/bin/gpu_train_bench"
ncu_bin=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2> /dev/null | head -n 1)
if [[ -n "${OUT:-}" ]]; then report="$OUT/gpu-profile.md"; else report="$build/gpu-profile.md"; fi
models=("$@")
[[ ${#models[@]} -gt 0 ]] || models=(gpt2 kraken4)
[[ -x "$bench" ]] || { echo "gpu-profile: $bench is not built (run tools/gpu-check.sh first)"; exit 2; }
[[ -n "$ncu_bin" && -x "$ncu_bin" ]] || { echo "gpu-profile: ncu (Nsight Compute) not found"; exit 2; }

echo "# Where a bf16 training step's GPU time goes (tools/gpu-profile.sh)" > "$report"
echo "" >> "$report"
# The switches this profile ran under (the variables the kernels and ops read), so that a report says so.
switches=$(env | grep -E '^KRAKEN_' | grep -vE '^KRAKEN_(PROFILE_|GPU_CHECK_|SOURCE_DIR|THIRD_PARTY)' | sort | tr '\n' ' ')
echo "Switches: ${switches:-none (the defaults)}" >> "$report"
echo "" >> "$report"
status=0
for model in "${models[@]}"; do
  csv="$build/gpu-profile-$model.csv"
  echo "gpu-profile: $model under $ncu_bin"
  t0=$(date +%s)
  "$ncu_bin" --metrics gpu__time_duration.sum --clock-control none --cache-control none --profile-from-start off \
    --csv --page raw --print-units base "$bench" --model "$model" --precision bf16 --batch "${KRAKEN_PROFILE_BATCH:-8}" \
    --training-only --no-host-probe --warmup 1 --steps 1 > "$csv" 2> "$build/gpu-profile-$model.log"
  rc=$?
  echo "## $model, B = ${KRAKEN_PROFILE_BATCH:-8} (ncu exit status $rc, $(( $(date +%s) - t0 )) s)" >> "$report"
  [[ $rc -eq 0 ]] || { status=1; tail -n 20 "$build/gpu-profile-$model.log" >> "$report"; continue; }
  python3 - "$csv" >> "$report" <<'PY'
import csv, re, sys
from collections import defaultdict
# ncu's CSV: "==PROF==" lines and the program's own output first, then a header row, a units row, and
# one row per kernel launch.
lines = open(sys.argv[1], errors="replace").read().splitlines()
start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
if start is None:
    print("no kernel rows in ncu's output"); sys.exit(0)
rows = list(csv.DictReader(lines[start:]))
name_key = next(k for k in rows[0] if k in ("Kernel Name", "Function Name", "Demangled Name"))
time_key = next(k for k in rows[0] if k.startswith("gpu__time_duration"))
total, count = defaultdict(float), defaultdict(int)
for r in rows:
    try: t = float(r[time_key].replace(",", ""))
    except ValueError: continue  # the units row
    # One row per kernel, not per template instance or argument list: keep the name and its template
    # arguments, drop the parameter list.
    name = r[name_key].replace("(anonymous namespace)::", "").replace("kraken::kernels::", "")
    name = re.sub(r"^void ", "", re.sub(r"\(.*$", "", name))
    total[name] += t; count[name] += 1
s = sum(total.values())
print(f"{sum(count.values())} kernel launches, {s / 1e6:.2f} ms of kernel time in all.\n")
print("| kernel | launches | ms | % | µs per launch |\n|---|---|---|---|---|")
for name, t in sorted(total.items(), key=lambda kv: -kv[1])[:40]:
    print(f"| `{name[:110]}` | {count[name]} | {t / 1e6:.3f} | {100 * t / s:.1f} | {t / count[name] / 1e3:.1f} |")
print()
PY
done

# Then single kernels under ncu's full set of sections (speed of light, occupancy, registers, warp stall
# reasons, memory workload): why they run where they do, not only how long. One launch each (the first of
# its kind in the steady-state step), for each model profiled above, at KRAKEN_PROFILE_BATCH. Which: the regexes in
# KRAKEN_PROFILE_KERNELS (e.g. "layernorm_backward_fused cross_entropy_fused"), and with
# KRAKEN_PROFILE_ATTENTION=1 the three mma attention kernels (run with KRAKEN_CUDA_ATTENTION=mma: the
# default takes cuDNN's). bench/RESULTS.md has the last ones.
detail_kernels=()
[[ "${KRAKEN_PROFILE_ATTENTION:-0}" == 1 ]] &&
  detail_kernels+=(attention_forward_mma_kernel attention_backward_kv_mma_kernel attention_backward_q_mma_kernel)
read -r -a asked <<< "${KRAKEN_PROFILE_KERNELS:-}"
detail_kernels+=("${asked[@]}")
if [[ ${#detail_kernels[@]} -gt 0 ]]; then
  details="$build/gpu-profile-kernels.txt"
  : > "$details"
  for model in "${models[@]}"; do
    for kernel in "${detail_kernels[@]}"; do
      attention=()
      [[ "$kernel" == attention_*mma* ]] && attention=(KRAKEN_CUDA_ATTENTION=mma)
      echo "gpu-profile: $model $kernel, full section set"
      echo "===== $model, B = ${KRAKEN_PROFILE_BATCH:-8}: $kernel =====" >> "$details"
      env "${attention[@]}" "$ncu_bin" --set full --kernel-name "regex:$kernel" --launch-count 1 --print-summary none \
        --profile-from-start off "$bench" --model "$model" --precision bf16 --batch "${KRAKEN_PROFILE_BATCH:-8}" \
        --training-only --no-host-probe --warmup 1 --steps 1 2>&1 | grep -v '^==PROF==' | sed -n "/$kernel/,\$p" \
        >> "$details" || status=1
    done
  done
  [[ -n "${OUT:-}" ]] && cp "$details" "$OUT/gpu-profile-kernels.txt"
  echo "## Kernels in detail" >> "$report"
  echo "" >> "$report"
  echo "ncu --set full, one launch of each: $(basename "$details") beside this report." >> "$report"
  # The lines that say most, pulled up: throughputs, occupancy, registers, the top stall reasons.
  grep -E '=====|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|Duration|Registers Per Thread|Achieved Occupancy|Theoretical Occupancy|Block Limit|Issue Slots Busy|Warp Cycles Per Issued|Executed Ipc Active|L1/TEX Hit|L2 Hit|Shared Memory|Bank' "$details" \
    | head -n 300 >> "$report"
fi
cat "$report"
exit $status
