"""Tables of scripts/gba-experiment.sh from out/gba: held-out accuracy per specialty and model
(mean ± std over seeds; test and validation), and per guideline the accuracy and adherence of
the rollouts drawn under it at the start (steps 1-3) and the end (the last 3 steps) of each RL
run, averaged over seeds. Writes out/gba/learning.md and prints it."""

import glob
import json
import os
import statistics
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "out/gba"
rows = [json.loads(l) for l in open(f"{out}/scores.jsonl")]
specialties = list(dict.fromkeys(r["specialty"] for r in rows))
models = list(dict.fromkeys(r["model"] for r in rows))


def values(model, s, split):
    return [100 * r["accuracy"] for r in rows
            if r["model"] == model and r["specialty"] == s and r["split"] == split]


def cell(v):
    if not v:
        return ""
    if len(v) == 1:
        return f"{v[0]:.1f}"
    return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}"


text = []
for split in ["test", "validation"]:
    n = {"test": 200, "validation": 100}[split]
    text.append(f"\n{split} accuracy (%, {n} cases per specialty), mean ± std over seeds\n")
    text.append("| model | " + " | ".join(specialties) + " | mean |")
    text.append("| --- |" + " ---: |" * (len(specialties) + 1))
    for m in models:
        cells = [cell(values(m, s, split)) for s in specialties]
        means = [statistics.mean(values(m, s, split)) for s in specialties if values(m, s, split)]
        text.append(f"| {m} | " + " | ".join(cells) + f" | {statistics.mean(means):.1f} |")

text.append("\nRollouts per guideline (T = 1): accuracy / adherence (%) at steps 1-3 -> last 3 steps, mean over seeds and specialties\n")
methods = [m for m in models if m not in ("base", "dsa")]
guidelines = None
table = {}
for m in methods:
    for path in glob.glob(f"{out}/runs/*-{m}-*/metrics.jsonl"):
        # Runs are named <specialty>-<method>-<seed>.
        if os.path.basename(os.path.dirname(path)).rsplit("-", 2)[1] != m:
            continue
        steps = [json.loads(l) for l in open(path)]
        if not steps:  # a run in progress
            continue
        guidelines = list(steps[0]["guidelines"])
        for g in guidelines:
            for phase, part in (("start", steps[:3]), ("end", steps[-3:])):
                for key in ("accuracy", "adherence"):
                    v = statistics.mean(s["guidelines"][g][key] for s in part)
                    table.setdefault((m, g, phase, key), []).append(100 * v)
if guidelines:
    text.append("| method | " + " | ".join(guidelines) + " |")
    text.append("| --- |" + " ---: |" * len(guidelines))
    for m in methods:
        cells = []
        for g in guidelines:
            a0 = statistics.mean(table[(m, g, "start", "accuracy")])
            a1 = statistics.mean(table[(m, g, "end", "accuracy")])
            h0 = statistics.mean(table[(m, g, "start", "adherence")])
            h1 = statistics.mean(table[(m, g, "end", "adherence")])
            cells.append(f"{a0:.0f} / {h0:.0f} -> {a1:.0f} / {h1:.0f}")
        text.append(f"| {m} | " + " | ".join(cells) + " |")
result = "\n".join(text) + "\n"
open(f"{out}/learning.md", "w").write(result)
print(result)
