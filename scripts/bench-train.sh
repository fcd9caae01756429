#!/usr/bin/env bash
# Training speed of `mmx train dsa` (LoRA SFT in Rust/candle, CPU) against PyTorch + PEFT
# (scripts/bench_train_torch.py) on the same tiny model, the same batches and the same
# hyperparameters (issue 6, part 7).
#
#   scripts/bench-train.sh [WORK]          # WORK defaults to /tmp/mmx-bench-train
#
# Environment: MMX (the binary, default target/release/mmx; copied to WORK/mmx first, so that a
# rebuild during the benchmark does not change it), PY (a Python with torch, transformers and
# peft, default /tmp/ref/bin/python), RUNS (runs per side, default 3), THREADS (threads per side,
# default 2), STEPS (optimizer steps, default 40), QUIET_WAIT (seconds to wait before each run
# for the rest of the machine to use under 10% of the CPU, default 300; 0: do not wait),
# ATTEMPTS (tries of a run disturbed by other processes, default 3).
#
# What it does, all under WORK:
#   1. base/: a seeded tiny Llama (hidden 128, 4 layers, 4 heads / 2 KV heads, MLP 344, a
#      word-level vocabulary of ~280) from `mmx train base`, 20 steps: the benchmark's base.
#   2. data/: `mmx data generate --train 1000 --validation 10 --test 10 --seed 0`; the torch side
#      reads data/cardiology/train.jsonl, the same 1000 cases that the DSA recipe's
#      `synthetic = { seed = 0, train = 1000, validation = 10, test = 10 }` draws.
#   3. dsa.toml: LoRA r 8, alpha 16, all seven projections, dropout 0, batch 16, STEPS steps,
#      AdamW lr 3e-3 (betas 0.9/0.999, eps 1e-8, no weight decay), clip 1.0, no warmup, cosine to
#      0, checkpoint_every 0 (only the final adapter is written).
#   4. RUNS runs of each side, alternating mmx, torch, mmx, torch, ..., each under
#      /usr/bin/time -v.
#
# Same batches: mmx orders the examples of epoch e by a permutation drawn from its seed with its
# own SplitMix64; the torch script re-implements that draw (--order mmx), so both sides see
# exactly the same 16 examples in every step. The summary checks it: the per-step input token
# counts must be equal on both sides, and the first-step losses (same base, LoRA B = 0, same
# loss) must agree to ~1e-4. (With --order file the torch side would see the same set of
# examples in file order instead: equal batch sizes and similar lengths, the same work.)
#
# Same measure: tokens are the real (unpadded) input tokens of a step, the tokens of
# input_ids[:, :-1]. tokens/s = (sum of tokens of steps 3..N) / (end of step N - end of step 2),
# i.e. the first 2 steps are warm-up; for mmx from OUT/metrics.jsonl (`elapsed` is the end of a
# step), for torch from the script's own metrics.jsonl. "all" is over all steps (what mmx prints).
# Peak memory: "Maximum resident set size" of /usr/bin/time -v (the whole process: for torch this
# includes the Python interpreter and the torch/transformers/peft imports).
#
# Threads: torch.set_num_threads(THREADS); mmx runs one shard of each batch per core (2 here,
# THREADS's default) with candle's own per-operation threads off (`mmx train` sets
# RAYON_NUM_THREADS=1 unless it is set; see src/train/sft.rs).
# "cpu %" is the process's user+sys time over its wall time; "other cpu %" is the CPU time the
# rest of the machine used meanwhile (from /proc/stat), as a share of all cores: if it is not
# near 0, something else ran during the measurement and the numbers are not to be trusted
# (on 2 cores a concurrent build slows mmx down about 3x and torch much less).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/mmx-bench-train}
MMX=${MMX:-$ROOT/target/release/mmx}
PY=${PY:-/tmp/ref/bin/python}
RUNS=${RUNS:-3}
THREADS=${THREADS:-2}
STEPS=${STEPS:-40}
QUIET_WAIT=${QUIET_WAIT:-300}
ATTEMPTS=${ATTEMPTS:-3}

if [ ! -x /usr/bin/time ]; then
    echo "installing GNU time" >&2
    apt-get install -y time >/dev/null
fi
[ -x "$MMX" ] || { echo "no mmx binary at $MMX: cargo build --release" >&2; exit 1; }
"$PY" -c "import torch, transformers, peft" || { echo "$PY lacks torch/transformers/peft" >&2; exit 1; }

mkdir -p "$WORK/runs"
cd "$WORK"
cp "$MMX" mmx.tmp && mv -f mmx.tmp mmx
MMX=$WORK/mmx

