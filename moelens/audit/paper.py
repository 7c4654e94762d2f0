"""The audit paper's protocol, as its scripts compute it (``protocol="paper"``).

"From Observation to Intervention: A Causal Audit of Expert Importance in MoE Models" (arXiv
2606.10703), code ``callmeloui/observational_metrics`` at commit ``18bd31b5d091``. This module
recomputes what those scripts compute, quirks included, on any moelens model of the three
architectures the paper studied; each quirk is named in docs/audit.md ("The paper's protocol").
The per-model behaviour is selected by a *flavour*:

=============  =====================  ===========================================================
flavour        architecture           the paper's script
=============  =====================  ===========================================================
``olmoe``      ``OlmoeForCausalLM``   ``per_token_ablation_olmoe.py``, ``routing_weight_control_olmoe.py``
``deepseek``   ``DeepseekV2ForCausalLM``  ``per_token_ablation_deepseek.py``, ``routing_weight_control_deepseek.py``
``qwen``       ``Qwen2MoeForCausalLM``    ``validation_qwen.py``
=============  =====================  ===========================================================

What it reproduces, per flavour:

* **Corpus** (:func:`select_texts`, :func:`paper_tokenize`): rows whose stripped length exceeds
  50 characters, the first 100, unstripped; the tokenizer's own defaults
  (``add_special_tokens=True``), truncation at 512; ``olmoe``/``deepseek`` pad all texts together
  (``padding=True``, the tokenizer's padding side, pad = EOS when it has none) and run batches of
  4 / 2 rows; ``qwen`` and the routing-weight control use one unpadded sequence at a time (texts
  of at least 4 tokens).
* **Statistics** (:func:`paper_statistics`): ``olmoe`` on raw router logits over every padded row
  (utilisation = mean logit; "when active" = logit above the corpus-wide smallest 8th-largest
  logit); ``deepseek`` on the dense scatter of the top-k weights over every padded row;
  ``qwen`` slot share and mean softmax probability, norms on the first 30 texts, ``activation_std``
  the std of the first 32 output dims pooled. ``activation_norm``/``activation_std`` are the mean and
  unbiased std of the per-token L2 norms of the unweighted expert output (``olmoe``/``deepseek``).
* **Per-token ablation** (:func:`paper_per_token`): positions drawn as the scripts draw them
  (``olmoe``/``deepseek``: ``np.random.seed(seed)`` then ``np.random.choice(valid, 200,
  replace=False)`` per metric, re-seeded per layer; ``qwen``: one ``default_rng(seed)`` through all
  layers, a random text then a position in ``[1, len-2]``); top and bottom active expert by the
  metric (pandas / numpy ordering as coded, ties as coded); the expert removed over the **whole
  sequence** (``scope="sequence"``, ``semantics="zero"``, see :mod:`moelens.audit.ablation`);
  Delta CE at the position; Cohen's d with ddof 0 (``olmoe``/``deepseek``) or ddof 1 + 1e-9 (``qwen``).
* **Routing-weight control** (:func:`paper_weight_control`), **progressive ablation**
  (:func:`progressive_ablation`) and **redistribution** (:func:`redistribution`); the last two also
  from the command line, ``moelens audit --experiments`` (:mod:`moelens.audit.experiments`).

Differences that remain, all documented in docs/audit.md: cross-entropy is computed from fp32
logits; pad rows' activations follow moelens' masking of fully padded query rows (they enter
only the ``olmoe``/``deepseek`` statistics); redistribution is computed on aligned tokens (the
paper's token misalignment, §1.5 of the protocol document, is not reproduced).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import stats as st
from torch import Tensor

from moelens.audit.ablation import removal_hooks
from moelens.components.moe import combine_weights
from moelens.rundir import holds_run_dir

FLAVOURS = {"OlmoeForCausalLM": "olmoe", "DeepseekV2ForCausalLM": "deepseek", "Qwen2MoeForCausalLM": "qwen"}
PAPER_METRICS = ("utilization_rate", "activation_norm", "mean_routing_weight_when_active", "activation_std")
PAPER_LAYERS = {"olmoe": [0, 4, 7, 11, 15], "deepseek": [1, 7, 13, 20, 26], "qwen": [0, 6, 12, 18, 23]}
PAPER_DTYPES = {"olmoe": torch.float32, "deepseek": torch.float16, "qwen": torch.bfloat16}
PAPER_BATCH = {"olmoe": 4, "deepseek": 2, "qwen": 1}
PAPER_MODEL_NAMES = {"olmoe": "OLMoE", "deepseek": "DeepSeek", "qwen": "Qwen"}
PAPER_CHECKPOINTS = {"olmoe": "allenai/OLMoE-1B-7B-0924", "deepseek": "deepseek-ai/DeepSeek-V2-Lite",
                     "qwen": "Qwen/Qwen1.5-MoE-A2.7B"}


def paper_flavour(model, flavour: Optional[str] = None) -> str:
    """The paper's per-model behaviour for ``model`` (by architecture), or ``flavour`` if given."""
    if flavour is not None:
        if flavour not in PAPER_LAYERS:
            raise ValueError(f"unknown paper flavour {flavour!r}: choose one of {sorted(PAPER_LAYERS)}")
        return flavour
    arch = model.cfg.architecture
    if arch not in FLAVOURS:
        raise ValueError(
            f"the paper protocol exists for {', '.join(sorted(FLAVOURS))} (the paper's models); "
            f"this model is {arch}. Pass flavour='olmoe'|'deepseek'|'qwen' to apply one of their "
            f"definitions anyway, or use protocol='corrected'."
        )
    return FLAVOURS[arch]


