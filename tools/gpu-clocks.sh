#!/usr/bin/env bash
# Runs a command while nvidia-smi samples the GPU every 100 ms (SM clock, utilisation, power, the active
# clock-event reasons), then prints one summary line over the busy samples (utilisation ≥ 90%).
#
# Why: tools/gpu-profile.sh times each kernel alone under ncu, and a training step can take longer than
# its kernels summed there for two reasons that look alike in tokens/s — the GPU idle between kernels
# (the host, a synchronisation), or the GPU busy at a lower clock than the profile's (its power limit
# under sustained tensor-core load). The busy samples' clock against the maximum tells the two apart.
#
# Usage: tools/gpu-clocks.sh SAMPLES.csv command [args...]
# Exit status: the command's. Without nvidia-smi it only runs the command.
set -uo pipefail
samples=$1
shift
if ! command -v nvidia-smi > /dev/null; then
  "$@"
  exit $?
fi
# The reasons' field was renamed (clocks_throttle_reasons → clocks_event_reasons); one bad field fails the
# whole query, so ask which this driver knows.
reasons=clocks_event_reasons.active
nvidia-smi --query-gpu=$reasons --format=csv,noheader > /dev/null 2>&1 || reasons=clocks_throttle_reasons.active
nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,utilization.gpu,power.draw,power.limit,temperature.gpu,$reasons \
  --format=csv,noheader,nounits -lms 100 > "$samples" 2>&1 &
sampler=$!
"$@"
rc=$?
kill "$sampler" 2> /dev/null
wait "$sampler" 2> /dev/null
python3 - "$samples" << 'EOF'
import statistics, sys

# nvmlClocksEventReasons bits (nvml.h); "idle" and the application-clock setting are not slowdowns.
NAMES = {0x4: "software power cap", 0x8: "hardware slowdown", 0x20: "software thermal slowdown",
         0x40: "hardware thermal slowdown", 0x80: "hardware power brake"}
busy = []
for line in open(sys.argv[1], errors="replace"):
    f = [x.strip() for x in line.split(",")]
    try:
        sm, sm_max, util, power, limit, temp = (float(x) for x in f[:6])
        bits = int(f[6], 16)
    except (ValueError, IndexError):
        continue
    if util >= 90:
        busy.append((sm, sm_max, power, limit, temp, bits))
if not busy:
    print("gpu-clocks: no busy sample (utilisation >= 90%) in", sys.argv[1])
    sys.exit(0)
clocks = sorted(b[0] for b in busy)
powers = [b[2] for b in busy]
seen = {}
for b in busy:
    for bit, name in NAMES.items():
        if b[5] & bit:
            seen[name] = seen.get(name, 0) + 1
reasons = ", ".join(f"{name} in {100 * n / len(busy):.0f}%" for name, n in sorted(seen.items(), key=lambda x: -x[1]))
print(f"gpu-clocks: {len(busy)} busy samples; SM clock min {clocks[0]:.0f}, median {statistics.median(clocks):.0f}, "
      f"max {clocks[-1]:.0f} MHz of {busy[0][1]:.0f}; power median {statistics.median(powers):.0f}, "
      f"max {max(powers):.0f} W of {busy[0][3]:.0f}; {max(b[4] for b in busy):.0f} C at most; "
      f"slowdowns: {reasons or 'none'}")
EOF
exit $rc
