"""The peers' side of the GBA speed benchmarks (scripts/bench-gba.sh), on the same tiny model,
the same adapter, the same prompts and 2 threads:

  generate BASE ADAPTER PROMPTS.json MAX REPEATS
      transformers' `generate` (sampling, temperature 1, no top-k or top-p truncation) of the
      token ids mmx's rollout benchmark wrote; prints completion tokens per second (best of
      REPEATS), tokens counted up to each row's first end-of-sequence token.
  grpo BASE ADAPTER PROMPTS.json MAX STEPS G
      TRL's GRPOTrainer for STEPS steps on the prompts' texts (G generations each, one
      generation batch of all prompts per optimizer step, mu 1, beta 0, loss dapo, the LoRA
      trainable), with an accuracy reward; prints the median seconds per step after the first.

Needs torch, transformers, peft and trl (a virtual environment, never CI)."""

import json
import re
import statistics
import sys
import time

import torch

torch.set_num_threads(2)


def load(base, adapter, trainable):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    tokenizer = AutoTokenizer.from_pretrained(base)
    return model, tokenizer


def generate(base, adapter, prompts_file, max_new, repeats):
    model, _ = load(base, adapter, False)
    model.eval()
    config = model.config
    prompts = json.load(open(prompts_file))
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[config.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    best, tokens = float("inf"), 0
    for r in range(repeats):
        torch.manual_seed(r)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=max_new,
                eos_token_id=config.eos_token_id,
                pad_token_id=config.pad_token_id,
            )
        seconds = time.perf_counter() - start
        if seconds < best:
            best = seconds
            tokens = 0
            for row in out[:, width:].tolist():
                n = row.index(config.eos_token_id) + 1 if config.eos_token_id in row else len(row)
                tokens += n
    print(json.dumps({"rows": len(prompts), "tokens": tokens, "seconds": best, "tokens_per_second": tokens / best}))


def grpo(base, adapter, prompts_file, max_new, steps, g):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = load(base, adapter, True)
    prompts = json.load(open(prompts_file))
    # One prompt per group: the file holds G rows per case, so each case's first row.
    unique = prompts[::g]
    texts = [tokenizer.decode(list(p[1:])) for p in unique]
    dataset = Dataset.from_dict({"prompt": texts})

    def accuracy(completions, **kwargs):
        return [1.0 if re.search(r"Answer\s*:\s*[A-D]", c) else 0.0 for c in completions]

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    per_step = len(unique) * g
    config = GRPOConfig(
        output_dir="/tmp/trl-grpo-bench",
        per_device_train_batch_size=per_step // 2,
        gradient_accumulation_steps=2,
        num_generations=g,
        max_completion_length=max_new,
        num_iterations=1,
        beta=0.0,
        loss_type="dapo",
        temperature=1.0,
        learning_rate=5e-4,
        max_steps=steps,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[accuracy],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.train()
    print(json.dumps({"steps": len(times), "completions_per_step": per_step,
                      "seconds_per_step": statistics.median(times[1:]), "all": times}))


if __name__ == "__main__":
    mode, base, adapter, prompts_file = sys.argv[1:5]
    rest = [int(x) for x in sys.argv[5:]]
    if mode == "generate":
        generate(base, adapter, prompts_file, *rest)
    else:
        grpo(base, adapter, prompts_file, *rest)