def select_texts(texts: Sequence[str], min_chars: int = 50, n: Optional[int] = 100) -> list[str]:
    """The paper's corpus rows: ``[t for t in texts if len(t.strip()) > min_chars][:n]`` (unstripped)."""
    kept = [t for t in texts if len(t.strip()) > min_chars]
    return kept if n is None else kept[:n]


@dataclass
class PaperCorpus:
    """The paper's tokenised corpus: padded batches (``olmoe``/``deepseek`` statistics and per-token
    ablation) and unpadded samples (``qwen``, the controls)."""

    flavour: str
    pad_token_id: int
    batches: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (ids [B, S], mask [B, S])
    texts: list[Tensor] = field(default_factory=list)  # every text, unpadded, [n]
    samples: list[Tensor] = field(default_factory=list)  # texts of >= 4 tokens, unpadded, [n]

    @property
    def rows(self) -> list[tuple[int, int]]:
        """``(batch, row)`` for every padded row, in the scripts' order."""
        return [(b, r) for b, (ids, _) in enumerate(self.batches) for r in range(ids.shape[0])]


def paper_tokenize(model, texts: Sequence[str], flavour: str, *, max_length: int = 512,
                   batch_size: Optional[int] = None, add_special_tokens: bool = True) -> PaperCorpus:
    """Tokenise ``texts`` as the paper's scripts do (see the module docstring)."""
    if not texts:
        raise ValueError("the corpus is empty: no text passed the paper's filter (rows over 50 characters)")
    tok = model.tokenizer
    if tok is None:
        raise ValueError("the paper protocol tokenises text with the checkpoint's tokenizer; this model has none")
    tok = copy.deepcopy(tok)  # the scripts set pad = eos on their tokenizer; keep the user's untouched
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    corpus = PaperCorpus(flavour=flavour, pad_token_id=int(pad))
    for t in texts:
        ids = torch.tensor(tok(t, truncation=True, max_length=max_length,
                               add_special_tokens=add_special_tokens)["input_ids"], dtype=torch.long)
        corpus.texts.append(ids)
        if ids.numel() >= 4:
            corpus.samples.append(ids)
    if flavour != "qwen":
        enc = tok(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                  add_special_tokens=add_special_tokens)
        bs = batch_size or PAPER_BATCH[flavour]
        for i in range(0, len(texts), bs):
            corpus.batches.append((enc["input_ids"][i:i + bs].long(), enc["attention_mask"][i:i + bs].long()))
    return corpus


# ------------------------------------------------------------------------------------------ routing
def _capture(model, ids: Tensor, mask: Optional[Tensor], layer: int, outputs: bool = False) -> dict:
    pre = f"blocks.{layer}.mlp."
    names = [pre + "hook_router_logits", pre + "hook_router_scores", pre + "hook_expert_indices",
             pre + "hook_expert_weights"] + ([pre + "hook_expert_out"] if outputs else [])
    device = model.W_E.device
    kwargs = {} if mask is None else {"attention_mask": mask.to(device)}
    with torch.no_grad():
        _, cache = model.run_with_cache(ids.to(device), names_filter=names, return_cache_object=False, **kwargs)
    out = {k.removeprefix(pre + "hook_"): v for k, v in cache.items()}
    if outputs:
        out["out_norm"] = out["expert_out"].float().norm(dim=-1)
    return out


def _metric_row(e: int, norms: Tensor) -> dict:
    if norms.numel() == 0:
        return {"activation_norm": 0.0, "activation_std": 0.0}
    return {"activation_norm": float(norms.mean()), "activation_std": float(norms.std())}  # unbiased, as torch


