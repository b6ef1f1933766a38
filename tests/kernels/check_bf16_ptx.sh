#!/usr/bin/env bash
# The bf16 kernels' 8-element packs are single 16-byte accesses in the PTX (kernels/cuda/storage.h):
# nvcc copies a struct of bf16 pairs pair by pair, so a pack loaded or stored as such a struct becomes
# four 4-byte accesses (ld.global.v2.u16 / st.global.v2.u16 in the PTX, kept as four by ptxas) — what
# every bf16 kernel here did until the thirteenth session, invisible to any test of results. This
# compiles the files that move bf16 rows to PTX for sm_90 and fails on any such access, or where a file
# has no 16-byte bf16 access at all. (A kernel that means to move bf16 pairs would show up here too:
# widen the check for it, saying why.)
#
#   check_bf16_ptx.sh NVCC SOURCE_DIR WORK_DIR
set -euo pipefail
nvcc=$1 src=$2 work=$3
mkdir -p "$work"
status=0
for f in layernorm cross_entropy elementwise embedding; do
  ptx="$work/$f.ptx"
  "$nvcc" -arch=sm_90 -std=c++17 --expt-relaxed-constexpr -I"$src" -ptx "$src/kernels/cuda/$f.cu" -o "$ptx"
  pairs=$(grep -cE '(ld|st)\.global(\.[a-z]+)*\.v2\.u16' "$ptx" || true)
  wide=$(grep -cE '(ld|st)\.global(\.[a-z]+)*\.v4\.(u32|b32)' "$ptx" || true)
  echo "kernels/cuda/$f.cu: $pairs pair-wise bf16 accesses, $wide 16-byte ones"
  if [[ $pairs -ne 0 ]]; then
    grep -nE '(ld|st)\.global(\.[a-z]+)*\.v2\.u16' "$ptx" | head -n 5
    echo "FAIL: kernels/cuda/$f.cu moves bf16 pairs (a Bf16x8 copied as a struct? use load_bf16x8/store_bf16x8)"
    status=1
  fi
  if [[ $wide -eq 0 ]]; then
    echo "FAIL: kernels/cuda/$f.cu has no 16-byte bf16 access at all"
    status=1
  fi
done
exit $status
