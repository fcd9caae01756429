#!/usr/bin/env python3
"""The PyTorch + PEFT side of scripts/bench-train.sh: LoRA SFT of a Llama base on case files,
step for step what `mmx train dsa` does, timed the same way.

What it matches in mmx (src/train/{sft,batch,prompt,optim,schedule}.rs):
  * examples: `[bos] + tok(prompt) + tok(completion) + [eos]`, the tokenizer being the base's
    tokenizer.json (PreTrainedTokenizerFast, add_special_tokens=False), with
      prompt     = "Question: {q}\\nOptions:\\n" + "X. option\\n" per option + "Reasoning:\\n"
      completion = "step\\n" per reasoning step + "Answer: X"
  * the loss: the mean cross-entropy over the completion tokens and the eos (labels -100 on the
    prompt and the padding), batches right-padded with the config's pad id;
  * the data order: with --order mmx (the default) the batches are exactly mmx's: epoch e is the
    permutation of the examples (in file order) that mmx draws with its SplitMix64 from
    (seed, ["data", e]), re-implemented below; --order file takes them in file order instead;
  * AdamW (torch.optim.AdamW: betas, eps, decoupled weight decay), global-norm clip
    (clip_grad_norm_), and mmx's schedule: linear warmup from 0 over warmup steps, then half a
    cosine from lr down to min_lr_ratio * lr at the last step (or constant);
  * LoRA: peft LoraConfig(r, lora_alpha, target_modules, lora_dropout) -- A Kaiming-uniform,
    B zero, as mmx (different random draws, so the first-step loss agrees but not the grad norm).

Timing: `tokens` of a step are the real input tokens (the unpadded tokens of input_ids[:, :-1]),
as mmx counts them; the reported tokens/s is the sum of tokens of steps skip+1..N over the wall
time of those steps (end of step N minus end of step `skip`). Writes OUT/metrics.jsonl (one line
per step, mmx's fields) and OUT/summary.json, and prints the summary as its last line.
"""

import argparse
import json
import math
import os
import resource
import sys
import time

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
DATA_STREAM = 0x64617461  # "data": mmx's data-order stream tag


def finalise(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


class SplitMix:
    """SplitMix64 as mmx's src/train/rng.rs uses it (derive, below, Fisher-Yates shuffle)."""

    def __init__(self, seed, parts=()):
        key = finalise(seed & MASK)
        for part in parts:
            key = finalise(key ^ finalise(part & MASK))
        self.state = key

    def next_u64(self):
        self.state = (self.state + GOLDEN) & MASK
        return finalise(self.state)

    def below(self, n):
        zone = MASK - ((MASK - (n - 1)) % n)
        while True:
            x = self.next_u64()
            if x <= zone:
                return x % n

    def shuffle(self, items):
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]


def prompt_of(case):
    text = f"Question: {case['question']}\nOptions:\n"
    for index, option in enumerate(case["options"]):
        text += f"{chr(ord('A') + index)}. {option}\n"
    return text + "Reasoning:\n"


def completion_of(case):
    return "".join(step + "\n" for step in case["reasoning"]) + f"Answer: {case['answer']}"


