#!/usr/bin/env bash
# Parallel training on CPU ranks: data-parallel scaling, and how much tensor-parallel all-reduce time
# Kraken hides behind compute compared with Megatron-style tensor parallelism.
#
#   bench/parallel_bench.sh [build-dir]        (needs the demo shards: scripts/setup-demo.sh)
#
# Method (repeat it on GPUs by setting device = "cuda" and one rank per GPU):
#  1. Data parallel: the same model and per-rank batch at dp = 1, 2, 4 (weak scaling). Step time is
#     the median of steps 3..N from metrics.jsonl; dp_comm_s is how long the bucket all-reduces ran on
#     the communication thread, dp_wait_s how long the step stood waiting for them after backward.
#     On this 2-core machine the ranks share the cores (threads per rank = 2 / ranks), so the ideal
#     total throughput is flat, not linear: efficiency = tokens/s at N ranks / tokens/s at 1 rank.
#  2. Tensor parallel at tp = 2: GPT-2 (degree 1, Megatron-style: 2 blocking all-reduces per layer
#     forward and 2 backward) against Kraken (degree 2: one asynchronous all-reduce per layer each
#     way, started before the next layer's attention and waited on at LN2) with about the same
#     parameter count. tp_comm_s is the time the tp all-reduces ran, tp_wait_s the time compute
#     blocked on them: hidden = 1 − wait/comm. On CPU ranks whose cores are all busy computing, the
#     reduction itself needs a core, so little can hide here; on GPUs the reduction runs on the NIC /
#     NVLink and a side stream while the SMs compute.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${1:-$root/build}"
train="$build/bin/kraken-train"
[ -x "$train" ] || { echo "build kraken-train first ($train)"; exit 1; }
ls "$root"/demo/data/sotu_train_*.bin >/dev/null 2>&1 || { echo "run scripts/setup-demo.sh first"; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
steps=${STEPS:-8}
mpirun_cmd() { mpirun -n "$1" --oversubscribe --allow-run-as-root "${@:2}"; }

write_config() {  # name n_embd n_head degree mlp bias dp tp batch threads
  cat > "$work/$1.toml" <<TOML
[model]
n_layer = 4
n_embd = $2
n_head = $3
degree = $4
context = 256
vocab_size = 50257
mlp_expansion = $5
bias = $6
[data]
train = "$root/demo/data/sotu_train_*.bin"
shuffle = false
[train]
batch_size = $9
seq_len = 256
max_steps = $steps
threads = ${10}
out_dir = "$work/runs/$1"
[optim]
name = "adamw"
lr = 6e-4
[checkpoint]
resume = "none"
every = 1000000
[parallel]
dp = $7
tp = $8
TOML
}

summarise() {  # name label ranks
  python3 - "$work/runs/$1/metrics.jsonl" "$2" "$3" <<'PY'
import json, statistics, sys
path, label, ranks = sys.argv[1], sys.argv[2], int(sys.argv[3])
recs = [json.loads(l) for l in open(path) if '"loss"' in l]
tail = recs[2:] if len(recs) > 3 else recs
med = lambda k: statistics.median(r.get(k, 0.0) for r in tail)
step = med("step_seconds")
line = f"| {label} | {ranks} | {step*1000:.0f} | {med('tokens_per_second'):.0f} |"
for comm, wait in (("dp_comm_s", "dp_wait_s"), ("tp_comm_s", "tp_wait_s")):
    if comm in tail[0]:
        c, w = med(comm), med(wait)
        hidden = 1 - w / c if c > 0 else float("nan")
        line += f" {comm[:2]}: {c*1000:.1f} ms ran, {w*1000:.1f} ms waited, {hidden*100:.0f}% hidden |"
print(line)
PY
}

echo "## Data parallel (L=4, C=256, H=4, degree 1, B=4 per rank, T=256; 2 cores shared)"
echo "| layout | ranks | step ms | tokens/s (all ranks) | communication |"
echo "|---|---|---|---|---|"
for dp in 1 2 4; do
  threads=$(( 2 / dp > 0 ? 2 / dp : 1 ))
  write_config "dp$dp" 256 4 1 4 true "$dp" 1 4 "$threads"
  if [ "$dp" = 1 ]; then "$train" "$work/dp1.toml" --quiet >/dev/null; else mpirun_cmd "$dp" "$train" "$work/dp$dp.toml" --quiet >/dev/null; fi
  summarise "dp$dp" "dp=$dp" "$dp"
done

echo
echo "## Tensor parallel tp=2, equal parameter count (L=4, B=4, T=256, one thread per rank)"
echo "| model | ranks | step ms | tokens/s | tp all-reduce |"
echo "|---|---|---|---|---|"
# GPT-2: 12·C² per layer at C=256; Kraken k=2, e=2: 2·8·C'² at C'=224 (within 2%).
write_config megatron 256 4 1 4 true 1 2 4 1
mpirun_cmd 2 "$train" "$work/megatron.toml" --quiet >/dev/null
summarise megatron "GPT-2 degree 1, Megatron tp=2" 2
write_config kraken 224 4 2 2 false 1 2 4 1
mpirun_cmd 2 "$train" "$work/kraken.toml" --quiet >/dev/null
summarise kraken "Kraken degree 2, tp=2" 2
