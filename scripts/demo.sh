#!/usr/bin/env bash
# The README's first command: installs what Kraken needs, builds it, fetches and tokenises the demo
# corpus, trains configs/demo.toml, then evaluates perplexity, samples text and exports the model.
# Safe to run again: finished steps are skipped, and training resumes from its last checkpoint.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
build="${KRAKEN_BUILD_DIR:-build}"
config="${1:-configs/demo.toml}"
say() { printf '\n==> %s\n' "$*"; }

if [ "$(id -u)" = 0 ]; then
  say "installing Debian packages"
  scripts/install-deps.sh
fi
say "building (CPU; CUDA too where nvcc is found) in $build"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j"$(nproc)" --target kraken-train kraken-eval kraken-sample kraken-export kraken-prepare
say "demo data: GPT-2 vocabulary and the State of the Union corpus, as token shards"
scripts/setup-demo.sh "$build"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
say "training $config"
"$build"/bin/kraken-train "$config"
run_dir="$(sed -n 's/^out_dir *= *"\(.*\)"/\1/p' "$config" | head -1)"
say "perplexity on the validation shards"
"$build"/bin/kraken-eval "$run_dir/checkpoints"
say "a sample"
"$build"/bin/kraken-sample "$run_dir/checkpoints" --prompt "The state of the Union is" --tokens 48 --top-k 40 --temperature 0.8
say "export"
"$build"/bin/kraken-export "$run_dir/checkpoints" "$run_dir/export"
python3 tools/plot_metrics.py "$run_dir/metrics.jsonl" -o "$run_dir/loss.svg" --title "$config"
say "done: metrics in $run_dir/metrics.jsonl, loss curve in $run_dir/loss.svg, model in $run_dir/export"