def paper_statistics(model, corpus: PaperCorpus, layer: int) -> pd.DataFrame:
    """The four tested metrics per expert at ``layer``, as the flavour's script computes them.

    Returns a frame with ``expert_id`` and the columns of :data:`PAPER_METRICS` (plus ``n_routed``).
    """
    E, k = model.cfg.n_experts, model.cfg.top_k
    if corpus.flavour == "qwen":
        return _qwen_statistics(model, corpus, layer)
    logits, dense, idx, norms = [], [], [], []
    for ids, mask in corpus.batches:
        c = _capture(model, ids, mask, layer, outputs=True)
        logits.append(c["router_logits"].float().reshape(-1, E).cpu())
        i = c["expert_indices"].reshape(-1, k).cpu()
        w = c["expert_weights"].float().reshape(-1, k).cpu()
        dense.append(torch.zeros(i.shape[0], E).scatter_(1, i, w))
        idx.append(i)
        norms.append(c["out_norm"].reshape(-1, k).cpu())
    R_logit, R_dense = torch.cat(logits).double(), torch.cat(dense).double()
    idx, norms = torch.cat(idx), torch.cat(norms)
    rows = []
    if corpus.flavour == "olmoe":
        # the 8th-largest logit of each row; the script ORs `R[:, e] >= thr_t` over every row t,
        # i.e. one corpus-wide threshold: the smallest of them
        threshold = R_logit.sort(dim=-1).values[:, -k].min()
    for e in range(E):
        hit = idx == e
        row = {"expert_id": e, "n_routed": int(hit.sum())}
        if corpus.flavour == "olmoe":
            col = R_logit[:, e]
            active = col[col >= threshold]
            row["utilization_rate"] = float(col.mean())
            row["mean_routing_weight_when_active"] = float(active.mean()) if active.numel() else 0.0
        else:
            col = R_dense[:, e]
            row["utilization_rate"] = float((col > 0).double().mean())
            active = col[col > 0]
            row["mean_routing_weight_when_active"] = float(active.mean()) if active.numel() else 0.0
        row.update(_metric_row(e, norms[hit]))
        rows.append(row)
    return pd.DataFrame(rows)


