#!/usr/bin/env python3
"""Write the transformers reference fixtures for the trainers' vision-language model
(tests/vlm.rs): a tiny random LLaVA as transformers defines it (`LlavaForConditionalGeneration`:
a CLIP vision tower, the two-layer GELU projector, a Llama language model).

How to run (not run by CI; the fixtures it writes are committed):

    python3 -m venv /tmp/ref
    /tmp/ref/bin/pip install torch transformers safetensors
    /tmp/ref/bin/python scripts/make_vlm_fixtures.py            # from the repository root

It writes, under tests/fixtures/vlm/:

    tiny-llava/config.json, tiny-llava/model.safetensors      the model, float32, saved by
                                                              `save_pretrained` (its key layout)
    tiny-llava/preprocessor_config.json                       its CLIPImageProcessor (shortest
                                                              edge 16, centre crop 16 x 16)
    square.png (16 x 16), wide.png (24 x 20)                  two random RGB images
    tiny-llava-lora/adapter_config.json,
    tiny-llava-lora/adapter_model.safetensors                 a PEFT LoRA on the language model
                                                              (non-zero random B)
    tiny-llava-logits.safetensors                             the inputs and transformers' logits

The model: a CLIP tower of 16x16 images in 4x4 patches (16 patches and a class token), hidden
32, 3 layers, 4 heads, quick_gelu; features from layer -2 without the class token ("default"),
so 16 image tokens per image; a GELU projector 32 -> 48 -> 48; a Llama of hidden 48, 2 layers,
4 heads / 2 key-value heads, vocabulary 80 (the image token is 79), untied head. Weights are
drawn at a larger scale than the usual init so that every part shows in the logits.

The logits file holds `pixel_values` [2, 3, 16, 16] (float32), `input_ids` [2, 21] (I64: each
row one image's 16 tokens among text, at different places), `logits` [2, 21, 80] and
`logits_lora` (the adapter on), and for a text-only prompt `text_ids` [1, 9], `text_logits`
and `text_logits_lora` [1, 9, 80].

The adapter: r=4, lora_alpha=8, on the language model's q_proj, v_proj, up_proj and down_proj
(the vision tower and the projector untouched), saved with the module names PEFT gives a
LLaVA model (`base_model.model.model.language_model.layers.…`).

`processed` [2, 3, 16, 16] is what the CLIPImageProcessor makes of square.png and wide.png
(wide.png is resized, bicubic with antialiasing, then centre-cropped), and `file_logits` the
logits of `input_ids` with those pixels. `generated` [2, 8] (I64) is `generate`'s greedy
continuation of `input_ids` with `pixel_values` (no end-of-sequence token).

The eager attention implementation is used so that the reference is plain matmul + softmax.
Everything is seeded; the output depends on the library versions only.
"""

import os
import shutil

import torch
from safetensors.torch import save_file
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

OUT = os.path.join("tests", "fixtures", "vlm")
IMAGE_TOKEN = 79
IMAGE_TOKENS = 16


def main():
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=16, patch_size=4, projection_dim=32, hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=80, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", image_seq_length=IMAGE_TOKENS,
    )
    config._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * (torch.rand_like(p) * 2 - 1))
            elif p.dim() == 1:
                p.copy_(0.2 * (torch.rand_like(p) * 2 - 1))
            else:
                fan_in = p[0].numel()
                p.copy_((torch.rand_like(p) * 2 - 1) * 2.0 / fan_in ** 0.5)
    directory = os.path.join(OUT, "tiny-llava")
    shutil.rmtree(directory, ignore_errors=True)
    model.save_pretrained(directory, safe_serialization=True)
    os.remove(os.path.join(directory, "generation_config.json"))

    image = [IMAGE_TOKEN] * IMAGE_TOKENS
    input_ids = torch.tensor([[1, 3, 4] + image + [5, 6], [1] + image + [7, 8, 9, 10]])
    pixel_values = torch.rand(2, 3, 16, 16) * 2 - 1
    text_ids = torch.tensor([[1, 11, 12, 13, 14, 15, 16, 17, 18]])
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
        text_logits = model(input_ids=text_ids).logits
    with torch.no_grad():
        generated = model.generate(
            input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=8, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )[:, input_ids.shape[1]:]

    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor.save_pretrained(directory)
    generator = torch.Generator().manual_seed(1)
    images = []
    for name, (width, height) in [("square.png", (16, 16)), ("wide.png", (24, 20))]:
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
        image = Image.fromarray(pixels.numpy(), "RGB")
        image.save(os.path.join(OUT, name))
        images.append(Image.open(os.path.join(OUT, name)))
    processed = processor(images=images, return_tensors="pt")["pixel_values"].float()
    with torch.no_grad():
        file_logits = model(input_ids=input_ids, pixel_values=processed).logits

    lora = LoraConfig(
        r=4, lora_alpha=8,
        target_modules=r".*language_model.*\.(q_proj|v_proj|up_proj|down_proj)",
    )
    peft = get_peft_model(model, lora).eval()
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.rand_like(p) * 2 - 1) * 0.5)
        logits_lora = peft(input_ids=input_ids, pixel_values=pixel_values).logits
        text_logits_lora = peft(input_ids=text_ids).logits
    adapter = os.path.join(OUT, "tiny-llava-lora")
    shutil.rmtree(adapter, ignore_errors=True)
    peft.save_pretrained(adapter)
    readme = os.path.join(adapter, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    save_file(
        {
            "pixel_values": pixel_values.contiguous(),
            "input_ids": input_ids.contiguous(),
            "logits": logits.contiguous(),
            "logits_lora": logits_lora.contiguous(),
            "text_ids": text_ids.contiguous(),
            "text_logits": text_logits.contiguous(),
            "text_logits_lora": text_logits_lora.contiguous(),
            "processed": processed.contiguous(),
            "file_logits": file_logits.contiguous(),
            "generated": generated.contiguous(),
        },
        os.path.join(OUT, "tiny-llava-logits.safetensors"),
    )
    print("wrote", directory, "and the logits;", tuple(logits.shape), float(logits.abs().max()))


if __name__ == "__main__":
    main()
