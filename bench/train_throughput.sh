#!/usr/bin/env bash
# Training throughput on CPU for the issue's shape: L=4, C=256, H=4, V=50257, B=4, T=256, 2 threads,
# degree 1 (GPT-2) and degree 2 (Kraken, e = 2, no bias). Runs each config REPEATS times (default 3),
# alternating, and prints per run the median tokens/s of steps 3..10 and the peak resident memory.
#
#   bench/train_throughput.sh [build-dir]        (needs the demo shards: scripts/setup-demo.sh)
#
# For reference: llm.c's CPU trainer (train_gpt2.c, -Ofast) manages about 320 tokens/s on this shape
# on these machines (research/llmc.md §7).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${1:-$root/build}"
repeats="${REPEATS:-3}"
cd "$root"
for ((i = 1; i <= repeats; i++)); do
  for c in cpu_d1 cpu_d2; do
    /usr/bin/time -f "%M" -o /tmp/kraken_rss.$$ env OMP_NUM_THREADS=2 "$build/bin/kraken-train" "bench/configs/$c.toml" --quiet >/dev/null
    python3 - "$c" "runs/bench_$c/metrics.jsonl" "$(cat /tmp/kraken_rss.$$)" <<'PY'
import json, statistics, sys
name, path, rss_kb = sys.argv[1], sys.argv[2], int(sys.argv[3])
recs = [json.loads(l) for l in open(path) if '"loss"' in l]
tps = statistics.median(r["tokens_per_second"] for r in recs[2:])
print(f"{name}: {tps:.0f} tokens/s (median of steps 3-{len(recs)}), peak RSS {rss_kb / 1024:.0f} MiB")
PY
  done
done
rm -f /tmp/kraken_rss.$$
