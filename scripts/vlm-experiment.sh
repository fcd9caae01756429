#!/usr/bin/env bash
# Image experts on the tiny VLM (issue 15): what each model reads from the images.
#
#   scripts/vlm-experiment.sh [WORK]        # WORK defaults to /tmp/mmx-vlm-experiment
#
# 1. data/: `mmx data generate --images` (seed 0): 1000 train, 100 validation, 200 test cases per
#    specialty, one finding of each drawn in its image and left out of its question.
# 2. vlm-base/: tiny-med-base:v3 (the bundled registry) extended with a CLIP tower (32 x 32 images
#    in 8 x 8 patches, hidden 32, 2 layers) and a projector drawn from seed 1; LLaVA's first
#    stage: the projector alone trained on every specialty's training cases (2 epochs).
# 3. <specialty>-s<seed>/: a DSA expert per specialty and seed (SEEDS, default "1 2 3") on
#    vlm-base: LoRA r 8 on every projection and the projector as modules_to_save, 3 epochs on
#    its 1000 cases.
# 4. Accuracy on each specialty's test cases with the image and with a blank image in its
#    place (`mmx eval --blank-images`), for the base and each specialty's experts on their own
#    specialty: mean ± standard deviation over the seeds.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/mmx-vlm-experiment}
MMX=${MMX:-$ROOT/target/release/mmx}
SPECIALTIES="cardiology radiology dermatology pathology"
SEEDS=${SEEDS:-1 2 3}
mkdir -p "$WORK" && cd "$WORK"
[ -d data ] || "$MMX" data generate -o data --images --train 1000 --validation 100 --test 200 --seed 0 >/dev/null
files=$(for s in $SPECIALTIES; do printf '"data/%s/train.jsonl", ' "$s"; done)
cat > vlm-base.toml <<TOML
[train]
method = "base"
base = "registry:tiny-med-base:v3"
registry = "$ROOT/registry"
seed = 1
epochs = 2
batch_size = 16

[train.vision]
image_size = 32
patch_size = 8
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 4
intermediate_size = 64

[train.data]
files = [${files%, }]

[train.optim]
lr = 3e-3
warmup_steps = 10
TOML
[ -f vlm-base/model.safetensors ] || "$MMX" train base vlm-base.toml -o vlm-base --quiet
for seed in $SEEDS; do
for s in $SPECIALTIES; do
    cat > "$s-s$seed.toml" <<TOML
[train]
method = "dsa"
base = "vlm-base"
specialty = "$s"
seed = $seed
epochs = 3
batch_size = 16

[train.data]
files = ["data/$s/train.jsonl"]

[train.lora]
r = 8
alpha = 16
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
modules_to_save = ["multi_modal_projector"]

[train.optim]
lr = 3e-3
warmup_steps = 10
TOML
    [ -f "$s-s$seed/adapter_model.safetensors" ] || "$MMX" train dsa "$s-s$seed.toml" -o "$s-s$seed" --quiet
done
done
accuracy() { "$MMX" eval vlm-base "$@" --json | python3 -c 'import json,sys; print("%.1f" % (100 * list(json.load(sys.stdin)["accuracy"].values())[0]))'; }
spread() { python3 -c 'import statistics as st,sys; v=[float(x) for x in sys.argv[1:]]; print("%.1f ± %.1f" % (st.mean(v), st.stdev(v) if len(v) > 1 else 0.0))' "$@"; }
echo "| model | specialty | with image | blank image | gap |"
echo "| --- | --- | ---: | ---: | ---: |"
for s in $SPECIALTIES; do
    with=$(accuracy --data "data/$s/test.jsonl")
    blank=$(accuracy --data "data/$s/test.jsonl" --blank-images)
    echo "| base | $s | $with | $blank | $(python3 -c "print('%.1f' % ($with - $blank))") |"
    withs=() blanks=() gaps=()
    for seed in $SEEDS; do
        w=$(accuracy --adapter "$s-s$seed" --data "data/$s/test.jsonl")
        b=$(accuracy --adapter "$s-s$seed" --data "data/$s/test.jsonl" --blank-images)
        withs+=("$w") blanks+=("$b") gaps+=("$(python3 -c "print($w - $b)")")
    done
    echo "| expert | $s | $(spread "${withs[@]}") | $(spread "${blanks[@]}") | $(spread "${gaps[@]}") |"
done