cat > base.toml <<'EOF'
[train]
method = "base"
seed = 11
batch_size = 16
max_steps = 20
[train.init]
hidden_size = 128
num_hidden_layers = 4
num_attention_heads = 4
num_key_value_heads = 2
intermediate_size = 344
max_position_embeddings = 256
[train.data]
synthetic = { seed = 0, train = 200 }
completion = "format"
[train.optim]
lr = 3e-3
EOF
if [ ! -f base/model.safetensors ]; then
    rm -rf base
    "$MMX" train base base.toml -o base --quiet
fi

if [ ! -f data/cardiology/train.jsonl ]; then
    "$MMX" data generate -o data --train 1000 --validation 10 --test 10 --seed 0 >/dev/null
fi

cat > dsa.toml <<EOF
[train]
method = "dsa"
base = "base"
seed = 21
batch_size = 16
max_steps = $STEPS
checkpoint_every = 0
[train.data]
synthetic = { seed = 0, train = 1000, validation = 10, test = 10 }
specialties = ["cardiology"]
[train.lora]
r = 8
alpha = 16
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
[train.optim]
lr = 3e-3
EOF

# Busy CPU seconds of the whole machine so far (all cores), from /proc/stat.
busy() {
    awk -v hz="$(getconf CLK_TCK)" '/^cpu /{print ($2+$3+$4+$7+$8+$9)/hz}' /proc/stat
}

# Waits (up to QUIET_WAIT seconds) until the machine is quiet: under 10% of all cores busy
# over 2 seconds.
quiet() {
    local waited=0 ncpu before after
    ncpu=$(getconf _NPROCESSORS_ONLN)
    while [ "$waited" -lt "$QUIET_WAIT" ]; do
        before=$(busy)
        sleep 2
        after=$(busy)
        if awk -v b="$before" -v a="$after" -v n="$ncpu" 'BEGIN{exit !((a-b)/(2*n) < 0.10)}'; then
            return 0
        fi
        waited=$((waited + 2))
        [ $((waited % 30)) -eq 0 ] && echo "waiting for a quiet machine (${waited}s)" >&2
    done
    echo "the machine is still busy after ${QUIET_WAIT}s: measuring anyway" >&2
}

