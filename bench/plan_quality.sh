#!/usr/bin/env bash
# Prediction quality of the planner on this machine (issue 7): profile the model of
# bench/plan_quality.toml on CPU, rank every strategy for RANKS CPU ranks, run them for a few steps each
# under mpirun, and report predicted against measured step time with Spearman's rank correlation; then
# one plan = "auto" run. The work is bench/plan_quality.py; this wrapper builds what it needs.
#
#   bench/plan_quality.sh [build-dir]          # RANKS=4 (default) or 2; STEPS=6; MAX_RUNS=20; WORK=dir
#
# RANKS=4 uses configs/clusters/this_machine_4ranks.toml: four ranks on two cores, oversubscribed two to
# one (read its comment before reading the absolute times). RANKS=2 uses this_machine.toml, one rank
# per core. Takes about 3 minutes for RANKS=4 on the idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
RANKS=${RANKS:-4}
STEPS=${STEPS:-6}
MAX_RUNS=${MAX_RUNS:-20}
case "$RANKS" in
  4) CLUSTER=configs/clusters/this_machine_4ranks.toml ;;
  2) CLUSTER=configs/clusters/this_machine.toml ;;
  *) echo "RANKS must be 2 or 4 (the cluster files of this machine)" >&2; exit 2 ;;
esac
WORK=${WORK:-$(mktemp -d /tmp/kraken_plan_quality.XXXXXX)}
ninja -C "$BUILD" kraken-plan kraken-train >/dev/null
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,vader OMP_WAIT_POLICY=PASSIVE
echo "plan_quality: $RANKS ranks, cluster $CLUSTER, $STEPS steps per run, work in $WORK"
echo "machine: $(nproc) cores, $(uname -m), load average $(cut -d' ' -f1-3 /proc/loadavg)"
python3 bench/plan_quality.py --bin "$BUILD/bin" --cluster "$CLUSTER" --ranks "$RANKS" --config bench/plan_quality.toml \
  --work "$WORK" --steps "$STEPS" --max-runs "$MAX_RUNS"
