#!/usr/bin/env bash
# Speed of GBA's two costs against the peers, in one run on this machine, 2 threads each, on
# the guideline demo's base and cardiology DSA expert (scripts/gba-experiment.sh makes them):
#  1. rollout generation: 8 answer-only cases x 8 sampled completions of at most 96 tokens,
#     mmx (examples/rollout_bench.rs) against transformers' `generate` on the same token ids;
#  2. a whole GRPO step (generation, scoring, forward and backward, optimizer; G 8, 8 prompts a
#     step, mu 1, beta 0, max 96 tokens): `mmx train gba` against TRL's GRPOTrainer.
# Needs a release build and the peers in a virtual environment (PEERS=/tmp/ref by default:
# python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch transformers peft trl).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MMX=${MMX_BIN:-$ROOT/target/release/mmx}
PY=${PEERS:-/tmp/ref}/bin/python
OUT=$ROOT/out/gba/bench
REG=$ROOT/out/gba/registry
mkdir -p "$OUT"
cd "$ROOT"
export RAYON_NUM_THREADS=1 OMP_NUM_THREADS=2
rm -rf "$OUT/base" "$OUT/adapter"
"$MMX" pull tiny-med-base:v3 -o "$OUT/base" --registry "$REG" >/dev/null
"$MMX" pull cardiology:v3 -o "$OUT/adapter" --registry "$REG" >/dev/null
cargo build --release --example rollout_bench -q

echo "== rollout generation (64 rows, max 96 new tokens, best of 3)"
ours=$(target/release/examples/rollout_bench "$OUT/base" "$OUT/adapter" "$OUT/prompts.json" 8 8 96 3)
theirs=$("$PY" scripts/bench_gba_torch.py generate "$OUT/base" "$OUT/adapter" "$OUT/prompts.json" 96 3)
echo "mmx:          $ours"
echo "transformers: $theirs"

echo "== GRPO step (8 prompts x G 8, max 96, mu 1, beta 0; median of steps 2-6)"
sed -e "s#^guidelines = .*#guidelines = \"$ROOT/recipes/guidelines.toml\"#" \
    -e "s#^registry = .*#registry = \"$REG\"#" -e 's#^steps = .*#steps = 6#' \
    -e 's#^checkpoint_every = .*#checkpoint_every = 0#' \
    recipes/gba/gba-cardiology.toml >"$OUT/gba.toml"
rm -rf "$OUT/gba"
"$MMX" train gba "$OUT/gba.toml" -o "$OUT/gba" --quiet >/dev/null
step=$(python3 -c '
import json, statistics, sys
e = [json.loads(l)["elapsed"] for l in open(sys.argv[1])]
d = [b - a for a, b in zip(e, e[1:])]
print(json.dumps({"seconds_per_step": statistics.median(d), "all": [e[0]] + d}))' "$OUT/gba/metrics.jsonl")
trl=$("$PY" scripts/bench_gba_torch.py grpo "$OUT/base" "$OUT/adapter" "$OUT/prompts.json" 96 6 8 2>/dev/null | tail -1)
echo "mmx: $step"
echo "TRL: $trl"
python3 - "$ours" "$theirs" "$step" "$trl" <<'PY'
import json, sys
ours, theirs, step, trl = (json.loads(a) for a in sys.argv[1:])
print(f"generation: mmx {ours['tokens_per_second']:.0f} tok/s, transformers {theirs['tokens_per_second']:.0f} tok/s: {ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}x")
print(f"GRPO step: mmx {step['seconds_per_step']:.2f} s, TRL {trl['seconds_per_step']:.2f} s: {trl['seconds_per_step'] / step['seconds_per_step']:.2f}x")
PY
