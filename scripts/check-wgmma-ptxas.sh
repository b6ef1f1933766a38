#!/usr/bin/env bash
# What ptxas makes of the wgmma attention kernels (kernels/cuda/attention_wgmma.cu, sm_90a), checked where
# they are compiled rather than where they run — no GPU needed, and a GPU call is rare:
#   - no "Potential Performance Loss" from ptxas — notably C7513, "wgmma.mma_async instructions are
#     serialized …": ptxas then waits for each product before the next instruction, which undoes the
#     pipelined kernels' overlap without changing a bit of their results — only a benchmark would show it;
#   - no ptxas warning (C7508: a setmaxnreg ignored, the consumers left without their registers);
#   - every pipelined kernel compiled with the launch's 168 registers a thread: their register hand-over
#     (setmaxnreg) assumes it, and the runtime runs the lockstep kernels instead where it finds otherwise
#     (kernels/attention.h), again silently.
# Prints each kernel's registers, barriers and spills. Usage: check-wgmma-ptxas.sh [nvcc] (ctest runs it
# where the CUDA toolkit is found: tests/CMakeLists.txt). Exit status 0 when both hold.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvcc="${1:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
log=$(mktemp)
trap 'rm -f "$log" "$log.o"' EXIT
if ! "$nvcc" -std=c++17 -O3 -I"$root" -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -Xptxas -v \
     -c "$root/kernels/cuda/attention_wgmma.cu" -o "$log.o" > "$log" 2>&1; then
  tail -n 30 "$log"
  echo "check-wgmma-ptxas: the compilation failed"
  exit 1
fi
python3 - "$log" <<'PY'
import re, subprocess, sys

lines = open(sys.argv[1]).read().splitlines()
names = {}
def readable(mangled):
    if mangled not in names:
        out = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip() or mangled
        m = re.search(r"(\w+_kernel<[^()]*>|\w+_kernel)\(", out)
        names[mangled] = m.group(1) if m else out
    return names[mangled]

kernels, current, serialised, warnings = {}, None, [], []
for line in lines:
    m = re.search(r"(?:Compiling entry function|Function properties for) '?([A-Za-z0-9_]+)'?", line)
    if m:
        current = m.group(1)
        kernels.setdefault(current, {})
    m = re.search(r"(\(C\d+\) Potential Performance Loss: .*?) in the function '([A-Za-z0-9_]+)'", line)
    if m:
        serialised.append((m.group(2), m.group(1)))
    elif "ptxas warning" in line:  # e.g. C7508, setmaxnreg ignored: the consumers would not get their registers
        warnings.append(line.strip())
    if current is None:
        continue
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        kernels[current]["spills"] = (int(m.group(1)), int(m.group(2)))
    m = re.search(r"Used (\d+) registers, used (\d+) barriers", line)
    if m:
        kernels[current]["registers"], kernels[current]["barriers"] = int(m.group(1)), int(m.group(2))

bad = []
for mangled, k in sorted(kernels.items(), key=lambda kv: readable(kv[0])):
    if "registers" not in k:
        continue
    name = readable(mangled)
    stores, loads = k.get("spills", (0, 0))
    print(f"{name}: {k['registers']} registers, {k['barriers']} barriers, spills {stores} / {loads} bytes")
    if "pipelined_kernel" in name and k["registers"] != 168:
        bad.append(f"{name} compiled with {k['registers']} registers, not the launch's 168 (setmaxnreg's hand-over)")
for mangled, what in serialised:
    bad.append(f"{readable(mangled)}: {what}")
bad += warnings
if not any("pipelined_kernel" in readable(m) for m in kernels):
    bad.append("no pipelined kernel in ptxas's report: its format changed, or the kernels did")
for b in bad:
    print("check-wgmma-ptxas: " + b)
sys.exit(1 if bad else 0)
PY