def _qwen_statistics(model, corpus: PaperCorpus, layer: int, n_output_texts: int = 30, n_dims: int = 32) -> pd.DataFrame:
    E = model.cfg.n_experts
    counts = np.zeros(E)
    prob_sum, prob_n = np.zeros(E), np.zeros(E)
    norms: list[list[float]] = [[] for _ in range(E)]
    elems: list[list[np.ndarray]] = [[] for _ in range(E)]
    for t, ids in enumerate(corpus.texts):
        c = _capture(model, ids[None], None, layer, outputs=t < n_output_texts)
        i = c["expert_indices"][0].cpu()
        p = c["router_scores"][0].float().gather(-1, c["expert_indices"][0]).cpu()
        for e, pe in zip(i.reshape(-1).tolist(), p.reshape(-1).tolist()):
            counts[e] += 1
            prob_sum[e] += pe
            prob_n[e] += 1
        if t < n_output_texts:
            out = c["expert_out"][0].float().cpu()
            on = c["out_norm"][0].cpu()
            for (pos, s), e in np.ndenumerate(i.numpy()):
                norms[e].append(float(on[pos, s]))
                elems[e].append(out[pos, s, :n_dims].numpy())
    total = counts.sum()
    rows = []
    for e in range(E):
        rows.append({
            "expert_id": e, "n_routed": int(counts[e]),
            "utilization_rate": counts[e] / total if total else 0.0,
            "mean_routing_weight_when_active": prob_sum[e] / prob_n[e] if prob_n[e] else 0.0,
            "activation_norm": float(np.mean(norms[e])) if norms[e] else 0.0,
            "activation_std": float(np.std(np.concatenate(elems[e]))) if elems[e] else 0.0,
        })
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ effects
def _ce_at(logits: Tensor, ids: Tensor, positions: Tensor) -> Tensor:
    """Cross-entropy (fp32) of predicting ``ids[p + 1]`` from ``logits[row, p]``, per row."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    lp = logits[rows, positions.to(logits.device)].float().log_softmax(-1)
    return -lp.gather(-1, ids.to(logits.device)[positions + 1][:, None].to(logits.device))[:, 0]


@torch.no_grad()
def removal_ce(model, ids: Tensor, mask: Optional[Tensor], layer: int, experts: Sequence, positions: Sequence[int],
               *, scope: str = "sequence", semantics: str = "zero", max_batch: int = 32) -> np.ndarray:
    """Cross-entropy at ``positions[r]`` of one sequence with ``experts[r]`` removed (``-1``:
    none, the clean loss), one row per request, batched ``max_batch`` rows per forward."""
    ids = ids.reshape(-1)
    out = []
    device = model.W_E.device
    for s in range(0, len(experts), max_batch):
        ex, ps = list(experts[s:s + max_batch]), torch.as_tensor(list(positions[s:s + max_batch]))
        rows = len(ex)
        hooks = removal_hooks(model, layer, ex, ps, scope=scope, semantics=semantics)
        kwargs = {} if mask is None else {"attention_mask": mask.reshape(1, -1).expand(rows, -1).to(device)}
        logits = model.run_with_hooks(ids[None].expand(rows, -1).to(device), fwd_hooks=hooks, **kwargs)
        out.append(_ce_at(logits, ids, ps).cpu())
    return torch.cat(out).double().numpy()


def cohens_d(diffs: np.ndarray, flavour: str) -> float:
    """Cohen's d as the flavour's script computes it: ``mean / std(ddof=0)`` (0 when the std is 0)
    for ``olmoe``/``deepseek``; ``mean / (std(ddof=1) + 1e-9)`` for ``qwen`` and the controls."""
    diffs = np.asarray(diffs, dtype=float)
    if flavour in ("olmoe", "deepseek"):
        sd = diffs.std()
        return float(diffs.mean() / sd) if sd > 0 else 0.0
    return float(diffs.mean() / (np.std(diffs, ddof=1) + 1e-9))


def _pair_stats(high: np.ndarray, low: np.ndarray, flavour: str) -> dict:
    high, low = np.asarray(high, float), np.asarray(low, float)
    diffs = high - low
    out = {"n": len(diffs), "mean_high": float(high.mean()) if len(high) else np.nan,
           "mean_low": float(low.mean()) if len(low) else np.nan}
    if len(diffs) < 2:
        return {**out, "mean_diff": float(diffs.mean()) if len(diffs) else np.nan, "d": np.nan, "p_t": np.nan,
                "p_w": np.nan, "median_diff": np.nan, "pct_high": np.nan}
    _, p_t = st.ttest_rel(high, low)
    if flavour in ("olmoe", "deepseek"):
        try:
            _, p_w = st.wilcoxon(high, low)
        except ValueError:
            p_w = 1.0
    else:
        try:
            _, p_w = st.wilcoxon(diffs, zero_method="wilcox", alternative="two-sided")
        except ValueError:
            p_w = np.nan
    return {**out, "mean_diff": float(diffs.mean()), "d": cohens_d(diffs, flavour), "p_t": float(p_t),
            "p_w": float(p_w), "median_diff": float(np.median(diffs)), "pct_high": float((diffs > 0).mean() * 100)}


def _valid_positions(corpus: PaperCorpus, model, layer: int) -> tuple[list, dict]:
    """The scripts' global token indices over padded rows that may be tested, and the routing
    (active expert sets) of each padded row at ``layer``."""
    valid, active = [], {}
    g = 0
    for b, (ids, mask) in enumerate(corpus.batches):
        c = _capture(model, ids, mask, layer)
        idx = c["expert_indices"].cpu()
        S = ids.shape[1]
        for r in range(ids.shape[0]):
            active[(b, r)] = idx[r]
            for s in range(S):
                if s < S - 1 and mask[r, s] != 0 and int(ids[r, s + 1]) != corpus.pad_token_id \
                        and len(set(idx[r, s].tolist())) >= 2:
                    valid.append((g, b, r, s))
                g += 1
    return valid, active


def paper_per_token(model, corpus: PaperCorpus, layer: int, stats: pd.DataFrame, *, n_tests: int = 200,
                    seed: int = 42, metrics: Sequence[str] = PAPER_METRICS, rng: Optional[np.random.Generator] = None,
                    max_batch: int = 32, progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-token ablation at one layer as the flavour's script runs it. Returns ``(summary, pairs)``:
    one summary row per metric (``n, mean_diff, d, p_t, p_w, median_diff, pct_high, base,
    uniq_top, uniq_bot``) and one row per tested pair. ``qwen`` draws from ``rng`` (pass the same
    generator through layers, as the script does); the others re-seed ``numpy`` with ``seed``."""
    pairs = []
    if corpus.flavour == "qwen":
        rng = rng if rng is not None else np.random.default_rng(seed)
        for metric in metrics:
            pairs += _qwen_pairs(model, corpus, layer, stats, metric, rng, n_tests, max_batch)
    else:
        valid, active = _valid_positions(corpus, model, layer)
        rs = np.random.RandomState(seed)  # == np.random.seed(seed) then np.random.choice
        for metric in metrics:
            if not valid:
                break
            chosen = rs.choice(len(valid), size=min(n_tests, len(valid)), replace=False)
            for j in chosen:
                g, b, r, s = valid[j]
                act = set(active[(b, r)][s].tolist())
                ranked = stats[stats["expert_id"].isin(list(act))].sort_values(metric, ascending=False)
                if len(ranked) < 2:
                    continue
                pairs.append({"metric": metric, "layer": layer, "batch": b, "row": r, "position": s, "global_idx": g,
                              "high_expert": int(ranked.iloc[0]["expert_id"]), "low_expert": int(ranked.iloc[-1]["expert_id"])})
        # the effects, batched per padded row (three forwards per pair in the scripts)
        by_row: dict = {}
        for i, p in enumerate(pairs):
            by_row.setdefault((p["batch"], p["row"]), []).append(i)
        for (b, r), members in by_row.items():
            ids, mask = corpus.batches[b][0][r], corpus.batches[b][1][r]
            ex, ps = [], []
            for i in members:
                p = pairs[i]
                ex += [-1, p["high_expert"], p["low_expert"]]
                ps += [p["position"]] * 3
            ce = removal_ce(model, ids, mask, layer, ex, ps, max_batch=max_batch)
            for j, i in enumerate(members):
                base, hi, lo = ce[3 * j: 3 * j + 3]
                pairs[i].update(baseline_loss=base, high_delta=hi - base, low_delta=lo - base)
    frame = pd.DataFrame(pairs)
    rows = []
    for metric in metrics:
        sub = frame[frame["metric"] == metric] if len(frame) else frame
        s = _pair_stats(sub["high_delta"] if len(sub) else [], sub["low_delta"] if len(sub) else [], corpus.flavour)
        s.update(metric=metric, layer=layer, base=float(sub["baseline_loss"].mean()) if len(sub) else np.nan,
                 uniq_top=int(sub["high_expert"].nunique()) if len(sub) else 0,
                 uniq_bot=int(sub["low_expert"].nunique()) if len(sub) else 0)
        rows.append(s)
    return pd.DataFrame(rows), frame


