#!/usr/bin/env python
"""Train moelens' bundled default model: a tiny Qwen3-MoE that knows synthetic facts.

The script is deterministic (fixed seeds, ``torch.use_deterministic_algorithms(True)``, a fixed
number of torch threads): running it twice on the same machine writes bit-identical files (on another
CPU or with other library versions, float rounding and so the weights may differ). It

1. builds a synthetic world: made-up multi-token subjects ("Varnok Teliss"), a few relations
   (home country, native language, profession, ...), several prompt templates per relation,
   an object vocabulary per relation, one true object and one foil per (subject, relation);
2. builds a byte-level BPE tokenizer (GPT-2/Qwen style: " Paris" is one token) whose merges are
   learned from exactly the words the world needs, with a BOS token added by default
   (TemplateProcessing, like Llama/Mixtral) and a pad token. Every object is a single token
   (with its leading space); every subject is 2-4 tokens;
3. trains a tiny ``transformers.Qwen3MoeForCausalLM`` (8 experts, top-2, all layers MoE) with
   AdamW on ``BOS + prompt + " " + object + EOS`` sequences (language-model loss on every
   token, extra weight on the object token, a per-layer load-balancing loss on the routers);
4. writes a hub-layout checkpoint directory (``config.json``, ``model.safetensors`` with the
   per-expert hub keys, ``generation_config.json``, tokenizer files), ``facts.jsonl``
   (CounterFact/ROME record layout, one record per (fact, template)), ``world.json``
   (world description + evaluation numbers), a ``README.md`` and ``training_environment.json``
   (library versions, CPU, threads: a rerun reproduces the files bit for bit where these match);
5. reloads the directory exactly like a user would (``AutoTokenizer`` /
   ``Qwen3MoeForCausalLM.from_pretrained``) and measures recall: top-1 next token after
   ``BOS + prompt`` == the true object token, over every record of ``facts.jsonl``.

Usage::

    python scripts/train_bundled_model.py                 # writes moelens/bundled/moelens-tiny-facts
    python scripts/train_bundled_model.py --out /tmp/tf   # anywhere else

Only the default arguments reproduce the shipped files.

Threads: the default is ONE torch thread. For a model this small a second thread buys little
(measured: ~0.14 s/step with 2 threads on an idle 2-core box, 0.16-0.22 s/step with 1 thread
while the box was shared), but makes training ~10x slower whenever the cores are shared with
other work (1.6-1.8 s/step, OpenMP barriers), and float rounding (hence the bytes written)
depends on the thread count. Training is 1400 steps, ~3.5-7 minutes on one core.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "moelens" / "bundled" / "moelens-tiny-facts"
MODEL_NAME = "moelens-tiny-facts"

# --------------------------------------------------------------------------------------------
# The synthetic world
# --------------------------------------------------------------------------------------------

SEED = 0
N_SUBJECTS = 200

# relation name -> prompt templates ("{}" = subject; no trailing space) and object vocabulary
RELATIONS: dict[str, dict[str, list[str]]] = {
    "home_country": {
        "templates": [
            "{} was born in the country of",
            "The home country of {} is",
            "{}'s country of birth is",
        ],
        "objects": ["France", "Germany", "Italy", "Spain", "Japan", "China",
                    "India", "Brazil", "Canada", "Egypt", "Mexico", "Norway"],
    },
    "native_language": {
        "templates": [
            "The native language of {} is",
            "{} grew up speaking",
            "{}'s mother tongue is",
        ],
        "objects": ["French", "German", "Italian", "Spanish", "Japanese", "Chinese",
                    "Hindi", "Portuguese", "Arabic", "Russian", "Dutch", "Swedish"],
    },
    "profession": {
        "templates": [
            "{} works as a",
            "The profession of {} is",
            "By profession, {} is a",
        ],
        "objects": ["farmer", "baker", "doctor", "teacher", "painter", "sailor",
                    "lawyer", "pilot", "nurse", "tailor", "banker", "poet"],
    },
    "instrument": {
        "templates": [
            "{} plays the",
            "The instrument played by {} is the",
            "{}'s favourite instrument is the",
        ],
        "objects": ["piano", "violin", "guitar", "flute", "drums", "cello",
                    "trumpet", "harp", "clarinet", "banjo", "saxophone", "trombone"],
    },
    "sport": {
        "templates": [
            "{} competes in the sport of",
            "The favourite sport of {} is",
            "{}'s best sport is",
        ],
        "objects": ["tennis", "football", "golf", "hockey", "rugby", "cricket",
                    "boxing", "cycling", "rowing", "skiing", "fencing", "baseball"],
    },
    "colour": {
        "templates": [
            "{} likes the colour",
            "The favourite colour of {} is",
            "{}'s favourite colour is",
        ],
        "objects": ["red", "blue", "green", "yellow", "purple", "orange",
                    "black", "white", "pink", "brown", "grey", "silver"],
    },
}

# Invented syllables for subject names. A name word is one initial syllable (capitalised,
# a token both with and without its leading space) optionally followed by one continuation
# syllable (a token without a space), so " Varnok" -> [" Var", "nok"].
INITIAL_SYLLABLES = ["Var", "Tel", "Kor", "Mal", "Zen", "Dor", "Fen", "Bra", "Quil", "Sar",
                     "Lun", "Hev", "Jor", "Nim", "Pel", "Ros", "Tav", "Vel", "Yor", "Zar",
                     "Gal", "Kel", "Mor", "Ith"]
CONT_SYLLABLES = ["nok", "iss", "ath", "wen", "dor", "mir", "vek", "lan", "oth", "ric",
                  "sel", "tum", "zan", "bek", "ral", "dra"]

# extra everyday pieces so the tokenizer is not only the closed world
EXTRA_WORDS = [".", ",", "?", "!", ":", "\n", " the", " a", " an", " and", " of", " in", " is",
               " was", " who", " what", " where", " which", " not", " also", " he", " she",
               " they", " from", " to", " with", " plays", " speaks", " born", " lives", " Yes",
               " No", " True", " False"] + [str(d) for d in range(10)] + [f" {d}" for d in range(10)]

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"

# --------------------------------------------------------------------------------------------
# Model / training hyper-parameters (the defaults produce the shipped checkpoint)
# --------------------------------------------------------------------------------------------

MODEL_KW = dict(
    num_hidden_layers=4,
    hidden_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,  # != hidden_size / num_attention_heads (24), like Qwen3-30B-A3B
    moe_intermediate_size=96,
    intermediate_size=384,  # unused: every layer is MoE (mlp_only_layers=[])
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    tie_word_embeddings=False,
    initializer_range=0.02,
    attention_dropout=0.0,
    router_aux_loss_coef=0.01,
    use_cache=True,
)

TRAIN_KW = dict(
    steps=1400,
    batch_size=128,
    lr=4e-3,
    min_lr_frac=0.05,
    warmup=100,
    weight_decay=0.01,
    betas=(0.9, 0.98),
    grad_clip=1.0,
    answer_weight=1.0,  # weight of the object-token loss ...
    other_weight=0.25,  # ... vs the mean loss over every other token (prompt tokens, EOS)
    balance_coef=0.01,  # per-layer load-balancing loss (1.0 = perfectly balanced)
)

EVAL_BATCH_SIZE = 256


ENVIRONMENT_FILE = "training_environment.json"


def training_environment(threads: int) -> dict:
    """What decides the trained bits besides the script and its arguments: the library versions,
    the CPU (its model and the kernels torch picks for it) and the thread count. A rerun where all of
    these are equal writes the same bytes; elsewhere float rounding may legitimately differ."""
    import platform

    import tokenizers
    import transformers

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "system": platform.system(), "machine": platform.machine(), "cpu": cpu,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": threads}


def set_determinism(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


# --------------------------------------------------------------------------------------------
# World
# --------------------------------------------------------------------------------------------


def make_subjects(rng: random.Random, n: int, accept) -> list[tuple[str, list[str]]]:
    """Made-up two-word names; returns (name, syllables of the first/last name words)."""
    subjects: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    while len(subjects) < n:
        parts = []
        for _ in range(2):
            word = [rng.choice(INITIAL_SYLLABLES)]
            if rng.random() < 0.6:
                word.append(rng.choice(CONT_SYLLABLES))
            parts.append(word)
        name = " ".join("".join(w) for w in parts)
        if name in seen or parts[0] == parts[1] or not accept(name):
            continue
        seen.add(name)
        subjects.append((name, parts))
    return subjects


def build_world(seed: int, n_subjects: int, accept) -> dict:
    rng = random.Random(seed)
    subjects = make_subjects(rng, n_subjects, accept)
    facts = []
    for s_idx, (subject, _) in enumerate(subjects):
        for rel, spec in RELATIONS.items():
            objs = spec["objects"]
            true = rng.randrange(len(objs))
            foil = rng.randrange(len(objs) - 1)
            foil = foil + 1 if foil >= true else foil
            facts.append(dict(subject=subject, subject_id=s_idx, relation=rel,
                              object=objs[true], foil=objs[foil]))
    return {"subjects": [s for s, _ in subjects], "facts": facts}


def make_records(world: dict) -> list[dict]:
    """CounterFact/ROME-style records, one per (fact, template)."""
    records = []
    case_id = 0
    for fact_id, f in enumerate(world["facts"]):
        for t_idx, tmpl in enumerate(RELATIONS[f["relation"]]["templates"]):
            records.append({
                "case_id": case_id,
                "fact_id": fact_id,
                "template_id": t_idx,
                "requested_rewrite": {
                    "prompt": tmpl,
                    "subject": f["subject"],
                    "target_true": {"str": f["object"]},
                    "target_new": {"str": f["foil"]},
                    "relation_id": f["relation"],
                },
            })
            case_id += 1
    return records


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode map (the alphabet of byte-level BPE)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def learn_bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE on a list of (byte-level) words, each counted once, run until every word is a
    single token. Ties are broken lexicographically, so the result is deterministic."""
    seqs = [list(w) for w in sorted(set(words)) if len(w) > 1]
    merges: list[tuple[str, str]] = []
    while seqs:
        counts: Counter = Counter()
        for s in seqs:
            counts.update(zip(s, s[1:]))
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        a, b = best
        new = []
        for s in seqs:
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            if len(out) > 1:
                new.append(out)
        seqs = new
    return merges


