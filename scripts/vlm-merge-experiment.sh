#!/usr/bin/env bash
# Merging the image experts of scripts/vlm-experiment.sh (issue 15): each method's setting
# chosen on validation, per expert seed, and scored on the held-out test cases with the image
# and with a blank image in its place.
#
#   scripts/vlm-merge-experiment.sh [WORK]     # WORK: the experiment's folder, made first by
#                                              # scripts/vlm-experiment.sh WORK
#
# For each seed in SEEDS (default "1 2 3"), `mmx sweep` merges that seed's four experts
# (cardiology, radiology, dermatology, pathology) into vlm-base over a grid per method, in full
# space (a whole model) and in core space (a rank-32 LoRA: the four rank-8 experts' whole core
# space), and scores every trial on the four specialties' validation and test cases. Per
# (method, space) and seed the trial with the best mean validation accuracy is kept; its test
# accuracy with a blank image comes from `mmx eval --blank-images`. The table reports
# mean ± standard deviation over the seeds.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/mmx-vlm-experiment}
MMX=${MMX:-$ROOT/target/release/mmx}
SPECIALTIES="cardiology radiology dermatology pathology"
SEEDS=${SEEDS:-1 2 3}
cd "$WORK"
[ -f vlm-base/model.safetensors ] || { echo "no $WORK/vlm-base: run scripts/vlm-experiment.sh $WORK first" >&2; exit 1; }

cases() { for s in $SPECIALTIES; do printf '"data/%s/%s.jsonl", ' "$s" "$1"; done; }
for seed in $SEEDS; do
    mkdir -p "merge-s$seed"
    {
        printf '[merge]\nmethod = "ties"\nbase = "../vlm-base"\noutput = "full"\nseed = 7\n'
        for s in $SPECIALTIES; do
            printf '\n[[merge.experts]]\nsource = "../%s-s%s"\nweight = 1.0\n' "$s" "$seed"
        done
    } > "merge-s$seed/merge.toml"
    cat > "merge-s$seed/sweep.toml" <<TOML
[sweep]
recipe = "merge.toml"
search = "grid"
keep_outputs = true

[[sweep.methods]]
method = "task_arithmetic"
parameters = { lambda = [0.25, 0.5, 0.75, 1.0, 1.5] }

[[sweep.methods]]
method = "ties"
parameters = { density = [0.2, 0.5, 1.0], lambda = [0.5, 1.0, 1.5, 2.0] }

[[sweep.methods]]
method = "caci"
parameters = { density = [0.5, 1.0], lambda = [0.75, 1.0, 1.5, 2.0] }

[[sweep.methods]]
method = "caci"
parameters = { density = [0.5, 1.0], lambda = [1.0], restore = [0.8, 0.9] }

[[sweep.methods]]
method = "task_arithmetic"
output = "lora"
space = "core"
rank = 32
parameters = { lambda = [0.5, 1.0, 1.5] }

[[sweep.methods]]
method = "ties"
output = "lora"
space = "core"
rank = 32
parameters = { density = [0.5, 1.0], lambda = [1.0, 1.5, 2.0] }

[[sweep.methods]]
method = "caci"
output = "lora"
space = "core"
rank = 32
parameters = { density = [0.5, 1.0], lambda = [1.0, 1.5, 2.0] }

[[sweep.methods]]
method = "caci"
output = "lora"
space = "core"
rank = 32
parameters = { density = [0.5, 1.0], lambda = [1.0, 1.5, 2.0], restore = [0.85] }

[sweep.eval]
base = "../vlm-base"
validation = [$(cases validation | sed 's/"data/"..\/data/g; s/, $//')]
test = [$(cases test | sed 's/"data/"..\/data/g; s/, $//')]
TOML
    [ -f "merge-s$seed/sweep/results.json" ] || "$MMX" sweep "merge-s$seed/sweep.toml" -o "merge-s$seed/sweep"
done

# The chosen trial per (method, space) and seed, and its blank-image test accuracy.
python3 - "$MMX" "$SEEDS" "$SPECIALTIES" <<'PY'
import json, statistics as st, subprocess, sys
mmx, seeds, specialties = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()

def blank_accuracy(seed, trial):
    out = f"merge-s{seed}/sweep/outputs/{trial['id']}"
    model = ["vlm-base", "--adapter", out] if trial["settings"].get("output") == "lora" else [out]
    accuracy = []
    for s in specialties:
        run = subprocess.run([mmx, "eval", *model, "--data", f"data/{s}/test.jsonl",
                              "--blank-images", "--json"], check=True, capture_output=True, text=True)
        accuracy.append(100 * list(json.loads(run.stdout)["accuracy"].values())[0])
    return accuracy

rows = {}
for seed in seeds:
    trials = json.load(open(f"merge-s{seed}/sweep/results.json"))["trials"]
    for t in trials:
        if t.get("error"):
            sys.exit(f"seed {seed}: trial {t['id']} failed: {t['error']}")
    families = {}
    for t in trials:
        key = (t["method"], t["settings"].get("space") or "full")
        if key not in families or t["validation"] > families[key]["validation"]:
            families[key] = t
    for key, t in families.items():
        parameters = t["settings"].get("parameters", {})
        with_image = [100 * v for v in t["by_task"][1]]
        blank = blank_accuracy(seed, t)
        rows.setdefault(key, []).append((parameters, 100 * t["validation"], with_image, blank))

def spread(values):
    return "%.1f ± %.1f" % (st.mean(values), st.stdev(values) if len(values) > 1 else 0.0)

print("| method | space | chosen (per seed) | validation | " + " | ".join(specialties) +
      " | mean with image | mean blank |")
print("| --- | --- | --- | ---: | " + " | ".join("---:" for _ in specialties) + " | ---: | ---: |")
for (method, space), runs in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    chosen = "; ".join(",".join(f"{k} {v}" for k, v in p.items()) for p, *_ in runs)
    per_task = [spread([r[2][i] for r in runs]) for i in range(len(specialties))]
    print(f"| {method} | {space} | {chosen} | {spread([r[1] for r in runs])} | " +
          " | ".join(per_task) + f" | {spread([st.mean(r[2]) for r in runs])} | "
          f"{spread([st.mean(r[3]) for r in runs])} |")
PY
