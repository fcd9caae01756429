#!/usr/bin/env python3
"""Build mmx's bundled quickstart data in examples/ (synthetic, seeded).

Creates (total ~5 MiB):

  examples/README.md                    says plainly that all of this is synthetic
  examples/tiny-med-base/               tiny random LlamaForCausalLM (float32, hidden 128,
                                        intermediate 344, 4 layers, 4 heads, 2 kv heads,
                                        vocab 2048, tied embeddings) + a byte-level BPE
                                        tokenizer (vocab 2048) trained here on generated
                                        clinical-sounding text
  examples/adapters/<specialty>/        four PEFT LoRA adapters (r 8, alpha 16, all seven
                                        Llama linear projections) for cardiology,
                                        radiology, pathology, dermatology

None of the weights are trained. The adapters' A/B factors are random but built
so that every adapter's update shares a rank-4 subspace with the others, with
opposite signs between some of them (cardiology and pathology push one way,
radiology and dermatology the other), plus a private rank-4 part each. A TIES
merge of them therefore has real sign conflicts to resolve.

Run (no network needed; nothing is downloaded):

    HF_HUB_OFFLINE=1 /tmp/ref/bin/python scripts/make_example.py

It deletes and rewrites examples/tiny-med-base, examples/adapters and
examples/README.md and leaves anything else under examples/ alone. The output is
byte-for-byte reproducible (checked by running twice and comparing sha256).

Last run with: Python 3.11, torch 2.15.0 (CPU), transformers 5.24.0,
peft 0.21.2, tokenizers 0.23.3, safetensors 0.8.0.
"""

import json
import os
import random
import shutil
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BASE_DIR = EXAMPLES / "tiny-med-base"
ADAPTER_DIR = EXAMPLES / "adapters"
BASE_NAME = "tiny-med-base"

VOCAB_SIZE = 2048
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 8
ALPHA = 16
SHARED_RANK = 4

# specialty -> (sign on the shared subspace, strength of the shared part)
SPECIALTIES = {
    "cardiology": (+1.0, 1.0),
    "radiology": (-1.0, 0.8),
    "pathology": (+1.0, 0.6),
    "dermatology": (-1.0, 0.9),
}

# --------------------------------------------------------------------------
# synthetic clinical text for the tokenizer
# --------------------------------------------------------------------------

PREFIXES = ["", "", "", "hyper", "hypo", "peri", "endo", "epi", "sub", "intra", "trans",
            "dys", "brady", "tachy", "poly", "micro", "macro", "retro", "para", "post"]
ROOTS = ["cardi", "gastr", "hepat", "nephr", "neur", "derm", "oste", "arthr", "my",
         "pneum", "hem", "angi", "lymph", "thromb", "aden", "col", "encephal", "mening",
         "pancreat", "splen", "cyst", "chol", "rhin", "ot", "ophthalm", "lapar", "laryng",
         "pharyng", "bronch", "trache", "pleur", "vas", "ven", "arteri", "thyr", "mamm",
         "hist", "cyt", "path", "radi", "carcin", "melan", "kerat", "onych", "trich"]
SUFFIXES = ["itis", "ectomy", "otomy", "ostomy", "ology", "ologist", "algia", "oma",
            "osis", "opathy", "omegaly", "oplasty", "oscopy", "ogram", "ography", "emia",
            "uria", "orrhea", "openia", "ocyte", "ogenic", "ic", "al", "osclerosis"]
DRUG_STEMS = ["meto", "lisino", "losar", "atorva", "rosuva", "amlo", "omepra", "panto",
              "cipro", "levo", "amoxi", "doxy", "hepa", "enoxa", "warfa", "predni",
              "metfor", "insu", "furo", "spirono", "clopido", "apixa", "riva", "ritu",
              "adali", "infli", "tacro", "methotre", "hydroxy", "isotre"]