def lr_at(step, args, total):
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.decay == "constant":
        return args.lr
    span = max(total - args.warmup_steps, 1)
    progress = min((step - args.warmup_steps) / span, 1.0)
    floor = args.lr * args.min_lr_ratio
    return floor + 0.5 * (args.lr - floor) * (1.0 + math.cos(math.pi * progress))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="HF model directory (config, safetensors, tokenizer.json)")
    ap.add_argument("--cases", required=True, nargs="+", help="case files (JSON Lines)")
    ap.add_argument("--specialty", action="append", default=[], help="keep these specialties")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=21, help="mmx's recipe seed (data order); also torch's")
    ap.add_argument("--order", choices=["mmx", "file"], default="mmx")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999])
    ap.add_argument("--eps", type=float, default=1e-8)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--decay", choices=["cosine", "constant"], default="cosine")
    ap.add_argument("--min-lr-ratio", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps left out of tokens/s")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    config = json.load(open(os.path.join(args.base, "config.json")))
    bos = config.get("bos_token_id")
    eos = config["eos_token_id"]
    eos = eos[0] if isinstance(eos, list) else eos
    pad = config.get("pad_token_id")
    pad = eos if pad is None else pad
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(args.base, "tokenizer.json"))

    cases = []
    for path in args.cases:
        with open(path) as f:
            cases.extend(json.loads(line) for line in f if line.strip())
    if args.specialty:
        cases = [c for c in cases if c.get("specialty") in args.specialty]
    examples = []  # (tokens, prompt_len)
    for case in cases:
        p = tok.encode(prompt_of(case), add_special_tokens=False)
        c = tok.encode(completion_of(case), add_special_tokens=False)
        head = [bos] if bos is not None else []
        examples.append((head + p + c + [eos], len(head) + len(p)))
    if not examples:
        sys.exit("no examples")

    per_epoch = math.ceil(len(examples) / args.batch_size)
    total = min(args.epochs * per_epoch, args.max_steps)
    orders = {}

    def batch_of(step):
        epoch, index = divmod(step, per_epoch)
        if epoch not in orders:
            order = list(range(len(examples)))
            if args.order == "mmx":
                SplitMix(args.seed, [DATA_STREAM, epoch]).shuffle(order)
            orders[epoch] = order
        picked = orders[epoch][index * args.batch_size:(index + 1) * args.batch_size]
        return epoch, [examples[i] for i in picked]

    def collate(batch):
        s = max(len(t) - 1 for t, _ in batch)
        inputs = torch.full((len(batch), s), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), s), dtype=torch.long)
        labels = torch.full((len(batch), s), -100, dtype=torch.long)
        tokens = 0
        for row, (t, prompt_len) in enumerate(batch):
            n = len(t) - 1
            inputs[row, :n] = torch.tensor(t[:-1])
            attention[row, :n] = 1
            # Position i predicts token i + 1: in the loss when that token is past the prompt.
            targets = torch.tensor(t[1:])
            keep = torch.arange(1, n + 1) >= prompt_len
            labels[row, :n] = torch.where(keep, targets, torch.full_like(targets, -100))
            tokens += n
        return inputs, attention, labels, tokens

    model = LlamaForCausalLM.from_pretrained(args.base, torch_dtype=torch.float32)
    model.config.use_cache = False
    lora = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=args.targets.split(","),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(
        params, lr=args.lr, betas=tuple(args.betas), eps=args.eps, weight_decay=args.weight_decay
    )

    # Peak RSS so far: the interpreter, the imports and the model, before any training step.
    setup_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    os.makedirs(args.out, exist_ok=True)
    metrics = open(os.path.join(args.out, "metrics.jsonl"), "w")
    ends, step_tokens, losses = [], [], []
    seen = 0
    started = time.perf_counter()
    for step in range(total):
        epoch, batch = batch_of(step)
        inputs, attention, labels, tokens = collate(batch)
        logits = model(input_ids=inputs, attention_mask=attention, use_cache=False).logits
        nll = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        loss = nll / (labels != -100).sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        lr = lr_at(step, args, total)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        loss_value = loss.item()
        elapsed = time.perf_counter() - started
        seen += tokens
        ends.append(elapsed)
        step_tokens.append(tokens)
        losses.append(loss_value)
        line = {
            "step": step + 1,
            "total_steps": total,
            "epoch": epoch,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": tokens,
            "tokens_per_second": seen / max(elapsed, 1e-9),
            "elapsed": elapsed,
        }
        metrics.write(json.dumps(line) + "\n")
        metrics.flush()
    metrics.close()

    skip = args.skip if total > args.skip else 0
    timed = sum(step_tokens[skip:])
    span = ends[-1] - (ends[skip - 1] if skip > 0 else 0.0)
    summary = {
        "side": "torch",
        "examples": len(examples),
        "steps": total,
        "trainable_params": trainable,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "tokens_per_second": timed / span,
        "tokens_per_second_all": seen / ends[-1],
        "timed_steps": total - skip,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "setup_rss_mib": setup_rss_mib,
        "threads": torch.get_num_threads(),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