def _sample_routing(model, corpus: PaperCorpus, layer: int, cache: dict, si: int) -> dict:
    if si not in cache:
        c = _capture(model, corpus.samples[si][None], None, layer)
        cache[si] = {"idx": c["expert_indices"][0].cpu(), "w": c["expert_weights"][0].float().cpu(),
                     "p": c["router_scores"][0].float().gather(-1, c["expert_indices"][0]).cpu()}
    return cache[si]


def _draws(corpus: PaperCorpus, rng: np.random.Generator, n_tests: int, choice: bool = False):
    """``(sample, position)`` draws as the unpadded scripts make them, lazily (the caller stops once
    it has ``n_tests`` pairs; at most ``10 n_tests`` attempts): a uniform sample, then a position in
    ``[1, len - 2]`` by ``rng.integers`` (``validation_qwen.py``) or ``rng.choice`` over that range
    (the OLMoE/DeepSeek control scripts)."""
    for _ in range(n_tests * 10):
        si = int(rng.integers(0, len(corpus.samples)))
        n = corpus.samples[si].numel()
        if n < 3:
            continue
        yield si, int(rng.choice(list(range(1, n - 1)))) if choice else int(rng.integers(1, n - 1))


def _qwen_pairs(model, corpus, layer, stats, metric, rng, n_tests, max_batch) -> list[dict]:
    score = dict(zip(stats["expert_id"].astype(int), stats[metric]))
    cache: dict = {}
    pairs = []
    for si, pos in _draws(corpus, rng, n_tests):
        routing = _sample_routing(model, corpus, layer, cache, si)
        active = routing["idx"][pos].numpy()
        scores = np.array([score.get(int(e), 0.0) for e in active])
        order = np.argsort(scores)[::-1]
        hi, lo = int(active[order[0]]), int(active[order[-1]])
        if hi == lo:
            continue
        base, h, l = removal_ce(model, corpus.samples[si], None, layer, [-1, hi, lo], [pos] * 3, max_batch=max_batch)
        pairs.append({"metric": metric, "layer": layer, "sample": si, "position": pos, "high_expert": hi,
                      "low_expert": lo, "baseline_loss": base, "high_delta": h - base, "low_delta": l - base})
        if len(pairs) >= n_tests:
            break
    return pairs


def paper_weight_control(model, corpus: PaperCorpus, layer: int, rng: np.random.Generator, *, n_tests: int = 200,
                         max_batch: int = 32) -> tuple[dict, pd.DataFrame]:
    """The routing-weight control at one layer: highest vs lowest per-token weight among the
    active experts, removed sequence-wide; d (ddof 1 + 1e-9), paired t, Wilcoxon and Spearman
    rho(weight ratio, diff). Weights: the softmax probability (``olmoe``, ``qwen``) or the gate's
    top-k weight (``deepseek``, which skips pairs whose weights differ by < 1e-6)."""
    cache: dict = {}
    pairs = []
    for si, pos in _draws(corpus, rng, n_tests, choice=corpus.flavour != "qwen"):
        routing = _sample_routing(model, corpus, layer, cache, si)
        experts = routing["idx"][pos].numpy()
        weights = (routing["w"] if corpus.flavour == "deepseek" else routing["p"])[pos].numpy()
        if len(experts) < 2:
            continue
        order = np.argsort(weights)[::-1]
        hi, lo = int(experts[order[0]]), int(experts[order[-1]])
        w_hi, w_lo = float(weights[order[0]]), float(weights[order[-1]])
        if corpus.flavour == "deepseek" and abs(w_hi - w_lo) < 1e-6:
            continue
        base, h, l = removal_ce(model, corpus.samples[si], None, layer, [-1, hi, lo], [pos] * 3, max_batch=max_batch)
        pairs.append({"layer": layer, "sample": si, "position": pos, "high_expert": hi, "low_expert": lo,
                      "high_weight": w_hi, "low_weight": w_lo, "weight_ratio": w_hi / (w_lo + 1e-9),
                      "baseline_loss": base, "high_delta": h - base, "low_delta": l - base})
        if len(pairs) >= n_tests:
            break
    frame = pd.DataFrame(pairs)
    s = _pair_stats(frame["high_delta"] if len(frame) else [], frame["low_delta"] if len(frame) else [], "qwen")
    rho = st.spearmanr(frame["weight_ratio"], frame["high_delta"] - frame["low_delta"]) if len(frame) > 2 else (np.nan, np.nan)
    s.update(layer=layer, metric="routing_weight_control", spearman_rho=float(rho[0]), spearman_p=float(rho[1]))
    return s, frame


def _rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def _frame_records(df: pd.DataFrame) -> list[dict]:
    import json

    return json.loads(df.to_json(orient="records")) if len(df) else []