DRUG_SUFFIXES = ["prolol", "pril", "sartan", "statin", "dipine", "prazole", "floxacin",
                 "cillin", "cycline", "parin", "farin", "sone", "min", "lin", "semide",
                 "lactone", "grel", "ban", "ximab", "mumab", "limus", "xate", "quine", "noin"]
ANATOMY = ["left ventricle", "right atrium", "aortic valve", "mitral valve", "coronary artery",
           "lung base", "right upper lobe", "pleural space", "liver", "gallbladder",
           "pancreas", "spleen", "kidney", "bladder", "femur", "lumbar spine", "cervical spine",
           "skin", "epidermis", "dermis", "lymph node", "thyroid", "breast", "colon", "stomach"]
MODALITIES = ["chest x-ray", "CT scan", "MRI", "ultrasound", "echocardiogram", "ECG",
              "PET scan", "mammogram", "biopsy", "frozen section", "dermoscopy", "angiogram"]
FINDINGS = ["opacity", "effusion", "nodule", "mass", "lesion", "infiltrate", "stenosis",
            "regurgitation", "hypertrophy", "calcification", "edema", "fibrosis", "necrosis",
            "atypia", "dysplasia", "erythema", "plaque", "papule", "vesicle", "ulceration",
            "hyperpigmentation", "consolidation", "pneumothorax", "fracture", "infarct"]
SYMPTOMS = ["chest pain", "dyspnea", "palpitations", "syncope", "fatigue", "fever", "cough",
            "rash", "pruritus", "weight loss", "night sweats", "abdominal pain", "nausea",
            "headache", "dizziness", "orthopnea", "hemoptysis", "jaundice", "edema"]
FREQS = ["daily", "twice daily", "three times daily", "at bedtime", "as needed", "weekly"]
ADJ = ["mild", "moderate", "severe", "acute", "chronic", "bilateral", "focal", "diffuse",
       "benign", "malignant", "stable", "worsening", "improving", "unremarkable", "suspicious"]


def clinical_words(rng: random.Random):
    words = []
    for p in PREFIXES:
        for r in ROOTS:
            for s in SUFFIXES:
                words.append(p + r + s)
    for a in DRUG_STEMS:
        for b in DRUG_SUFFIXES:
            words.append(a + b)
    rng.shuffle(words)
    return words


def clinical_corpus(seed: int = 7, n_sentences: int = 12000):
    rng = random.Random(seed)
    words = clinical_words(rng)
    drugs = [a + b for a in DRUG_STEMS for b in DRUG_SUFFIXES]

    def w():
        return rng.choice(words)

    templates = [
        lambda: f"Patient presents with {rng.choice(ADJ)} {rng.choice(SYMPTOMS)} and a history of {w()}.",
        lambda: f"{rng.choice(MODALITIES).capitalize()} shows {rng.choice(ADJ)} {rng.choice(FINDINGS)} in the {rng.choice(ANATOMY)}.",
        lambda: f"Started {rng.choice(drugs)} {rng.choice([2.5, 5, 10, 20, 25, 40, 50, 81, 100, 250, 500])} mg {rng.choice(FREQS)}.",
        lambda: f"Assessment: {w()}, {rng.choice(ADJ)}; rule out {w()}.",
        lambda: f"Plan: refer to {w()} clinic for {rng.choice(MODALITIES)} and follow-up in {rng.randint(1, 12)} weeks.",
        lambda: f"Pathology: {rng.choice(ADJ)} {rng.choice(FINDINGS)} consistent with {w()}; margins {rng.choice(['clear', 'involved', 'close'])}.",
        lambda: f"Skin exam: {rng.choice(ADJ)} {rng.choice(FINDINGS)} on the {rng.choice(['arm', 'trunk', 'face', 'scalp', 'leg'])}, {rng.randint(2, 30)} mm.",
        lambda: f"Vitals: BP {rng.randint(90, 180)}/{rng.randint(50, 110)}, HR {rng.randint(45, 130)}, SpO2 {rng.randint(85, 100)}%.",
        lambda: f"Labs: troponin {rng.randint(1, 900)} ng/L, creatinine {rng.randint(40, 400)} umol/L, WBC {rng.randint(2, 25)}.{rng.randint(0, 9)}.",
        lambda: f"Impression: {w()} versus {w()}; recommend {w()}.",
    ]
    lines = [rng.choice(templates)() for _ in range(n_sentences)]
    # make sure every generated word appears at least once
    for i in range(0, len(words), 12):
        lines.append("Differential: " + ", ".join(words[i:i + 12]) + ".")
    return lines