# run NAME COMMAND...: runs it under /usr/bin/time -v into runs/NAME.time, and notes the
# machine's busy CPU seconds before and after in runs/NAME.busy. A run during which the rest of
# the machine used over 10% of the CPU is run again (at most ATTEMPTS times in all).
run() {
    local name=$1 attempt before after other
    shift
    for attempt in $(seq 1 "$ATTEMPTS"); do
        rm -rf "runs/$name"
        quiet
        before=$(busy)
        /usr/bin/time -v -o "runs/$name.time" "$@" >"runs/$name.log" 2>&1 || {
            echo "$name failed:" >&2
            tail -20 "runs/$name.log" >&2
            exit 1
        }
        after=$(busy)
        echo "$before $after" >"runs/$name.busy"
        other=$(awk -v b="$before" -v a="$after" -v n="$(getconf _NPROCESSORS_ONLN)" '
            /User time/ {cpu += $NF} /System time/ {cpu += $NF}
            /Elapsed/ {k = split($NF, p, ":"); w = 0; for (i = 1; i <= k; i++) w = w * 60 + p[i]}
            END {o = (a - b - cpu) / (w * n); print (o > 0 ? o : 0)}' "runs/$name.time")
        if awk -v o="$other" 'BEGIN{exit !(o < 0.10)}'; then
            return 0
        fi
        echo "$name: other processes used $(awk -v o="$other" 'BEGIN{printf "%.0f", 100*o}')% of the CPU meanwhile" \
            "$([ "$attempt" -lt "$ATTEMPTS" ] && echo "- running it again" || echo "- keeping it")" >&2
    done
}

for i in $(seq 1 "$RUNS"); do
    echo "run $i/$RUNS: mmx" >&2
    run "mmx-$i" "$MMX" train dsa dsa.toml -o "runs/mmx-$i" --quiet
    echo "run $i/$RUNS: torch" >&2
    run "torch-$i" "$PY" "$ROOT/scripts/bench_train_torch.py" \
        --base base --cases data/cardiology/train.jsonl --specialty cardiology \
        --out "runs/torch-$i" --batch-size 16 --max-steps "$STEPS" --seed 21 --order mmx \
        --r 8 --alpha 16 --dropout 0 \
        --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
        --lr 3e-3 --betas 0.9 0.999 --eps 1e-8 --weight-decay 0 --max-grad-norm 1.0 \
        --warmup-steps 0 --decay cosine --min-lr-ratio 0 --threads "$THREADS" --skip 2
done

COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then
    COMMIT="$COMMIT (with uncommitted changes in src)"
fi
COMMIT="$COMMIT, binary sha256 $(sha256sum "$MMX" | cut -c1-12)"

"$PY" - "$RUNS" "$THREADS" "$COMMIT" <<'EOF'
import json, os, re, statistics, sys

runs, threads, commit = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
ncpu = os.cpu_count()
skip = 2

def time_v(path):
    text = open(path).read()
    get = lambda key: re.search(re.escape(key) + r": (.*)", text).group(1).strip()
    wall = get("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    seconds = 0.0
    for part in wall.split(":"):
        seconds = seconds * 60 + float(part)
    cpu = float(get("User time (seconds)")) + float(get("System time (seconds)"))
    return {"rss_mib": int(get("Maximum resident set size (kbytes)")) / 1024, "wall": seconds, "cpu": cpu}

def metrics(path):
    return [json.loads(line) for line in open(path) if line.strip()]

def measure(side, i):
    m = metrics(f"runs/{side}-{i}/metrics.jsonl")
    t = time_v(f"runs/{side}-{i}.time")
    before, after = map(float, open(f"runs/{side}-{i}.busy").read().split())
    other = max(after - before - t["cpu"], 0.0) / (t["wall"] * ncpu)
    timed = sum(s["tokens"] for s in m[skip:])
    span = m[-1]["elapsed"] - m[skip - 1]["elapsed"]
    return {
        "tps": timed / span,
        "tps_all": sum(s["tokens"] for s in m) / m[-1]["elapsed"],
        "rss": t["rss_mib"],
        "wall": t["wall"],
        "cpu_pct": 100 * t["cpu"] / t["wall"],
        "other_pct": 100 * other,
        "tokens": [s["tokens"] for s in m],
        "first_loss": m[0]["loss"],
        "last_loss": m[-1]["loss"],
    }

res = {side: [measure(side, i) for i in range(1, runs + 1)] for side in ("mmx", "torch")}
med = lambda side, key: statistics.median(r[key] for r in res[side])
versions = json.load(open("runs/torch-1/summary.json"))["versions"]

print()
print(f"mmx {commit}; torch {versions['torch']}, transformers {versions['transformers']}, "
      f"peft {versions['peft']}, python {versions['python']}; {ncpu} CPUs, {threads} threads per side")
print()
print("| run | side | tokens/s (steps 3..N) | tokens/s (all) | peak RSS MiB | wall s | cpu % | other cpu % |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for i in range(runs):
    for side in ("mmx", "torch"):
        r = res[side][i]
        print(f"| {i + 1} | {side} | {r['tps']:.0f} | {r['tps_all']:.0f} | {r['rss']:.0f} | "
              f"{r['wall']:.1f} | {r['cpu_pct']:.0f} | {r['other_pct']:.0f} |")
print()
print(f"| median of {runs} | tokens/s (steps 3..N) | tokens/s (all) | peak RSS MiB |")
print("|---|---:|---:|---:|")
for side in ("mmx", "torch"):
    print(f"| {side} | {med(side, 'tps'):.0f} | {med(side, 'tps_all'):.0f} | {med(side, 'rss'):.0f} |")
print(f"| mmx / torch | {med('mmx', 'tps') / med('torch', 'tps'):.2f} | "
      f"{med('mmx', 'tps_all') / med('torch', 'tps_all'):.2f} | {med('mmx', 'rss') / med('torch', 'rss'):.2f} |")
print()
same = all(r["tokens"] == res["mmx"][0]["tokens"] for side in res for r in res[side])
m0, t0 = res["mmx"][0], res["torch"][0]
print(f"same batches (per-step input tokens equal on every run of both sides): {'yes' if same else 'NO'}")
print(f"step-1 loss: mmx {m0['first_loss']:.6f}, torch {t0['first_loss']:.6f} "
      f"(|diff| {abs(m0['first_loss'] - t0['first_loss']):.1e}); "
      f"step-{len(m0['tokens'])} loss: mmx {m0['last_loss']:.4f}, torch {t0['last_loss']:.4f}")
setup = statistics.median(json.load(open(f"runs/torch-{i}/summary.json"))["setup_rss_mib"] for i in range(1, runs + 1))
print(f"torch peak RSS before the first step (interpreter, imports, model): {setup:.0f} MiB (median); "
      f"getrusage peak at the end: {statistics.median(json.load(open(f'runs/torch-{i}/summary.json'))['max_rss_mib'] for i in range(1, runs + 1)):.0f} MiB")
worst = max(r["other_pct"] for side in res for r in res[side])
if worst > 10:
    print(f"WARNING: up to {worst:.0f}% of the machine's CPU went to other processes during a run")
EOF