@holds_run_dir("audit")
def run_paper_protocol(model, texts: Sequence[str], *, layers: Optional[Sequence[int]] = None,
                       flavour: Optional[str] = None, n_tests: int = 200, seed: int = 42, filter_texts: bool = True,
                       control: bool = True, max_batch: int = 32, progress: bool = True, out_dir=None,
                       add_special_tokens: bool = True) -> dict:
    """The paper's per-token ablation table (and routing-weight control) for one model.

    ``texts``: raw corpus rows (e.g. WikiText-2 raw test, see :func:`load_rows`); with
    ``filter_texts`` the paper's selection (stripped length > 50, first 100) is applied. ``layers``
    default to the paper's layers for the flavour. With ``out_dir`` the run is resumable layer by
    layer: ``settings.json`` (model and corpus fingerprints and every setting; a rerun with other
    settings raises :class:`~moelens.audit.run.AuditSettingsError` naming what differs),
    ``layer_{l}.json`` / ``control_{l}.json`` per finished layer (with the RNG state, so a resumed
    run draws what an uninterrupted one would), and at the end ``summary.csv``, ``pairs.csv``,
    ``stats.csv``, ``control.csv``. Returns ``{"summary", "pairs", "stats", "control",
    "control_pairs", "settings"}``."""
    import json
    from pathlib import Path

    from moelens.audit.run import _check_settings, _model_fingerprint, _write_json

    flavour = paper_flavour(model, flavour)
    layers = list(PAPER_LAYERS[flavour] if layers is None else layers)
    bad = [l for l in layers if l not in model.cfg.moe_layers]
    if bad:
        raise ValueError(f"layers {bad} are not sparse layers of this model (sparse: {model.cfg.moe_layers})")
    if n_tests < 1:
        raise ValueError(f"n_tests must be positive, got {n_tests}")
    if filter_texts:
        texts = select_texts(texts)
    corpus = paper_tokenize(model, texts, flavour, add_special_tokens=add_special_tokens)
    import hashlib

    settings = {"protocol": "paper", "flavour": flavour, "layers": layers, "n_tests": n_tests, "seed": seed,
                "control": control, "filter_texts": filter_texts,
                "add_special_tokens": add_special_tokens, "dtype": str(model.cfg.dtype),
                "model": _model_fingerprint(model),
                "corpus_sha256": hashlib.sha256("\x00".join(texts).encode()).hexdigest(), "n_texts": len(texts)}
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _check_settings(out, settings, {"model": getattr(model, "name_or_path", None)})

    def saved(kind: str, layer: int) -> Optional[dict]:
        path = out / f"{kind}_{layer}.json" if out is not None else None
        return json.loads(path.read_text()) if path is not None and path.is_file() else None

    def save(kind: str, layer: int, obj: dict) -> None:
        if out is not None:
            _write_json(out / f"{kind}_{layer}.json", obj)

    summaries, pairs, all_stats, ctrl, ctrl_pairs = [], [], [], [], []
    main_rng = np.random.default_rng(seed)
    ctrl_rng = main_rng if flavour == "qwen" else np.random.default_rng(seed)
    bar = layers
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(layers, desc="paper protocol", unit="layer")

    def run_control(layer):
        rec = saved("control", layer) if control else None
        if rec is None:
            c, cp = paper_weight_control(model, corpus, layer, ctrl_rng, n_tests=n_tests, max_batch=max_batch)
            rec = {"summary": c, "pairs": _frame_records(cp), "rng": _rng_state(ctrl_rng)}
            save("control", layer, rec)
        else:
            ctrl_rng.bit_generator.state = rec["rng"]
        ctrl.append(rec["summary"])
        ctrl_pairs.append(pd.DataFrame(rec["pairs"]))

    for layer in bar:
        rec = saved("layer", layer)
        if rec is None:
            stats = paper_statistics(model, corpus, layer)
            s, p = paper_per_token(model, corpus, layer, stats, n_tests=n_tests, seed=seed, rng=main_rng,
                                   max_batch=max_batch)
            rec = {"summary": _frame_records(s), "pairs": _frame_records(p), "stats": _frame_records(stats),
                   "rng": _rng_state(main_rng)}
            save("layer", layer, rec)
        else:
            main_rng.bit_generator.state = rec["rng"]
        stats = pd.DataFrame(rec["stats"])
        stats.insert(0, "layer", layer)
        all_stats.append(stats)
        summaries.append(pd.DataFrame(rec["summary"]))
        pairs.append(pd.DataFrame(rec["pairs"]))
        if control and flavour == "qwen":  # the Qwen script interleaves the control with the same RNG
            run_control(layer)
    if control and flavour != "qwen":  # separate scripts: one RNG through the layers
        for layer in layers:
            run_control(layer)
    summary = pd.concat(summaries, ignore_index=True)
    summary.insert(0, "model", PAPER_MODEL_NAMES[flavour])
    result = {
        "summary": summary,
        "pairs": pd.concat(pairs, ignore_index=True),
        "stats": pd.concat(all_stats, ignore_index=True),
        "control": pd.DataFrame(ctrl),
        "control_pairs": pd.concat(ctrl_pairs, ignore_index=True) if ctrl_pairs else pd.DataFrame(),
        "settings": settings,
    }
    if out is not None:
        for key in ("summary", "pairs", "stats", "control"):
            result[key].to_csv(out / f"{key}.csv", index=False)
    return result