def build_tokenizer(out_dir: Path):
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(clinical_corpus(), trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", 1)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out_dir))
    # transformers 5 no longer writes the legacy special_tokens_map.json; other
    # tools still read it, so write it when it is missing.
    stm = out_dir / "special_tokens_map.json"
    if not stm.exists():
        stm.write_text(
            json.dumps(
                {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
                indent=2,
                sort_keys=True,
            )
            + "\n"
        )


# --------------------------------------------------------------------------
# base model
# --------------------------------------------------------------------------


def build_base():
    cfg = LlamaConfig(
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(20240601)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    model.save_pretrained(str(BASE_DIR), safe_serialization=True)


# --------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(torch.float32)


def lora_modules(peft_model):
    """(module path, lora_A param, lora_B param) for every LoRA layer, in order."""
    params = dict(peft_model.named_parameters())
    out = []
    for name in sorted(params):
        if name.endswith("lora_A.default.weight"):
            stem = name[: -len("lora_A.default.weight")]
            out.append((stem, params[name], params[stem + "lora_B.default.weight"]))
    return out


def build_adapters():
    # Shared factors, one set per LoRA layer, drawn once.
    shared_gen = torch.Generator().manual_seed(4242)
    probe = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(BASE_DIR), dtype=torch.float32),
        LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, task_type="CAUSAL_LM"),
    )
    shared = {}
    for stem, a, b in lora_modules(probe):
        in_f, out_f = a.shape[1], b.shape[0]
        shared[stem] = (
            torch.randn(SHARED_RANK, in_f, generator=shared_gen) / in_f**0.5,
            torch.randn(out_f, SHARED_RANK, generator=shared_gen) * 0.02,
        )
    del probe

    for idx, (specialty, (sign, strength)) in enumerate(SPECIALTIES.items()):
        gen = torch.Generator().manual_seed(1000 + idx)
        model = AutoModelForCausalLM.from_pretrained(str(BASE_DIR), dtype=torch.float32)
        cfg = LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            lora_dropout=0.05,
            target_modules=TARGETS,
            task_type="CAUSAL_LM",
        )
        pm = get_peft_model(model, cfg)
        with torch.no_grad():
            for stem, a, b in lora_modules(pm):
                in_f, out_f = a.shape[1], b.shape[0]
                a_sh, b_sh = shared[stem]
                priv = RANK - SHARED_RANK
                a_pr = torch.randn(priv, in_f, generator=gen) / in_f**0.5
                b_pr = torch.randn(out_f, priv, generator=gen) * 0.02
                a_full = torch.cat([a_sh, a_pr], dim=0)
                b_full = torch.cat([sign * strength * b_sh, b_pr], dim=1)
                # LoRA factors are only defined up to an r x r rotation; rotate
                # so the adapters don't share literal A rows.
                rot = random_orthogonal(RANK, gen)
                a.copy_(rot @ a_full)
                b.copy_(b_full @ rot.T)
                assert a.ne(0).all() and b.ne(0).all()
        pm.peft_config["default"].base_model_name_or_path = BASE_NAME
        out = ADAPTER_DIR / specialty
        # PEFT looks up base_model_name_or_path while saving (to see whether the
        # vocabulary was resized); run from examples/ so the relative name resolves.
        cwd = os.getcwd()
        os.chdir(EXAMPLES)
        try:
            pm.save_pretrained(str(out), safe_serialization=True)
        finally:
            os.chdir(cwd)
        readme = out / "README.md"
        if readme.exists():
            readme.unlink()
        cfg_path = out / "adapter_config.json"
        doc = json.loads(cfg_path.read_text())
        doc["target_modules"] = sorted(doc["target_modules"])
        cfg_path.write_text(json.dumps(doc, indent=2, sort_keys=True))


