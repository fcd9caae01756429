#!/usr/bin/env python3
"""The PyTorch + PEFT side of scripts/bench-vlm-train.sh: LoRA SFT of a LLaVA model on image
cases, step for step what `mmx train dsa` does on a LLaVA base, timed the same way.

As mmx (src/train/{sft,images}.rs): an example is `[bos] + [image token] * N + tok(prompt) +
tok(completion) + [eos]` for a case with an image (N image tokens per image, right after bos),
without the image tokens for a text-only case; the loss is the mean cross-entropy over the
completion and eos; the batches are mmx's (its SplitMix64 data order, from
bench_train_torch.py); AdamW, clip 1.0, mmx's schedule; PEFT LoRA on the language model only
(a regex over `language_model`), optionally the projector as `modules_to_save`. The vision
tower runs under no_grad on each batch's pixels, as a PEFT user's LLaVA training loop does (mmx
runs it once per case before training: the tower is frozen).

tokens/s: the real input tokens of steps skip+1..N over their wall time. Prints a JSON summary.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_torch import SplitMix, DATA_STREAM, completion_of, lr_at, prompt_of  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--r", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=8)
    ap.add_argument("--targets", default="q_proj|v_proj|down_proj")
    ap.add_argument("--projector", action="store_true", help="train the projector (modules_to_save)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", type=int, default=2)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from PIL import Image
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, PreTrainedTokenizerFast

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(args.base, "tokenizer.json"))
    processor = CLIPImageProcessor.from_pretrained(args.base)
    model = LlavaForConditionalGeneration.from_pretrained(
        args.base, torch_dtype=torch.float32, attn_implementation="eager"
    )
    config = model.config
    image_token, per_image = config.image_token_index, config.image_seq_length
    bos, eos = config.text_config.bos_token_id, config.text_config.eos_token_id
    pad = config.text_config.pad_token_id if config.text_config.pad_token_id is not None else eos

    base_dir = os.path.dirname(os.path.abspath(args.cases))
    examples = []
    for line in open(args.cases):
        case = json.loads(line)
        prompt = tokenizer.encode(prompt_of(case), add_special_tokens=False)
        completion = tokenizer.encode(completion_of(case), add_special_tokens=False)
        head = [bos] + ([image_token] * per_image if "image" in case else [])
        pixels = None
        if "image" in case:
            image = Image.open(os.path.join(base_dir, case["image"])).convert("RGB")
            pixels = processor(images=image, return_tensors="pt")["pixel_values"][0]
        examples.append((head + prompt + completion + [eos], len(head) + len(prompt), pixels))

    per_epoch = -(-len(examples) // args.batch_size)
    total = per_epoch * args.epochs

    def batch_of(step):
        epoch, index = divmod(step, per_epoch)
        order = list(range(len(examples)))
        SplitMix(args.seed, [DATA_STREAM, epoch]).shuffle(order)
        return epoch, [examples[i] for i in order[index * args.batch_size:(index + 1) * args.batch_size]]

    lora = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        target_modules=rf".*language_model.*\.({args.targets})",
        modules_to_save=["multi_modal_projector"] if args.projector else None,
    )
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    class Schedule:
        lr, warmup_steps, decay, min_lr_ratio = args.lr, 0, "cosine", 0.0

    ends, step_tokens, losses = [], [], []
    started = time.perf_counter()
    for step in range(total):
        _, batch = batch_of(step)
        width = max(len(t) - 1 for t, _, _ in batch)
        inputs = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        tokens = 0
        for row, (ids, prompt_len, _) in enumerate(batch):
            n = len(ids) - 1
            inputs[row, :n] = torch.tensor(ids[:-1])
            attention[row, :n] = 1
            targets = torch.tensor(ids[1:])
            keep = torch.arange(1, n + 1) >= prompt_len
            labels[row, :n] = torch.where(keep, targets, torch.full_like(targets, -100))
            tokens += n
        shown = [p for _, _, p in batch if p is not None]
        pixels = torch.stack(shown) if shown else None
        logits = model(input_ids=inputs, attention_mask=attention, pixel_values=pixels).logits
        nll = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        loss = nll / (labels != -100).sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, Schedule, total)
        opt.step()
        losses.append(loss.item())
        ends.append(time.perf_counter() - started)
        step_tokens.append(tokens)
    skip = args.skip if total > args.skip else 0
    span = ends[-1] - (ends[skip - 1] if skip > 0 else 0.0)
    print(json.dumps({
        "side": "torch",
        "steps": total,
        "step_tokens": step_tokens,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "tokens_per_second": sum(step_tokens[skip:]) / span,
    }))


if __name__ == "__main__":
    main()