# ------------------------------------------------------------------------------------------ the other experiments
def progressive_positions(model, texts: Sequence[str], *, n_positions: int = 500, seed: int = 42,
                          min_chars: int = 100, max_length: int = 256, min_context: int = 32) -> list[tuple[Tensor, int]]:
    """The progressive-ablation positions: rows of > ``min_chars`` characters shuffled with
    ``random.Random(seed)``, at most ``max_length`` tokens, one target per document drawn with the
    same generator in ``[min_context, len - 1]``. Returns ``(tokens, target)`` pairs."""
    rnd = random.Random(seed)
    pool = [t for t in texts if len(t.strip()) > min_chars]
    rnd.shuffle(pool)
    out = []
    for t in pool:
        if len(out) >= n_positions:
            break
        ids = torch.tensor(model.tokenizer(t, truncation=True, max_length=max_length)["input_ids"], dtype=torch.long)
        if ids.numel() < min_context + 1:
            continue
        out.append((ids, rnd.randint(min_context, ids.numel() - 1)))
    return out


@torch.no_grad()
def progressive_ablation(model, positions: Sequence[tuple[Tensor, int]], layers: Sequence[int], *, k_max: Optional[int] = None,
                         cliff: float = 0.1, semantics: str = "zero", scope: str = "sequence",
                         max_batch: int = 32) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cumulative removal of the top-1..k experts by routing weight at the position predicting
    each target (the paper: OLMoE, k = 1..7 of 8, sequence-wide zeroing). Returns ``(summary,
    steps)``: per layer x k the mean, std, median, p25/p75/p95 of Delta CE, % positive, mean share of
    routing weight removed and ``cliff`` (the first k whose mean Delta exceeds ``cliff`` nats, per
    layer); and one row per (position, layer, k)."""
    k_max = k_max or model.cfg.top_k - 1
    steps = []
    for layer in layers:
        for i, (ids, target) in enumerate(positions):
            p = target - 1
            c = _capture(model, ids[None], None, layer)
            w = c["router_scores"][0, p].float().gather(-1, c["expert_indices"][0, p]).cpu()
            w = w / (w.sum() + 1e-9)
            order = torch.argsort(w, descending=True)
            experts = c["expert_indices"][0, p].cpu()[order].tolist()
            wsorted = w[order].tolist()
            rows = [[-1] * k_max] + [experts[:k] + [-1] * (k_max - k) for k in range(1, k_max + 1)]
            ce = removal_ce(model, ids, None, layer, rows, [p] * len(rows), scope=scope, semantics=semantics,
                            max_batch=max_batch)
            for k in range(1, k_max + 1):
                steps.append({"layer": layer, "position_index": i, "target": target, "k": k,
                              "delta": ce[k] - ce[0], "baseline_loss": ce[0], "weight_removed": sum(wsorted[:k])})
    return progressive_summary(pd.DataFrame(steps), cliff=cliff), pd.DataFrame(steps)


def progressive_summary(frame: pd.DataFrame, *, cliff: float = 0.1) -> pd.DataFrame:
    """The per (layer, k) summary of :func:`progressive_ablation`'s ``steps`` frame (see there)."""
    agg = frame.groupby(["layer", "k"])["delta"]
    summary = pd.DataFrame({
        "mean": agg.mean(), "std": agg.std(), "median": agg.median(), "p25": agg.quantile(0.25),
        "p75": agg.quantile(0.75), "p95": agg.quantile(0.95), "pct_positive": agg.apply(lambda d: (d > 0).mean() * 100),
        "weight_removed": frame.groupby(["layer", "k"])["weight_removed"].mean(),
    }).reset_index()
    cliffs = {}
    for layer, sub in summary.groupby("layer"):
        over = sub[sub["mean"] > cliff]
        cliffs[layer] = int(over["k"].min()) if len(over) else None
    summary["cliff"] = summary["layer"].map(cliffs)
    return summary


