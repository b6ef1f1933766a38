#!/usr/bin/env bash
# The README's test command: configure, build everything (CPU and, where nvcc is found, CUDA), run ctest.
# The tokenizer tests need the GPT-2 vocabulary from scripts/setup-demo.sh; with KRAKEN_REQUIRE_DEMO=1
# (as CI sets) they fail instead of skipping when it is missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
build="${KRAKEN_BUILD_DIR:-build}"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKRAKEN_BUILD_TESTS=ON
cmake --build "$build" -j"$(nproc)"
ctest --test-dir "$build" --output-on-failure -j"$(nproc)" --timeout 600
