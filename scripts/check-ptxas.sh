#!/usr/bin/env bash
# What ptxas makes of the CUDA kernels (kernels/cuda), checked where they are compiled rather than where
# they run — no GPU needed, and a GPU call is rare. Each of these would cost only speed, with the same bits,
# so no test of results could see it:
#   - no "Potential Performance Loss" and no warning from ptxas — notably C7513, "wgmma.mma_async
#     instructions are serialized …" (ptxas then waits for each product before the next instruction, which
#     undoes the pipelined attention kernels' overlap) and C7508 (a setmaxnreg ignored);
#   - every pipelined wgmma kernel compiled with the launch's 168 registers a thread: their register
#     hand-over (setmaxnreg) assumes it, and the runtime runs the lockstep kernels where it finds otherwise;
#   - no kernel with a stack frame (local memory: spilled registers, or an array or a parameter table
#     indexed at run time and copied per thread — the bf16 sums' and the runtime-G fork's tables were, until
#     __grid_constant__), but for the documented ones: the mma and WMMA attention's dk/dv kernels at heads of
#     224 and more, whose dK and dV alone outgrow the registers (kernels/attention.h).
# attention_wgmma.cu for sm_90a, the other files with device code for sm_90, in parallel. Prints each
# kernel with registers, barriers, stack frame and spills. Usage: check-ptxas.sh [nvcc] (ctest runs it where
# the CUDA toolkit is found: tests/CMakeLists.txt). Exit status 0 when all of it holds.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvcc="${1:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# (attention_cudnn.cu and matmul*.cu are host code around libraries: no kernels of ours to read)
files=(attention_wgmma attention attention_mma attention_tc cross_entropy elementwise embedding layernorm optimizer
       random scratch softmax)
jobs=$(nproc 2> /dev/null || echo 2)
for f in "${files[@]}"; do
  arch=(-arch=sm_90)
  [[ $f == attention_wgmma ]] && arch=(-gencode=arch=compute_90a,code=sm_90a)
  while [[ $(jobs -r | wc -l) -ge $jobs ]]; do wait -n; done
  ( "$nvcc" -std=c++17 -O3 -I"$root" "${arch[@]}" --expt-relaxed-constexpr -Xptxas -v \
      -c "$root/kernels/cuda/$f.cu" -o "$work/$f.o" > "$work/$f.log" 2>&1 || echo "failed" > "$work/$f.failed" ) &
done
wait
status=0
for f in "${files[@]}"; do
  if [[ -f "$work/$f.failed" ]]; then
    tail -n 30 "$work/$f.log"
    echo "check-ptxas: kernels/cuda/$f.cu did not compile"
    status=1
  fi
done
[[ $status -eq 0 ]] || exit 1
python3 - "$work" "${files[@]}" <<'PY'
import re, subprocess, sys

work, files = sys.argv[1], sys.argv[2:]
names = {}
def readable(mangled):
    if mangled not in names:
        out = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip() or mangled
        m = re.search(r"(\w+_kernel<[^()]*>|\w+_kernel|\w+)\(", out)
        names[mangled] = m.group(1) if m else out
    return names[mangled]

# Kernels allowed a stack frame (kernels/attention.h: dK and dV alone exceed the registers at these heads).
allowed_frames = re.compile(r"attention_backward_kv_(mma|tc)_kernel<(224|240|256)>")
bad, pipelined = [], 0
for f in files:
    kernels, current = {}, None
    for line in open(f"{work}/{f}.log").read().splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([A-Za-z0-9_]+)'?", line)
        if m:
            current = m.group(1)
            kernels.setdefault(current, {})
        m = re.search(r"(\(C\d+\) Potential Performance Loss: .*?) in the function '([A-Za-z0-9_]+)'", line)
        if m:
            bad.append(f"{f}.cu: {readable(m.group(2))}: {m.group(1)}")
        elif "ptxas warning" in line:
            bad.append(f"{f}.cu: {line.strip()}")
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            kernels[current]["frame"] = tuple(int(g) for g in m.groups())
        m = re.search(r"Used (\d+) registers, used (\d+) barriers", line)
        if m:
            kernels[current]["registers"], kernels[current]["barriers"] = int(m.group(1)), int(m.group(2))
    for mangled, k in sorted(kernels.items(), key=lambda kv: readable(kv[0])):
        if "registers" not in k:
            continue
        name = readable(mangled)
        frame, stores, loads = k.get("frame", (0, 0, 0))
        print(f"{f}.cu {name}: {k['registers']} registers, {k['barriers']} barriers, stack frame {frame} bytes, "
              f"spills {stores} / {loads} bytes")
        if "wgmma_pipelined_kernel" in name:
            pipelined += 1
            if k["registers"] != 168:
                bad.append(f"{name} compiled with {k['registers']} registers, not the launch's 168 (setmaxnreg's hand-over)")
        # (the pipelined dk/dv kernels: their producer's 32–40 bytes, bench/RESULTS.md, twenty-fifth session)
        if frame and not allowed_frames.search(name) and not ("kv_wgmma_pipelined" in name and frame <= 64):
            bad.append(f"{f}.cu: {name} has a {frame}-byte stack frame (local memory: spills {stores} / {loads} bytes)")
if pipelined == 0:
    bad.append("no pipelined wgmma kernel in ptxas's report: its format changed, or the kernels did")
for b in bad:
    print("check-ptxas: " + b)
sys.exit(1 if bad else 0)
PY