@torch.no_grad()
def redistribution(model, texts: Sequence[str], layer: int, *, max_length: int = 256, min_chars: int = 100,
                   n_texts: int = 200) -> tuple[pd.DataFrame, dict]:
    """Per-expert redistribution at ``layer`` (the paper's redistribution scripts), on aligned
    tokens: over the tokens where expert ``e`` is in the top-k, the removal gap
    ``base - ablated`` of the MoE block output (exactly ``e``'s weighted contribution, since the
    router at the layer is feed-forward: tested against a second forward), the compensation cosine
    ``cos(gap, ablated)``, the relative compensation ``|ablated| max(cos, 0) / |gap|``, the mean
    softmax probability of ``e`` and its token coverage; and the Spearman correlations across
    experts the paper reports."""
    texts = [t for t in texts if len(t.strip()) > min_chars][:n_texts]
    E = model.cfg.n_experts
    acc = {k: np.zeros(E) for k in ("rw", "n", "gap", "cos", "rel")}
    n_tokens = 0
    pre = f"blocks.{layer}.mlp."
    names = [pre + "hook_router_scores", pre + "hook_expert_indices", pre + "hook_expert_weights", pre + "hook_expert_out",
             f"blocks.{layer}.hook_mlp_out"]
    for t in texts:
        ids = torch.tensor(model.tokenizer(t, truncation=True, max_length=max_length)["input_ids"], dtype=torch.long)
        _, c = model.run_with_cache(ids[None].to(model.W_E.device), names_filter=names, return_cache_object=False)
        idx = c[pre + "hook_expert_indices"][0]
        contrib = c[pre + "hook_expert_out"][0].float() * combine_weights(
            model.cfg, c[pre + "hook_expert_weights"][0].float())[..., None]
        base = c[f"blocks.{layer}.hook_mlp_out"][0].float()
        probs = c[pre + "hook_router_scores"][0].float()
        n_tokens += ids.numel()
        for (pos, s), e in np.ndenumerate(idx.cpu().numpy()):
            gap = contrib[pos, s]
            abl = base[pos] - gap
            gn = float(gap.norm())
            cos = float(F.cosine_similarity(gap, abl, dim=0))
            acc["rw"][e] += float(probs[pos, e])
            acc["n"][e] += 1
            acc["gap"][e] += gn
            acc["cos"][e] += cos
            acc["rel"][e] += float(abl.norm()) * max(cos, 0.0) / gn if gn > 0 else 0.0
    n = np.where(acc["n"] > 0, acc["n"], np.nan)
    frame = pd.DataFrame({"expert": range(E), "mean_routing_weight": acc["rw"] / n, "token_coverage": acc["n"] / max(n_tokens, 1),
                          "mean_gap_norm": acc["gap"] / n, "compensation_cosine": acc["cos"] / n,
                          "relative_compensation": acc["rel"] / n})
    ok = frame.dropna()

    def rho(a, b):
        r = st.spearmanr(ok[a], ok[b]) if len(ok) > 2 else (np.nan, np.nan)
        return {"rho": float(r[0]), "p": float(r[1])}

    corr = {"rw_gap": rho("mean_routing_weight", "mean_gap_norm"),
            "gap_relcomp": rho("mean_gap_norm", "relative_compensation"),
            "rw_relcomp": rho("mean_routing_weight", "relative_compensation"),
            "cos_gap": rho("compensation_cosine", "mean_gap_norm")}
    return frame, corr


# ------------------------------------------------------------------------------------------ corpus rows and runs
def load_rows(source, *, split: str = "test", text_field: str = "text") -> list[str]:
    """Raw corpus rows, unstripped, in order (what the paper's scripts iterate over): a ``.jsonl``
    file (``text_field`` of each record), a text file (one row per line, line ends kept, as
    WikiText-2 raw rows are), a list of strings, or a Hugging Face dataset ``NAME[:CONFIG]`` /
    saved directory (``split``, default ``test``; e.g. ``wikitext:wikitext-2-raw-v1``)."""
    import json
    from pathlib import Path

    from moelens.audit.corpus import _dataset_texts, load_dataset_source

    if isinstance(source, (list, tuple)):
        return [str(s) for s in source]
    path = Path(str(source)).expanduser()
    if path.is_file():
        if path.suffix == ".jsonl":
            rows = []
            for i, line in enumerate(path.read_text().splitlines()):
                if line.strip():
                    rec = json.loads(line)
                    if text_field not in rec:
                        raise KeyError(f"{path}:{i + 1}: no field {text_field!r} (fields: {sorted(rec)}); pass --text-field")
                    rows.append(rec[text_field])
            return rows
        return path.read_text().splitlines(keepends=True)
    return list(_dataset_texts(load_dataset_source(str(source), split), split, text_field))


def verify_against_transformers(model, directory, texts: Sequence[str], *, n_texts: int = 2, atol: Optional[float] = None) -> list[dict]:
    """The paper's first verification check, against transformers itself: the mean next-token
    loss of the first ``n_texts`` texts (tokenizer defaults) from moelens equals transformers'
    ``labels`` loss on the same checkpoint (tolerance 1e-4 in fp32, 1e-2 in half precision).
    Raises ``RuntimeError`` naming the text and both losses on a mismatch."""
    from transformers import AutoModelForCausalLM

    dtype = model.cfg.dtype
    atol = atol if atol is not None else (1e-4 if dtype == torch.float32 else 1e-2)
    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype).to(model.W_E.device).eval()
    out = []
    for t in list(texts)[:n_texts]:
        ids = torch.tensor(model.tokenizer(t, truncation=True, max_length=512)["input_ids"])[None].to(model.W_E.device)
        with torch.no_grad():
            ours = float(model(ids, return_type="loss"))
            theirs = float(hf(input_ids=ids, labels=ids).loss)
        out.append({"text": t[:60], "moelens": ours, "transformers": theirs})
        if abs(ours - theirs) > atol:
            raise RuntimeError(f"verification failed on {t[:40]!r}: moelens loss {ours:.6f}, transformers {theirs:.6f} "
                               f"(tolerance {atol})")
    del hf
    return out
