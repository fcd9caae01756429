#!/usr/bin/env bash
# Training speed on image cases: `mmx train dsa` on a LLaVA base against PyTorch + PEFT
# (scripts/bench_vlm_train_torch.py) on the same tiny LLaVA (tests/fixtures/vlm/tiny-llava with
# the training fixture's tokenizer), the same batches (mmx's data order) and hyperparameters,
# 2 threads a side, one run each: LoRA only (mmx: the fused engine) and LoRA with the projector
# as `modules_to_save` (mmx: candle's autograd).
#
#   scripts/bench-vlm-train.sh [WORK]        # WORK defaults to /tmp/mmx-bench-vlm
#
# Data: the six fixture cases (four with an image) eight times over, 48 cases; batch 8, 5
# epochs (30 steps), LoRA r 4 / alpha 8 on q_proj, v_proj and down_proj, lr 1e-2, cosine.
# tokens/s: the real input tokens of steps 3..30 over their wall time (from mmx's
# metrics.jsonl; the torch script times its own steps). The first-step losses of the two sides
# (same base, LoRA B = 0, same first batch) must agree, which checks that the work is the same.
# Environment: PY (default /tmp/ref/bin/python), MMX (default target/release/mmx).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/mmx-bench-vlm}
PY=${PY:-/tmp/ref/bin/python}
MMX=${MMX:-$ROOT/target/release/mmx}
fixtures=$ROOT/tests/fixtures/vlm
rm -rf "$WORK" && mkdir -p "$WORK/train/llava"
cp "$fixtures"/tiny-llava/{config.json,model.safetensors,preprocessor_config.json} "$WORK/train/llava/"
cp "$fixtures/train/tokenizer.json" "$WORK/train/llava/"
cp "$fixtures"/{square.png,wide.png} "$WORK/"
"$PY" - "$fixtures/train/cases.jsonl" "$WORK/train/cases.jsonl" <<'PYEOF'
import json, sys
cases = [json.loads(l) for l in open(sys.argv[1])]
with open(sys.argv[2], "w") as out:
    for copy in range(8):
        for c in cases:
            out.write(json.dumps(dict(c, id=f"{c['id']}-{copy}")) + "\n")
PYEOF
for mode in lora projector; do
    extra=""
    [ "$mode" = projector ] && extra='modules_to_save = ["multi_modal_projector"]'
    cat > "$WORK/train/$mode.toml" <<TOML
[train]
method = "dsa"
base = "llava"
seed = 2
epochs = 5
batch_size = 8

[train.data]
files = ["cases.jsonl"]

[train.lora]
r = 4
alpha = 8
target_modules = ["q_proj", "v_proj", "down_proj"]
$extra

[train.optim]
lr = 1e-2
warmup_steps = 0
min_lr_ratio = 0.0
TOML
    (cd "$WORK/train" && "$MMX" train dsa "$mode.toml" -o "out-$mode" --quiet >/dev/null)
    flag=""
    [ "$mode" = projector ] && flag=--projector
    "$PY" "$ROOT/scripts/bench_vlm_train_torch.py" --base "$WORK/train/llava" \
        --cases "$WORK/train/cases.jsonl" $flag 2>/dev/null | tail -1 > "$WORK/torch-$mode.json"
    "$PY" - "$WORK/train/out-$mode/metrics.jsonl" "$WORK/torch-$mode.json" "$mode" <<'PYEOF'
import json, sys
steps = [json.loads(l) for l in open(sys.argv[1])]
torch = json.load(open(sys.argv[2]))
ours = sum(s["tokens"] for s in steps[2:]) / (steps[-1]["elapsed"] - steps[1]["elapsed"])
assert [s["tokens"] for s in steps] == torch["step_tokens"], "the two sides saw different batches"
print(f"{sys.argv[3]}: first loss mmx {steps[0]['loss']:.5f} torch {torch['first_loss']:.5f}; "
      f"final mmx {steps[-1]['loss']:.4f} torch {torch['final_loss']:.4f}; "
      f"mmx {ours:.0f} tok/s, torch {torch['tokens_per_second']:.0f} tok/s: {ours / torch['tokens_per_second']:.2f}x")
PYEOF
done
