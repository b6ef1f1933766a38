#!/usr/bin/env bash
# Where a training step's GPU time goes: every kernel of one bf16 step of each benchmark model, timed
# by Nsight Compute (ncu), summed per kernel and ranked. Run after tools/gpu-check.sh on the same
# machine (it uses that build, build-gpu/bin/gpu_train_bench):
#
#   bash tools/gpu-check.sh; bash tools/gpu-profile.sh [gpt2|kraken4 ...]     (default: both)
#
# ncu runs the program with --warmup 0 --steps 1, so the list also holds the few kernels that
# initialise the weights (Philox normal fills) before the step. Each kernel is timed alone (ncu
# serialises them), with the clocks and caches left as they are (--clock-control none --cache-control
# none): the sum is the step's GPU time without overlap, close to the step time for this runtime,
# which issues everything on one stream. Report: $OUT/gpu-profile.md when OUT is set, else
# build-gpu/gpu-profile.md.
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
status=0
for model in "${models[@]}"; do
  csv="$build/gpu-profile-$model.csv"
  echo "gpu-profile: $model under $ncu_bin"
  t0=$(date +%s)
  "$ncu_bin" --metrics gpu__time_duration.sum --clock-control none --cache-control none --csv --page raw \
    --print-units base "$bench" --model "$model" --precision bf16 --batch 8 --training-only --warmup 0 --steps 1 \
    > "$csv" 2> "$build/gpu-profile-$model.log"
  rc=$?
  echo "## $model (ncu exit status $rc, $(( $(date +%s) - t0 )) s)" >> "$report"
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
cat "$report"
exit $status
