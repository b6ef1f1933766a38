#!/usr/bin/env bash
# OptEx against AdamW on the demo corpus: validation loss against sequential iterations and against
# wall time, for AdamW and OptEx (base AdamW) with N = 2 and 4 in one process, and N = 4 as 4 rank
# groups under mpirun. Writes a table to stdout and two SVG plots beside it.
#
#   bench/optex_demo.sh [build-dir] [out-dir]        (needs scripts/setup-demo.sh first)
#
# What the axes mean: OptEx's claims are about *sequential iterations* — one iteration takes N
# gradient evaluations, run one after another in one process (so it costs about N× the wall time of
# an AdamW step there) or at the same time on N groups of ranks. The wall-time plot shows what a
# single machine actually gets. "outside" is the time an iteration spends outside gradient
# evaluation: fitting the estimator, the proxy steps, the exchange.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${1:-$root/build}"
out="${2:-$root/runs/optex_demo}"
iters="${ITERS:-60}"
train="$build/bin/kraken-train"
mkdir -p "$out"

write_config() {  # name optimizer parallelism groups threads
  local optim="name = \"adamw\""
  [ "$2" = optex ] && optim="name = \"optex\""
  cat > "$out/$1.toml" <<TOML
# A small degree-2 Kraken over the GPT-2 vocabulary (3.3M parameters, 3.2M of them the embedding).
[model]
n_layer = 2
n_embd = 64
n_head = 4
degree = 2
context = 64
vocab_size = 50257
[data]
train = "$root/demo/data/sotu_train_*.bin"
val = "$root/demo/data/sotu_val_*.bin"
[train]
batch_size = 8
seq_len = 64
max_steps = $iters
eval_every = 10
eval_batches = 16
threads = $5
out_dir = "$out/$1"
[optim]
$optim
lr = 1e-2
min_lr = 1e-3
warmup_steps = 5
[checkpoint]
resume = "none"
every = 1000000
TOML
  if [ "$2" = optex ]; then
    printf '[optim.optex]\nparallelism = %s\nhistory = 16\nlengthscale = 1.0\nbase = "adamw"\n[parallel]\noptex_groups = %s\n' "$3" "$4" >> "$out/$1.toml"
  fi
}

write_config adamw adamw 1 1 2
write_config optex_n2 optex 2 1 2
write_config optex_n4 optex 4 1 2
write_config optex_n4_groups optex 4 4 1
"$train" "$out/adamw.toml" --quiet >/dev/null
"$train" "$out/optex_n2.toml" --quiet >/dev/null
"$train" "$out/optex_n4.toml" --quiet >/dev/null
mpirun -n 4 --oversubscribe --allow-run-as-root "$train" "$out/optex_n4_groups.toml" --quiet >/dev/null

python3 - "$out" <<'PY'
import json, statistics, sys
out = sys.argv[1]
runs = ["adamw", "optex_n2", "optex_n4", "optex_n4_groups"]
print("| run | val loss @10 | @30 | @last | wall s @last | grad evals @last | s/iteration | outside gradients s/iter | proxy rel. error | proxy cosine |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in runs:
    recs = [json.loads(l) for l in open(f"{out}/{r}/metrics.jsonl")]
    steps = [x for x in recs if "loss" in x]
    vals = {x["step"]: x["val_loss"] for x in recs if "val_loss" in x}
    elapsed = {x["step"]: x["elapsed_s"] for x in steps}
    last = max(vals)
    evals = steps[-1].get("grad_evals", steps[-1]["step"])
    sec = statistics.median(x["step_seconds"] for x in steps[2:])
    outside = [x["optex_outside_gradients_s"] for x in steps if "optex_outside_gradients_s" in x]
    err = [x["optex_rel_error"] for x in steps if x.get("optex_rel_error") is not None]
    cos = [x["optex_cosine"] for x in steps if x.get("optex_cosine") is not None]
    f = lambda v: f"{v:.3f}" if v is not None else "-"
    print(f"| {r} | {f(vals.get(10))} | {f(vals.get(30))} | {f(vals[last])} | {elapsed[last]:.1f} | {evals} | {sec:.3f} | "
          f"{f(statistics.median(outside)) if outside else '-'} | {f(statistics.median(err)) if err else '-'} | "
          f"{f(statistics.median(cos)) if cos else '-'} |")
PY
files=""; for r in adamw optex_n2 optex_n4 optex_n4_groups; do files="$files $out/$r/metrics.jsonl"; done
python3 "$root/tools/plot_metrics.py" $files --labels adamw,optex-N2,optex-N4,optex-N4-4groups --y val_loss \
  --title "validation loss vs sequential iterations" -o "$out/val_vs_iterations.svg"
python3 "$root/tools/plot_metrics.py" $files --labels adamw,optex-N2,optex-N4,optex-N4-4groups --y val_loss \
  --x elapsed_s --title "validation loss vs wall time (s)" -o "$out/val_vs_wall.svg"