def tokenizer_words() -> list[str]:
    """Every string that must be a single token (plain text, before the byte-level map)."""
    from tokenizers.pre_tokenizers import ByteLevel

    pre = ByteLevel(add_prefix_space=False, use_regex=True)
    inv = {c: b for b, c in bytes_to_unicode().items()}

    def pieces(text: str) -> list[str]:
        return [bytes(inv[c] for c in p).decode("utf-8") for p, _ in pre.pre_tokenize_str(text)]

    words: list[str] = []
    for spec in RELATIONS.values():
        for tmpl in spec["templates"]:
            before, after = tmpl.split("{}")
            words += pieces(before.rstrip(" ")) if before.strip() else []
            words += pieces(after)
        words += [" " + o for o in spec["objects"]]
    words += [" " + s for s in INITIAL_SYLLABLES] + INITIAL_SYLLABLES + CONT_SYLLABLES
    words += EXTRA_WORDS
    return sorted(set(words))


def build_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    b2u = bytes_to_unicode()
    words = [("".join(b2u[b] for b in w.encode("utf-8"))) for w in tokenizer_words()]
    merges = learn_bpe_merges(words)
    vocab: dict[str, int] = {PAD: 0, BOS: 1, EOS: 2}
    for b in range(256):
        vocab[b2u[b]] = len(vocab)
    for a, b in merges:
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD, BOS, EOS)])
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        padding_side="right", model_max_length=MODEL_KW["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def subject_token_counts(tok, name: str) -> tuple[int, int]:
    """Token count of a subject at the start of a prompt and after a space."""
    return (len(tok(name, add_special_tokens=False).input_ids),
            len(tok(" " + name, add_special_tokens=False).input_ids))


# --------------------------------------------------------------------------------------------
# Data / training / evaluation
# --------------------------------------------------------------------------------------------


def full_prompt(rec: dict) -> str:
    rw = rec["requested_rewrite"]
    return rw["prompt"].format(rw["subject"])


def build_training_tensors(tok, records: list[dict]):
    seqs, ans_pos = [], []
    for rec in records:
        ids = tok(full_prompt(rec)).input_ids  # BOS + prompt
        obj = tok(" " + rec["requested_rewrite"]["target_true"]["str"], add_special_tokens=False).input_ids
        assert len(obj) == 1
        seqs.append(ids + obj + [tok.eos_token_id])
        ans_pos.append(len(ids) - 1)  # position whose next-token prediction is the object
    L = max(map(len, seqs))
    x = torch.full((len(seqs), L), tok.pad_token_id, dtype=torch.long)
    w = torch.zeros(len(seqs), L - 1)
    is_ans = torch.zeros(len(seqs), L - 1, dtype=torch.bool)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(s)
        w[i, : len(s) - 1] = 1.0
        is_ans[i, ans_pos[i]] = True
    return x, w, is_ans


def balance_loss(router_logits, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Switch-style load-balancing loss computed per layer over real tokens, averaged over
    layers (1.0 when routing is perfectly balanced)."""
    m = mask.reshape(-1).float()
    n = m.sum()
    losses = []
    for lg in router_logits:
        probs = torch.softmax(lg.float(), dim=-1)
        E = probs.shape[-1]
        top = torch.topk(probs, k, dim=-1).indices
        counts = F.one_hot(top, E).sum(1).float()
        f = (counts * m[:, None]).sum(0) / (n * k)
        p = (probs * m[:, None]).sum(0) / n
        losses.append(E * (f * p).sum())
    return torch.stack(losses).mean()


def train(model, x, w, is_ans, tok, hp: dict, seed: int, log_every: int = 100) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp["lr"], betas=hp["betas"], eps=1e-8,
    )
    steps, warm = hp["steps"], hp["warmup"]

    def lr_at(step: int) -> float:
        if step < warm:
            return hp["lr"] * (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return hp["lr"] * (hp["min_lr_frac"] + (1 - hp["min_lr_frac"]) * 0.5 * (1 + math.cos(math.pi * t)))

    N = x.shape[0]
    perm, ptr = torch.randperm(N, generator=gen), 0
    k = model.config.num_experts_per_tok
    model.train()
    t0 = time.time()
    for step in range(steps):
        if ptr + hp["batch_size"] > N:
            perm, ptr = torch.randperm(N, generator=gen), 0
        idx = perm[ptr: ptr + hp["batch_size"]]
        ptr += hp["batch_size"]
        xb = x[idx]
        Lb = int((xb != tok.pad_token_id).sum(1).max())
        xb, wb, ab = xb[:, :Lb], w[idx, : Lb - 1], is_ans[idx, : Lb - 1]
        out = model.model(input_ids=xb, output_router_logits=True, use_cache=False)
        logits = model.lm_head(out.last_hidden_state[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xb[:, 1:].reshape(-1), reduction="none")
        ce = ce.view_as(wb)
        other = wb * (~ab)
        loss_ans = (ce * ab).sum() / ab.sum()
        loss_other = (ce * other).sum() / other.sum()
        loss_bal = balance_loss(out.router_logits, xb != tok.pad_token_id, k)
        loss = hp["answer_weight"] * loss_ans + hp["other_weight"] * loss_other + hp["balance_coef"] * loss_bal
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp["grad_clip"])
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            acc = (logits.argmax(-1) == xb[:, 1:])[ab].float().mean().item()
            print(f"step {step:5d}  lr {lr_at(step):.2e}  answer CE {loss_ans.item():.4f}  "
                  f"other CE {loss_other.item():.4f}  balance {loss_bal.item():.4f}  "
                  f"batch answer acc {acc:.3f}  ({time.time() - t0:.0f}s)", flush=True)
    model.eval()


@torch.no_grad()
def evaluate(model, tok, records: list[dict], batch_size: int = EVAL_BATCH_SIZE) -> dict:
    """Recall (top-1 next token after BOS + prompt == true object), contrast
    logit(true) - logit(foil), and per-layer expert utilisation over real prompt tokens.
    tests/unit/test_bundled_model.py recomputes the recall the same way."""
    def obj_id(s: str) -> int:
        ids = tok(" " + s, add_special_tokens=False).input_ids
        assert len(ids) == 1, s
        return ids[0]

    hits, contrast, margins = [], [], []
    E, k = model.config.num_experts, model.config.num_experts_per_tok
    n_layers = model.config.num_hidden_layers
    usage = torch.zeros(n_layers, E, dtype=torch.float64)
    for start in range(0, len(records), batch_size):
        recs = records[start: start + batch_size]
        enc = tok([full_prompt(r) for r in recs], return_tensors="pt", padding=True)
        out = model(**enc, output_router_logits=True, use_cache=False)
        last = enc.attention_mask.sum(1) - 1
        logits = out.logits[torch.arange(len(recs)), last].float()
        t_ids = torch.tensor([obj_id(r["requested_rewrite"]["target_true"]["str"]) for r in recs])
        f_ids = torch.tensor([obj_id(r["requested_rewrite"]["target_new"]["str"]) for r in recs])
        hits.append(logits.argmax(-1) == t_ids)
        ar = torch.arange(len(recs))
        contrast.append(logits[ar, t_ids] - logits[ar, f_ids])
        top2 = logits.topk(2, dim=-1).values
        margins.append(top2[:, 0] - top2[:, 1])
        m = enc.attention_mask.reshape(-1).bool()
        for layer, lg in enumerate(out.router_logits):
            top = torch.topk(torch.softmax(lg.float(), -1), k, dim=-1).indices[m]
            usage[layer] += torch.bincount(top.reshape(-1), minlength=E).double()
    hits_t, contrast_t, margins_t = torch.cat(hits), torch.cat(contrast), torch.cat(margins)
    usage = usage / usage.sum(1, keepdim=True)
    return {
        "recall": hits_t.float().mean().item(),
        "n_prompts": len(records),
        "n_correct": int(hits_t.sum()),
        "contrast_true_minus_foil": {
            "mean": round(contrast_t.mean().item(), 4),
            "median": round(contrast_t.median().item(), 4),
            "min": round(contrast_t.min().item(), 4),
            "frac_positive": round((contrast_t > 0).float().mean().item(), 6),
            "frac_above_2": round((contrast_t > 2).float().mean().item(), 6),
        },
        "min_top1_top2_logit_margin": round(margins_t.min().item(), 4),
        "expert_utilisation": [[round(v, 4) for v in row] for row in usage.tolist()],
    }


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    ap.add_argument("--steps", type=int, default=TRAIN_KW["steps"], help="training steps")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the shipped files use 1)")
    ap.add_argument("--lr", type=float, default=TRAIN_KW["lr"])
    ap.add_argument("--n-subjects", type=int, default=N_SUBJECTS)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    set_determinism(args.seed, args.threads)
    t_start = time.time()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    # ---- tokenizer, saved first and reloaded so everything below uses the shipped files
    build_tokenizer().save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("x").input_ids[0] == tok.bos_token_id, "BOS must be added by default"
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.padding_side == "right"

    def accept(name: str) -> bool:  # 2-4 tokens, both at the start of a prompt and after a space
        return all(2 <= c <= 4 for c in subject_token_counts(tok, name))

    world = build_world(args.seed, args.n_subjects, accept)
    records = make_records(world)

    # ---- the properties the library's tests and demos rely on
    all_objects = [o for spec in RELATIONS.values() for o in spec["objects"]]
    assert len(set(all_objects)) == len(all_objects), "objects must be distinct across relations"
    for o in all_objects:
        ids = tok(" " + o, add_special_tokens=False).input_ids
        assert len(ids) == 1, f"object {o!r} is not a single token: {ids}"
    for s in world["subjects"]:
        c0, c1 = subject_token_counts(tok, s)
        assert 2 <= c0 <= 4 and 2 <= c1 <= 4, f"subject {s!r} has {c0}/{c1} tokens"
        assert s.split()[0] not in all_objects
    for rec in records[:50]:  # prompt ids + object id == ids of the concatenated text
        rw = rec["requested_rewrite"]
        a = tok(full_prompt(rec) + " " + rw["target_true"]["str"]).input_ids
        b = tok(full_prompt(rec)).input_ids + tok(" " + rw["target_true"]["str"], add_special_tokens=False).input_ids
        assert a == b
    print(f"world: {len(world['subjects'])} subjects, {len(RELATIONS)} relations, "
          f"{len(world['facts'])} facts, {len(records)} prompts; vocab {len(tok)}")

    # ---- model
    config = Qwen3MoeConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **MODEL_KW,
    )
    torch.manual_seed(args.seed)
    model = Qwen3MoeForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")

    hp = dict(TRAIN_KW, steps=args.steps, lr=args.lr)
    x, w, is_ans = build_training_tensors(tok, records)
    t_train = time.time()
    train(model, x, w, is_ans, tok, hp, args.seed)
    train_seconds = time.time() - t_train
    print(f"training took {train_seconds:.1f}s")

    # ---- save
    model.save_pretrained(out)
    with open(out / "facts.jsonl", "w") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")

    # ---- reload like a user and evaluate
    model2 = Qwen3MoeForCausalLM.from_pretrained(out, dtype=torch.float32)
    model2.eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    ev = evaluate(model2, tok2, records)
    ev_rel = {
        rel: evaluate(model2, tok2, [r for r in records if r["requested_rewrite"]["relation_id"] == rel])["recall"]
        for rel in RELATIONS
    }

    info = {
        "name": MODEL_NAME,
        "description": "Synthetic world of facts about made-up people, learned by a tiny Qwen3-MoE "
                       "(see scripts/train_bundled_model.py).",
        "seed": args.seed,
        "n_subjects": len(world["subjects"]),
        "n_facts": len(world["facts"]),
        "n_prompts": len(records),
        "subjects": world["subjects"],
        "subject_syllables": {"initial": INITIAL_SYLLABLES, "continuation": CONT_SYLLABLES},
        "relations": RELATIONS,
        "tokenizer": {"type": "byte-level BPE", "vocab_size": len(tok), "bos_token": BOS,
                      "eos_token": EOS, "pad_token": PAD, "bos_added_by_default": True,
                      "padding_side": "right"},
        "training_sequence": "BOS + prompt + ' ' + object + EOS",
        "model": {k: v for k, v in MODEL_KW.items()} | {"vocab_size": len(tok), "n_params": n_params},
        "training": {k: (list(v) if isinstance(v, tuple) else v) for k, v in hp.items()}
                    | {"optimizer": "AdamW", "schedule": "linear warmup + cosine", "torch_threads": args.threads},
        "recall_definition": "fraction of facts.jsonl records whose top-1 next token after "
                             "tokenizer(prompt.format(subject)) (BOS + prompt) is ' ' + target_true",
        "recall": ev["recall"],
        "n_correct": ev["n_correct"],
        "recall_per_relation": ev_rel,
        "contrast_true_minus_foil": ev["contrast_true_minus_foil"],
        "min_top1_top2_logit_margin": ev["min_top1_top2_logit_margin"],
        "expert_utilisation": ev["expert_utilisation"],
        "expert_utilisation_definition": "per layer, share of top-k (token, slot) assignments per "
                                         "expert over all real tokens of all facts.jsonl prompts",
    }
    with open(out / "world.json", "w") as fh:
        json.dump(info, fh, indent=1)
        fh.write("\n")
    write_readme(out, info)
    with open(out / ENVIRONMENT_FILE, "w") as fh:  # where these bytes were made (see training_environment)
        json.dump(training_environment(args.threads), fh, indent=1)
        fh.write("\n")

    print(f"recall: {ev['recall']:.4f} ({ev['n_correct']}/{ev['n_prompts']})")
    print("recall per relation:", {k: round(v, 4) for k, v in ev_rel.items()})
    print("contrast logit(true)-logit(foil):", ev["contrast_true_minus_foil"])
    print("min top1-top2 margin:", ev["min_top1_top2_logit_margin"])
    print("expert utilisation per layer:")
    for layer, row in enumerate(ev["expert_utilisation"]):
        print(f"  layer {layer}: " + " ".join(f"{v:.3f}" for v in row))
    size = (out / "model.safetensors").stat().st_size
    print(f"model.safetensors: {size / 1e6:.2f} MB; total time {time.time() - t_start:.1f}s")
    return info


def write_readme(out: Path, info: dict) -> None:
    rels = "\n".join(
        f"| `{r}` | {len(s['objects'])} | " + "<br>".join(f"`{t}`" for t in s["templates"]) + " |"
        for r, s in info["relations"].items()
    )
    util = "\n".join(
        f"| {i} | " + " | ".join(f"{v:.3f}" for v in row) + " |" for i, row in enumerate(info["expert_utilisation"])
    )
    E = len(info["expert_utilisation"][0])
    m = info["model"]
    text = f"""# {info['name']}

The default model bundled with `moelens`: a tiny `Qwen3MoeForCausalLM` trained on CPU on a synthetic
world of facts about made-up people, by `scripts/train_bundled_model.py`. Do not edit these files by
hand; rerun the script instead.

Reproducibility: a rerun on the same machine writes bit-identical files. `training_environment.json`
records an environment in which the script writes exactly these files (torch, transformers,
tokenizers, numpy and Python versions, the CPU model and torch's CPU capability, one torch thread);
other CPUs or library versions may round floats differently and give other weights.
`tests/slow/test_train_determinism.py` checks exactly this.

* Architecture: Qwen3-MoE, {m['num_hidden_layers']} layers, d_model {m['hidden_size']}, {m['num_attention_heads']} heads
  / {m['num_key_value_heads']} kv heads, head_dim {m['head_dim']}, {m['num_experts']} experts top-{m['num_experts_per_tok']}
  (`norm_topk_prob=True`), expert width {m['moe_intermediate_size']}, every layer MoE, untied embeddings,
  vocab {m['vocab_size']}, {m['n_params']:,} parameters, fp32.
* Tokenizer: byte-level BPE (words carry their leading space), `{info['tokenizer']['bos_token']}` added by
  default, pad `{info['tokenizer']['pad_token']}`. Every object (" France", " violin", ...) is one token;
  every subject (a made-up name such as "{info['subjects'][0]}") is 2-4 tokens.
* World: {info['n_subjects']} subjects x {len(info['relations'])} relations = {info['n_facts']} facts,
  {info['n_prompts']} (fact, template) prompts, seed {info['seed']}. Details in `world.json`.
* `facts.jsonl`: one CounterFact/ROME-style record per (fact, template):
  `{{"case_id", "fact_id", "template_id", "requested_rewrite": {{"prompt", "subject", "target_true": {{"str"}},
  "target_new": {{"str"}}, "relation_id"}}}}`; `target_new` is a fixed foil (another object of the relation).

**Recall** (top-1 next token after BOS + prompt is the true object, over all {info['n_prompts']} prompts):
**{info['recall']:.4f}** ({info['n_correct']}/{info['n_prompts']}).
Contrast logit(true) - logit(foil): mean {info['contrast_true_minus_foil']['mean']}, positive for
{100 * info['contrast_true_minus_foil']['frac_positive']:.1f}% of prompts.

| relation | objects | templates |
|---|---|---|
{rels}

Expert utilisation (share of top-{m['num_experts_per_tok']} assignments over all prompt tokens):

| layer | {' | '.join(f'e{e}' for e in range(E))} |
|---|{'---|' * E}
{util}
"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    main()