README = """\
# Example data (synthetic)

Everything in this folder is **synthetic**. The weights are random, seeded, and
made by `scripts/make_example.py`; nothing here was trained, and the models
produce gibberish. It exists so the quickstart runs offline in seconds. Later
work replaces these adapters with trained ones.

- `tiny-med-base/`: a tiny randomly initialised Llama-family causal LM (float32,
  hidden 128, 4 layers, 4 attention heads / 2 KV heads, vocabulary 2048, tied
  embeddings, about 1M parameters) with a byte-level BPE tokenizer trained
  locally on generated clinical-sounding text.
- `adapters/{cardiology,radiology,pathology,dermatology}/`: PEFT LoRA adapters
  (r 8, alpha 16, on q/k/v/o/gate/up/down projections) for `tiny-med-base`.
  Their factors are random, built so the adapters share part of a subspace with
  opposite signs (cardiology and pathology one way, radiology and dermatology
  the other), so a TIES merge has real sign conflicts to resolve. The specialty
  names are labels only.

Regenerate with:

    HF_HUB_OFFLINE=1 python scripts/make_example.py
"""


def verify():
    tok = AutoTokenizer.from_pretrained(str(BASE_DIR))
    assert len(tok) == VOCAB_SIZE, len(tok)
    ids = tok("Echocardiogram shows moderate mitral regurgitation; started metoprolol 25 mg daily.")
    assert ids["input_ids"][0] == tok.bos_token_id
    model = AutoModelForCausalLM.from_pretrained(str(BASE_DIR), dtype=torch.float32).eval()
    assert model.config.vocab_size == VOCAB_SIZE
    x = torch.tensor([ids["input_ids"]])
    with torch.no_grad():
        ref = model(x).logits
    deltas = {}
    for specialty in SPECIALTIES:
        m = AutoModelForCausalLM.from_pretrained(str(BASE_DIR), dtype=torch.float32)
        pm = PeftModel.from_pretrained(m, str(ADAPTER_DIR / specialty)).eval()
        with torch.no_grad():
            diff = (pm(x).logits - ref).abs().max().item()
        assert diff > 1e-4, (specialty, diff)
        merged = pm.merge_and_unload().state_dict()
        deltas[specialty] = torch.cat(
            [(merged[k] - model.state_dict()[k]).reshape(-1) for k in sorted(merged) if "layers" in k]
        )
    names = list(SPECIALTIES)
    print("sign disagreement between adapter updates (fraction of elements):")
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            dis = (deltas[a].sign() != deltas[b].sign()).float().mean().item()
            cos = torch.nn.functional.cosine_similarity(deltas[a], deltas[b], dim=0).item()
            print(f"  {a:12s} {b:12s} disagree {dis:.3f}  cosine {cos:+.3f}")
    sd = load_file(str(BASE_DIR / "model.safetensors"))
    assert "lm_head.weight" not in sd  # tied


def main():
    for p in (BASE_DIR, ADAPTER_DIR):
        if p.exists():
            shutil.rmtree(p)
    EXAMPLES.mkdir(exist_ok=True)
    build_base()
    build_tokenizer(BASE_DIR)
    build_adapters()
    (EXAMPLES / "README.md").write_text(README)
    verify()
    total = sum(f.stat().st_size for f in EXAMPLES.rglob("*") if f.is_file())
    print(f"examples/ total {total / 2**20:.2f} MiB")
    if total > 8 * 2**20:
        sys.exit("examples/ is over 8 MiB")


if __name__ == "__main__":
    main()
