#!/usr/bin/env bash
# A planted sweep in one process against the same sweep as a Slurm array (4 shards, one CPU
# each) plus its gather job, on the single-node cluster of scripts/slurm-cluster.sh, timed from
# submission until the gather job has ended. On one node this measures Slurm's overhead, not
# a speed-up: the one process already uses every core.
#
# usage: scripts/bench-slurm.sh [WORKDIR] [DIM]     (default /tmp/mmx-bench-slurm, 1024)
# Needs a release build (cargo build --release); installs slurm-wlm and munge if run as root.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORKDIR=${1:-/tmp/mmx-bench-slurm}
DIM=${2:-1024}
MMX=${MMX_BIN:-$ROOT/target/release/mmx}
rm -rf "$WORKDIR"
mkdir -p "$WORKDIR"
WORKDIR=$(cd "$WORKDIR" && pwd)
eval "$("$ROOT/scripts/slurm-cluster.sh" start "$WORKDIR/cluster" $$)"
cd "$WORKDIR"
cat >sweep.toml <<EOF
[sweep]
[sweep.planted]
experts = 3
dim = $DIM
rank = 8
overlap = 0.5
seed = 11

[[sweep.methods]]
method = "task_arithmetic"
output = "delta"
parameters = { lambda = [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6] }

[[sweep.methods]]
method = "ties"
output = "delta"
parameters = { density = [0.5], lambda = [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6] }
EOF
now() { date +%s.%N; }
t0=$(now)
"$MMX" sweep sweep.toml -o whole >/dev/null
t1=$(now)
gather=$("$MMX" sweep sweep.toml -o split --slurm --shards 4 | awk '/^submitted gather job/ { print $4 }')
while squeue -h -j "$gather" 2>/dev/null | grep -q .; do sleep 0.1; done
t2=$(now)
state=$(scontrol show job -o "$gather" | grep -o 'JobState=[A-Z]*')
same=$(python3 - <<'EOF'
import json
scores = lambda d: [(t["id"], t["validation"], t["test"]) for t in json.load(open(f"{d}/results.json"))["trials"]]
print("identical" if scores("whole") == scores("split") else "DIFFERENT")
EOF
)
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(sinfo --version)"
echo "16 planted trials at dim $DIM; gather job $state; results $same"
awk -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN {
    printf "| run | wall s |\n| --- | ---: |\n| one process (all cores) | %.2f |\n| Slurm: 4-task array + gather | %.2f |\n", b - a, c - b }'
"$ROOT/scripts/slurm-cluster.sh" stop "$WORKDIR/cluster"
