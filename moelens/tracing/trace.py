"""Expert-aware causal tracing built from the generic patching primitives.

Protocol (contract): the subject tokens' embeddings get ``sigma * z`` added, ``z ~ N(0, 1)`` of
shape ``[n_samples, n_subject_tokens, d_model]``, ``sigma = noise_scale * std(W_E)`` by default.
The metric is the true-vs-foil logit contrast at the last position (the true target's probability
when a case has no foil). Scores are averaged over the noise samples.

* :func:`trace_layers`: restore the clean ``hook_mlp_out`` (or ``resid``: ``hook_resid_post``,
  ``attn``: ``hook_attn_out``) at one (layer, position) of the corrupted run -> ``[n_layers, n_positions]``.
  ``direction="necessity"`` patches the corrupted activation into the clean run instead.
* :func:`trace_experts`: add ``delta_e = c_e(clean) - c_e(corrupted)`` to the MoE output at the last
  position (or given positions) for each expert -> ``[n_experts]``.
* :func:`trace_coalitions`: the clean-routed set, the clean-or-noise-routed union, and a greedy
  search for the smallest set recovering a fraction of the layer's rescue.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from moelens import patching as P
from moelens.formatting import format_number
from moelens.tracing.cases import FactCase, TokenizedCase, tokenize_case
from moelens.tracing.engine import KIND_HOOKS, BaseRun, SuffixEngine, base_names_filter, corrupted_run_with_gradients

_EXPERT_HOOKS = ("hook_expert_indices", "hook_expert_weights", "hook_expert_out", "hook_router_scores",
                 "hook_routed_out", "hook_shared_out")


def tracing_names_filter(name: str) -> bool:
    """What tracing caches from the clean and corrupted runs: residuals, block outputs, post-RoPE
    keys/values and the expert hooks (never attention patterns, so SDPA numerics are kept)."""
    return base_names_filter(name) or name.endswith(_EXPERT_HOOKS)

PositionSpec = Union[str, int, Sequence[int]]


# ---------------------------------------------------------------------------------- setup
@dataclass
class TraceSetup:
    """Everything a tracing entry point needs for one case, computed once."""

    case: FactCase
    tokenized: TokenizedCase
    tokens: Tensor  # [1, pos]
    noise: Tensor  # [n_samples, n_subject, d_model], already scaled by sigma
    sigma: float
    clean: float
    corrupted: float
    clean_cache: Any
    corrupted_cache: Any  # batch n_samples
    settings: dict
    _slots: dict = field(default_factory=dict, repr=False, compare=False)  # memo of _slots_at per layer/positions
    gradients: Optional[dict] = field(default=None, repr=False, compare=False)  # prepare(..., gradients=kinds)
    # the metric of each corrupted run ``[n_samples]`` (their mean is ``corrupted``): the value of any
    # row whose patch is zero, which the sweeps then do not run (None: every row is run)
    corrupted_samples: Optional[Tensor] = field(default=None, repr=False, compare=False)
    # the weights' state when the runs were made (weights_state): a sweep on edited weights would mix
    # the cached runs of the old model with suffixes of the new one
    weights: Optional[int] = field(default=None, repr=False, compare=False)

    @property
    def metric(self):
        tc = self.tokenized
        if tc.target_foil_id is None:
            return P.prob(tc.target_true_id)
        return P.logit_diff(tc.target_true_id, tc.target_foil_id)

    def corrupt(self) -> P.Corrupt:
        return P.Corrupt(positions=self.tokenized.subject_positions, noise=self.noise)

    @property
    def n_samples(self) -> int:
        return self.noise.shape[0]

    def engine(self, model, direction: str = "restore", max_rows: int = 512) -> SuffixEngine:
        """A :class:`SuffixEngine` over the corrupted run (``"restore"``) or the clean run (``"necessity"``).
        Refuses when the model's weights were changed in place since :func:`prepare` ran."""
        if self.weights is not None and weights_state(model) != self.weights:
            from moelens.errors import MoelensUserError

            raise MoelensUserError(
                "the model's weights changed since this TraceSetup was prepared (an in-place edit, or the model "
                "moved): its cached clean and corrupted runs belong to the old weights, and a sweep would mix the "
                "two models. Prepare again: moelens.tracing.prepare(model, case, ...)"
            )
        base = self.corrupted_cache if direction == "restore" else self.clean_cache
        batch = self.n_samples if direction == "restore" else 1
        return SuffixEngine(model, BaseRun(base, batch, self.tokens.shape[1], tokens=self.tokens), self.metric,
                            max_rows=max_rows)

    def expert_delta(self, layer: int, experts, positions: list[int]) -> Tensor:
        """``sum_e c_e(clean) - c_e(corrupted)`` ``[n_samples, T - min(positions), d]``, zero off ``positions``."""
        p0 = min(positions)
        delta = torch.zeros(self.n_samples, self.tokens.shape[1] - p0, self.clean_cache.model.cfg.d_model,
                            device=self.tokens.device)
        rel = [p - p0 for p in positions]
        # the contributions at ``positions`` only (not rebuilt over the whole sequence per expert)
        key = (layer, tuple(positions))
        if key not in self._slots:
            self._slots = {key: (_slots_at(self.clean_cache, layer, positions),
                                 _slots_at(self.corrupted_cache, layer, positions))}  # keep one: bounded memory
        clean, corrupted = self._slots[key]
        for e in experts:
            d = _contribution(*clean, int(e)) - _contribution(*corrupted, int(e))
            delta[:, rel] += d.float().to(delta.device).expand(self.n_samples, -1, -1)
        return delta

    def layer_delta(self, layer: int, positions: list[int]) -> Tensor:
        """clean minus corrupted ``hook_mlp_out`` at ``positions`` (restoring the whole MoE output)."""
        p0 = min(positions)
        name = f"blocks.{layer}.hook_mlp_out"
        d = (self.clean_cache[name] - self.corrupted_cache[name]).float().to(self.tokens.device)
        delta = torch.zeros_like(d)
        delta[:, positions] = d[:, positions]
        return delta[:, p0:]

    def rows_to_run(self, deltas: Tensor) -> Tensor:
        """Which rows of ``deltas [rows, ...]`` a sweep must run (bool, CPU): a row whose delta is
        exactly zero (an expert routed neither in the clean run nor in that noise sample) is the
        corrupted run itself, whose value ``corrupted_samples`` holds; every row when that is unknown."""
        if self.corrupted_samples is None:
            return torch.ones(deltas.shape[0], dtype=torch.bool)
        return deltas.flatten(1).ne(0).any(1).cpu()

    def restore_scores(self, model, layer: int, deltas: list[Tensor], positions: list[int], max_rows: int = 512) -> Tensor:
        """Mean metric for each resid_post delta ``[n_samples, T-p0, d]`` added after ``layer``."""
        return self.restore_scores_at(model, [(layer, d) for d in deltas], positions, max_rows=max_rows)

    def restore_scores_at(self, model, items: Sequence[tuple[int, Tensor]], positions: list[int],
                          max_rows: int = 512) -> Tensor:
        """Mean metric for each ``(layer, delta)``: the ``hook_mlp_out`` delta ``[n_samples, T-p0, d]``
        of ``layer`` (what it adds to resid_post: the same, times the block's layer scalar where it has
        one, Gemma 4). Items of different layers share one engine pass."""
        n = self.n_samples
        if not items:
            return torch.empty(0)
        stacked = torch.cat([_mlp_out_to_resid_post(model, int(l), d) for l, d in items])
        layers = torch.tensor([int(l) for l, _ in items]).repeat_interleave(n)
        samples = torch.arange(n).repeat(len(items))
        vals = torch.empty(len(samples))
        run = self.rows_to_run(stacked)
        if not run.all():
            vals[~run] = self.corrupted_samples[samples[~run]]
        if run.any():
            eng = self.engine(model, max_rows=max_rows)
            rows = run.nonzero().flatten()
            with torch.no_grad():
                vals[rows] = eng.run_from_resid_posts(layers[rows], min(positions), stacked[rows.to(stacked.device)],
                                                      samples[rows])
        return vals.reshape(len(items), n).mean(-1)


def _mlp_out_to_resid_post(model, layer: int, delta: Tensor) -> Tensor:
    """A change of ``hook_mlp_out`` as the change of ``hook_resid_post`` it causes."""
    scalar = getattr(model.blocks[layer], "layer_scalar", None)
    return delta if scalar is None else delta * scalar.detach().float().to(delta.device)


def weights_state(model) -> int:
    """A cheap identity of the weights' current state: each parameter's storage and its in-place
    version counter (bumped by every in-place edit, ``W[...] += d`` under ``no_grad`` included), for
    the parameters, the persistent buffers (an edited correction bias re-routes) and packed weights."""
    from moelens.loading import weight_tensors
    from moelens.quant.packed import packed_tensors

    packed = [t for m in packed_tensors(model).values() for t in m._buffers.values()]  # keep_quantized=True
    return hash(tuple((p.data_ptr(), p._version) for p in list(weight_tensors(model).values()) + packed))


def _slots_at(cache, layer: int, positions: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(indices, weights, expert_out) of ``layer`` at ``positions`` (for :func:`_contribution`)."""
    from moelens.components.moe import combine_weights

    name = f"blocks.{layer}.mlp."
    idx, w, out = (cache[name + h][:, positions] for h in ("hook_expert_indices", "hook_expert_weights", "hook_expert_out"))
    return idx, combine_weights(cache.model.cfg, w), out


def _contribution(idx: Tensor, w: Tensor, out: Tensor, expert: int) -> Tensor:
    """``expert``'s weighted update at the sliced positions: the arithmetic of
    ``MoEActivationCache.expert_contribution`` on a slice."""
    slot_w = torch.where(idx == expert, w, torch.zeros_like(w))
    return (out * slot_w.unsqueeze(-1)).sum(-2).to(out.dtype)


def embedding_std(model) -> float:
    """Standard deviation of every entry of the embedding matrix (the default noise reference), as
    the embeddings enter the residual stream: times ``cfg.embed_scale`` (Gemma: ``sqrt(d_model)``)
    and ``cfg.embedding_multiplier`` (Granite) where the architecture scales them, the noise being
    added to ``hook_embed``, after the scale (ROME measures the embedding layer's output too)."""
    return float(model.W_E.detach().float().std()) * _embed_scale(model)


def _embed_scale(model) -> float:
    factor = float(getattr(model.cfg, "embedding_multiplier", 1.0) or 1.0)
    scale = getattr(model.cfg, "embed_scale", None)
    if scale is not None:
        factor *= float(torch.tensor(scale, dtype=model.W_E.dtype).float())  # as the model applies it (dtype-rounded)
    return factor


def subject_embedding_std(model, cases: Sequence[FactCase], tokenization: str = "moelens") -> float:
    """A per-dataset noise reference: the std of every entry of the embeddings of all the subjects'
    tokens (one entry per token occurrence, subjects repeated as often as the cases repeat them).

    ``tokenization="moelens"`` (default): each subject tokenized as it continues the prompt (a
    leading space unless the prompt starts with it), **without** the tokenizer's special tokens: only
    the tokens the noise is added to. ``tokenization="rome"``: exactly ROME's
    ``collect_embedding_std`` (``experiments/causal_trace.py``): ``tokenizer.encode(subject)``, the
    bare subject **with** whatever special tokens the tokenizer adds (e.g. a BOS token for
    Llama/Mistral tokenizers; GPT-2, ROME's model, adds none, where the two differ only by the
    leading space)."""
    if model.tokenizer is None:
        raise ValueError("subject_embedding_std needs the model's tokenizer")
    if tokenization not in ("moelens", "rome"):
        raise ValueError(f"tokenization={tokenization!r}: use 'moelens' or 'rome'")
    ids = []
    for case in cases:
        if tokenization == "rome":
            ids += model.tokenizer.encode(case.subject)
        else:
            ids += model.tokenizer(" " + case.subject if not case.prompt.startswith(case.subject) else case.subject,
                                   add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("no subject tokens")
    return float(model.W_E.detach()[torch.tensor(ids, device=model.W_E.device)].float().std()) * _embed_scale(model)


def prepare(
    model,
    case: FactCase,
    *,
    noise: Optional[Tensor] = None,
    seed: int = 0,
    n_samples: int = 10,
    noise_scale: float = 3.0,
    sigma: Optional[float] = None,
    prepend_bos: Optional[bool] = None,
    names_filter=tracing_names_filter,
    cache_device=None,
    gradients: Sequence[str] = (),
) -> TraceSetup:
    """Tokenize the case, draw (or take) the noise, and run the clean and corrupted runs with caches.

    ``noise``: a given ``z`` ``[n_samples, n_subject_tokens, d_model]``, used as is (``sigma`` is
    still applied: pass ``sigma=1`` to add ``noise`` unscaled) - this is the contract's
    reproducible path; otherwise ``z`` is drawn from ``seed``. ``sigma`` defaults to
    ``noise_scale * std(W_E)``; for a per-dataset reference as in ROME pass
    ``sigma=noise_scale * subject_embedding_std(model, cases)`` (``tokenization="rome"`` for ROME's
    exact ``collect_embedding_std``, special tokens included). ``cache_device`` stores the clean
    and corrupted caches elsewhere (e.g. ``"cpu"`` to spare GPU memory; slower sweeps).
    ``gradients``: kinds (``"mlp"``, ``"attn"``, ``"resid"``) whose per-layer gradients of each
    corrupted run's metric the corrupted run also takes (one backward more; ``setup.gradients``,
    used by :mod:`moelens.tracing.attribution`).
    """
    if model.tokenizer is None:
        raise ValueError("causal tracing on a FactCase needs the model's tokenizer")
    bos = model.default_prepend_bos() if prepend_bos is None else prepend_bos
    tc = tokenize_case(model.tokenizer, case, prepend_bos=bos)
    device = model.W_E.device
    tokens = tc.tokens.to(device)
    n_subj = len(tc.subject_positions)
    if tc.target_foil_id is not None and tc.target_foil_id == tc.target_true_id:
        raise ValueError(
            f"target_true {case.target_true!r} and target_foil {case.target_foil!r} have the same first token "
            f"{model.tokenizer.convert_ids_to_tokens(tc.target_true_id)!r}: the contrast is 0 in every "
            f"run and every rescue would be NaN; give a foil that starts with another token"
        )
    if noise is None and (isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1):
        raise ValueError(f"n_samples={n_samples!r}: give at least 1 noise sample")
    if sigma is None:
        sigma = noise_scale * embedding_std(model)
    if noise is None:
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(n_samples, n_subj, model.cfg.d_model, generator=gen)
    else:
        z = torch.as_tensor(noise, dtype=torch.float32)
        if z.ndim != 3 or z.shape[1:] != (n_subj, model.cfg.d_model) or z.shape[0] < 1:
            raise ValueError(
                f"noise must be [n_samples, {n_subj} subject tokens, {model.cfg.d_model}], got {tuple(z.shape)} "
                f"(subject tokens: {[tc.str_tokens[p] for p in tc.subject_positions]})"
            )
    scaled = (z * sigma).to(device)
    settings = dict(noise_scale=noise_scale, sigma=float(sigma), n_samples=int(z.shape[0]), seed=seed,
                    prepend_bos=bool(bos), noise_given=noise is not None)
    corrupt = P.Corrupt(positions=tc.subject_positions, noise=scaled)
    metric = P.logit_diff(tc.target_true_id, tc.target_foil_id) if tc.target_foil_id is not None else P.prob(tc.target_true_id)
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(tokens, names_filter=names_filter, device=cache_device)
        batch = tokens.expand(z.shape[0], -1)
        grads = None
        if gradients:
            corrupted_logits, corrupted_cache, grads = corrupted_run_with_gradients(
                model, batch, corrupt, metric, names_filter, gradients, cache_device)
        else:
            corrupted_logits, corrupted_cache = model.run_with_cache(
                batch, names_filter=names_filter, fwd_hooks=P.to_hooks(model, [corrupt]), device=cache_device
            )
    per_sample = metric(corrupted_logits).detach().float().cpu()
    return TraceSetup(
        case=case, tokenized=tc, tokens=tokens, noise=scaled, sigma=float(sigma),
        clean=float(metric(clean_logits).mean()), corrupted=float(per_sample.mean()),
        clean_cache=clean_cache, corrupted_cache=corrupted_cache, settings=settings, gradients=grads,
        corrupted_samples=per_sample, weights=weights_state(model),
    )


def resolve_positions(spec: PositionSpec, tc: TokenizedCase) -> list[int]:
    n = tc.tokens.shape[1]
    if spec == "all":
        return list(range(n))
    if spec == "last":
        return [n - 1]
    if spec == "subject_last":
        return [tc.subject_positions[-1]]
    if spec == "subject":
        return list(tc.subject_positions)
    if isinstance(spec, str):
        raise ValueError(f"positions={spec!r}: use 'all', 'last', 'subject', 'subject_last' or a list of ints")
    pos = [spec] if isinstance(spec, int) else list(spec)
    bad = [p for p in pos if not -n <= p < n]
    if bad:
        raise IndexError(f"positions {bad} out of range for a prompt of {n} tokens")
    return [p % n for p in pos]


def window_layers(layer: int, window: int, n_layers: int) -> tuple[int, int]:
    """The layers ``lo..hi-1`` a window of ``window`` layers restores around ``layer``: ROME's rule
    (``experiments/causal_trace.py``, ``trace_important_window``), ``max(0, l - w // 2)`` up to
    (excluded) ``min(n_layers, l - (-w // 2))``. Window 10 restores ``l-5 .. l+4``; odd windows are
    centred; the window is clipped (not shifted) at the first and last layers."""
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window={window!r}: give a whole number of layers >= 1")
    window = int(window)
    return max(0, layer - window // 2), min(n_layers, layer - (-window // 2))


def warn_if_post_normed_moe(model, layers: Sequence[int]) -> None:
    """Warn where a norm follows the MoE (FlexOlmo's post-norm, Gemma 4's branch norms): expert scores
    there add ``delta_e`` (measured before the norm) at ``hook_mlp_out`` (after it), so they rank the
    experts of a layer but are not a restoration of the MoE output (docs/tracing.md)."""
    import warnings

    post = [l for l in layers if getattr(model.blocks[l], "ln2_post", None) is not None
            or getattr(model.blocks[l], "parallel", False)]
    if post:
        warnings.warn(
            f"layers {post} normalise the MoE output before the residual stream: expert scores add each expert's "
            "pre-norm update at hook_mlp_out (after the norm), so they rank experts but are not an exact "
            "restoration of the MoE output; to restore it exactly, patch mlp.hook_routed_out with moelens.patching "
            "(docs/tracing.md)", UserWarning, stacklevel=3)


def _check_layer(model, layer: int, sparse: bool = False) -> int:
    """The layer, normalised (one indexing rule: negative counts from the last layer)."""
    from moelens.patching import normalize_index

    layer = normalize_index(layer, model.cfg.n_layers, "layer")
    if sparse and layer not in model.cfg.moe_layers:
        raise ValueError(f"layer {layer} is dense: expert tracing needs a sparse layer {list(model.cfg.moe_layers)}")
    return layer


# ---------------------------------------------------------------------------------- results
@dataclass
class TraceResult:
    """Common fields: the case, labelled axes and every setting."""

    clean: float
    corrupted: float
    case: dict
    str_tokens: list
    subject_positions: list
    settings: dict

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {k: (v.tolist() if isinstance(v, (Tensor, np.ndarray)) else v) for k, v in asdict(self).items()}
        path.write_text(json.dumps({"type": type(self).__name__, **data}, indent=1))
        return path

    @staticmethod
    def load(path: Union[str, Path]) -> "TraceResult":
        data = json.loads(Path(path).read_text())
        cls = {c.__name__: c for c in (LayerTraceResult, ExpertTraceResult, CoalitionResult, ExpertGridResult)}[
            data.pop("type")]
        for key in ("scores", "curve", "layer_scores"):
            if key in data and data[key] is not None:
                data[key] = torch.tensor(data[key])
        return cls(**data)

    def rescue(self, value):
        """Normalised rescue ``(value - corrupted) / (clean - corrupted)``."""
        denom = self.clean - self.corrupted
        return (value - self.corrupted) / denom if denom != 0 else float("nan") * value

    @property
    def metric_name(self) -> str:
        """What ``clean``, ``corrupted`` and raw scores measure (named on figures)."""
        case = self.case or {}
        true = case.get("target_true", "true")
        if case.get("target_foil") is not None:
            return f"logit({true!r}) - logit({case['target_foil']!r})"
        return f"p({true!r})"


@dataclass
class LayerTraceResult(TraceResult):
    scores: Tensor = None  # [n_layers, n_positions]
    layers: list = field(default_factory=list)
    positions: list = field(default_factory=list)
    kind: str = "mlp"
    direction: str = "restore"

    def to_dataframe(self):
        import pandas as pd

        rows = []
        for i, l in enumerate(self.layers):
            for j, p in enumerate(self.positions):
                rows.append({"layer": l, "position": p, "token": self.str_tokens[p],
                             "subject": p in self.subject_positions, "score": float(self.scores[i, j]),
                             "rescue": float(self.rescue(self.scores[i, j]))})
        return pd.DataFrame(rows)

    def plot(self, title: Optional[str] = None):
        from moelens.plotting.tracing import restoration_heatmap

        return restoration_heatmap(
            self.scores, self.str_tokens, subject_positions=self.subject_positions, layers=self.layers,
            positions=self.positions, clean=self.clean, corrupted=self.corrupted, kind=self.kind, title=title,
            metric=self.metric_name,
        )


@dataclass
class ExpertTraceResult(TraceResult):
    scores: Tensor = None  # [n_experts]
    layer: int = 0
    positions: list = field(default_factory=list)
    layer_score: float = 0.0  # contrast with the whole MoE output restored at the positions
    clean_routed: list = field(default_factory=list)
    noise_routed: list = field(default_factory=list)  # routed in at least one noise sample
    noise_routed_counts: list = field(default_factory=list)  # per expert: in how many samples

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({
            "layer": self.layer, "expert": list(range(len(self.scores))), "score": self.scores.tolist(),
            "rescue": [float(self.rescue(s)) for s in self.scores.tolist()],
            "clean_routed": [e in self.clean_routed for e in range(len(self.scores))],
            "noise_routed": [e in self.noise_routed for e in range(len(self.scores))],
        })

    def top(self, n: int = 5) -> list[tuple[int, float]]:
        order = torch.argsort(self.scores, descending=True)[:n]
        return [(int(e), float(self.scores[e])) for e in order]

    def plot(self, title: Optional[str] = None):
        from moelens.plotting.experts import expert_rescue_bar

        # the plotted quantity is the normalised rescue (0 = corrupted, 1 = clean), not the raw contrast
        rescue = [float(self.rescue(float(s))) for s in self.scores]
        return expert_rescue_bar(rescue, clean_routed=self.clean_routed, noise_routed=self.noise_routed,
                                 layer=self.layer, baseline=float(self.rescue(self.layer_score)),
                                 title=title or f"Restoring one expert at layer {self.layer}: "
                                                f"{self.case.get('prompt', '')!r}")


@dataclass
class CoalitionResult(TraceResult):
    layer: int = 0
    positions: list = field(default_factory=list)
    layer_score: float = 0.0
    clean_routed: list = field(default_factory=list)
    clean_routed_score: float = 0.0
    union: list = field(default_factory=list)
    union_score: float = 0.0
    greedy: list = field(default_factory=list)  # experts in the order the search added them
    curve: Tensor = None  # [len(greedy)] contrast after adding each
    target_fraction: float = 0.9
    reached: bool = False
    sign: int = 1  # +1: the search raised the contrast (the layer rescues); -1: lowered it (restoring the layer hurts)

    def to_dataframe(self):
        import pandas as pd

        rows = [{"coalition": "clean_routed", "size": len(self.clean_routed), "experts": self.clean_routed,
                 "score": self.clean_routed_score},
                {"coalition": "union", "size": len(self.union), "experts": self.union, "score": self.union_score}]
        for i, e in enumerate(self.greedy):
            rows.append({"coalition": f"greedy_{i + 1}", "size": i + 1, "experts": self.greedy[: i + 1],
                         "score": float(self.curve[i])})
        df = pd.DataFrame(rows)
        df["rescue"] = [float(self.rescue(s)) for s in df["score"]]
        return df

    @property
    def rule(self) -> str:
        """The rule the greedy search followed, in words: it moves the metric the way restoring the
        whole layer does (``sign``), so for a layer whose restoration lowers the metric it adds the
        expert that lowers it most, not the one that helps most."""
        if self.sign >= 0:
            return ("greedy rule: each step adds the expert that raises the metric most "
                    "(restoring the whole layer raises it)")
        return ("greedy rule: each step adds the expert that lowers the metric most "
                "(restoring the whole layer lowers it, and the search follows the layer's sign)")

    def plot(self, title: Optional[str] = None):
        from moelens.plotting.coalitions import coalition_curve

        # normalised rescue, starting from the empty coalition (the corrupted run, rescue 0)
        values = [0.0] + [float(self.rescue(float(v))) for v in self.curve]
        target = self.target_fraction * float(self.rescue(self.layer_score))
        return coalition_curve(list(range(len(values))), values, labels=["(none)"] + [f"+E{e}" for e in self.greedy],
                               target=target, target_label=f"target: {self.target_fraction:.0%} of the whole "
                               f"layer's rescue ({format_number(target)})", layer_rescue=float(self.rescue(self.layer_score)),
                               rule=self.rule,
                               title=title or f"Greedy coalition at layer {self.layer}: "
                               f"{self.case.get('prompt', '')!r}")


def _common(setup: TraceSetup) -> dict:
    tokenizer = setup.clean_cache.model.tokenizer
    # readable labels: each token decoded on its own (" Paris", not the vocabulary piece "ĠParis")
    str_tokens = [tokenizer.decode([t]) for t in setup.tokens[0].tolist()]
    return dict(clean=setup.clean, corrupted=setup.corrupted, case=setup.case.to_dict(),
                str_tokens=str_tokens, subject_positions=list(setup.tokenized.subject_positions),
                settings=dict(setup.settings))


# ---------------------------------------------------------------------------------- entry points
def trace_layers(
    model,
    case: Union[FactCase, TraceSetup],
    *,
    kind: str = "mlp",
    positions: PositionSpec = "all",
    layers: Optional[Sequence[int]] = None,
    window: int = 1,
    direction: str = "restore",
    engine: str = "suffix",
    max_rows: int = 128,
    progress: bool = True,
    **prepare_kwargs,
) -> LayerTraceResult:
    """Restoration grid ``scores [n_layers, n_positions]`` (see module docstring).

    ``window``: restore ``window`` consecutive layers around each layer by ROME's rule
    (:func:`window_layers`: layers ``l - w // 2`` to ``l - (-w // 2) - 1``, clipped at the ends; window
    10 restores ``l-5 .. l+4``). ``direction="necessity"``: run the clean prompt and patch in the corrupted
    activation (one row per noise sample) instead. ``engine="suffix"`` (default) recomputes only
    the layers and positions a patch can change (:mod:`moelens.tracing.engine`); ``"full"`` runs
    whole patched forwards through the generic patching API (the reference; same results).

    With several residual streams (DeepSeek-V4), ``kind="resid"`` restores every stream of
    ``hook_resid_post`` at the position; ``"mlp"`` / ``"attn"`` restore the block's output before
    its hyper-connection spreads it over the streams (with the patched run's own ``post`` weights).
    """
    if kind not in KIND_HOOKS:
        raise ValueError(f"kind={kind!r}: use one of {sorted(KIND_HOOKS)}")
    if direction not in ("restore", "necessity"):
        raise ValueError("direction must be 'restore' or 'necessity'")
    setup = case if isinstance(case, TraceSetup) else prepare(model, case, **prepare_kwargs)
    layers = list(range(model.cfg.n_layers)) if layers is None else [_check_layer(model, l) for l in layers]
    pos = resolve_positions(positions, setup.tokenized)
    hook = KIND_HOOKS[kind]
    settings = {**setup.settings, "kind": kind, "window": window, "direction": direction, "positions": positions}
    if engine == "suffix":
        cells = []
        for l in layers:
            lo, hi = window_layers(l, window, model.cfg.n_layers)
            cells += [(lo, hi, p) for p in pos]
        eng = setup.engine(model, direction, max_rows=max_rows)
        source = setup.clean_cache if direction == "restore" else setup.corrupted_cache
        with torch.no_grad():
            scores = eng.grid(hook, cells, source, setup.n_samples, setup.n_samples if direction == "necessity" else 1)
        return LayerTraceResult(scores=scores.reshape(len(layers), len(pos)), layers=layers, positions=pos, kind=kind,
                                direction=direction, **{**_common(setup), "settings": settings})
    if engine != "full":
        raise ValueError(f"engine={engine!r}: use 'suffix' or 'full'")
    sets, labels = [], []
    for l in layers:
        lo, hi = window_layers(l, window, model.cfg.n_layers)
        for p in pos:
            if direction == "restore":
                sets.append([setup.corrupt(), P.Replace(hook, layers=range(lo, hi), positions=[p], source=setup.clean_cache)])
            else:
                sets.append([P.Replace(hook, layers=range(lo, hi), positions=[p], source=setup.corrupted_cache)])
            labels.append({"layer": l, "position": p})
    result = P.run_sweep(model, setup.tokens, sets, setup.metric, group_size=setup.n_samples, max_rows=max_rows,
                         labels=labels, progress=progress)
    return LayerTraceResult(scores=result.values.reshape(len(layers), len(pos)), layers=layers, positions=pos, kind=kind,
                            direction=direction, **{**_common(setup), "settings": settings})


def routed_sets(setup: TraceSetup, layer: int, positions: list[int]) -> tuple[list[int], list[int], list[int]]:
    """(clean-routed experts, noise-routed experts, per-expert noise-routed sample counts) at ``positions``."""
    n_experts = setup.clean_cache.model.cfg.n_experts
    clean_mask = setup.clean_cache.expert_mask(layer)[0, positions].any(0)
    noisy = setup.corrupted_cache.expert_mask(layer)[:, positions].any(1)  # [n_samples, n_experts]
    counts = noisy.sum(0)
    return ([int(e) for e in clean_mask.nonzero().flatten()], [int(e) for e in (counts > 0).nonzero().flatten()],
            counts.tolist() if counts.numel() == n_experts else [])


def trace_experts(
    model,
    case: Union[FactCase, TraceSetup],
    layer: int,
    *,
    positions: PositionSpec = "last",
    experts: Optional[Sequence[int]] = None,
    engine: str = "suffix",
    max_rows: int = 128,
    progress: bool = True,
    **prepare_kwargs,
) -> ExpertTraceResult:
    """Per-expert rescue ``scores [n_experts]`` at ``layer`` (see module docstring). Experts not in
    ``experts`` (default: all) get NaN."""
    layer = _check_layer(model, layer, sparse=True)
    warn_if_post_normed_moe(model, [layer])
    setup = case if isinstance(case, TraceSetup) else prepare(model, case, **prepare_kwargs)
    pos = resolve_positions(positions, setup.tokenized)
    from moelens.patching import _check_range

    experts = list(range(model.cfg.n_experts)) if experts is None else _check_range(experts, model.cfg.n_experts, "expert")
    if engine == "suffix":
        deltas = [setup.layer_delta(layer, pos)] + [setup.expert_delta(layer, [e], pos) for e in experts]
        values = setup.restore_scores(model, layer, deltas, pos, max_rows=max(max_rows, 1))
    elif engine == "full":
        sets = [[setup.corrupt(), P.Replace("mlp_out", layer=layer, positions=pos, source=setup.clean_cache)]]
        sets += [[setup.corrupt(), P.RestoreExperts(layer, [e], setup.clean_cache, setup.corrupted_cache, positions=pos)]
                 for e in experts]
        values = P.run_sweep(model, setup.tokens, sets, setup.metric, group_size=setup.n_samples, max_rows=max_rows,
                             progress=progress).values
    else:
        raise ValueError(f"engine={engine!r}: use 'suffix' or 'full'")
    scores = torch.full((model.cfg.n_experts,), float("nan"))
    scores[experts] = values[1:]
    clean_routed, noise_routed, counts = routed_sets(setup, layer, pos)
    return ExpertTraceResult(
        scores=scores, layer=layer, positions=pos, layer_score=float(values[0]), clean_routed=clean_routed,
        noise_routed=noise_routed, noise_routed_counts=counts,
        **{**_common(setup), "settings": {**setup.settings, "positions": positions}},
    )


@dataclass
class ExpertGridResult(TraceResult):
    """Exact :func:`trace_experts` of every sparse layer at once.

    ``scores [n_layers, n_experts]``: the contrast with expert ``e``'s clean contribution restored at
    layer ``l`` (``trace_experts(model, case, l).scores[e]``); NaN on dense and unselected layers.
    ``layer_scores [n_layers]``: the whole MoE output restored. ``clean_routed[l]`` /
    ``noise_routed[l]``: experts routed at the positions in the clean run / in at least one noise
    sample (empty for dense layers)."""

    scores: Tensor = None
    layer_scores: Tensor = None
    positions: list = field(default_factory=list)
    clean_routed: list = field(default_factory=list)
    noise_routed: list = field(default_factory=list)
    method: str = "exact"

    def top(self, n: int = 5) -> list[tuple[int, int, float]]:
        """The ``n`` highest scores as ``(layer, expert, score)``."""
        flat = torch.nan_to_num(self.scores, nan=-float("inf")).flatten()
        order = torch.argsort(flat, descending=True)[:n]
        E = self.scores.shape[1]
        return [(int(i) // E, int(i) % E, float(flat[i])) for i in order if torch.isfinite(flat[i])]

    def to_dataframe(self):
        """One row per (layer, expert) of a traced layer: score, rescue and routing."""
        import pandas as pd

        rows = []
        for l in range(self.scores.shape[0]):
            if torch.isnan(self.scores[l]).all():
                continue
            for e in range(self.scores.shape[1]):
                v = float(self.scores[l, e])
                rows.append({"layer": l, "expert": e, "score": v, "rescue": float(self.rescue(v)),
                             "clean_routed": e in self.clean_routed[l], "noise_routed": e in self.noise_routed[l],
                             "method": self.method})
        return pd.DataFrame(rows)

    def plot(self, title: Optional[str] = None):
        """Layers x experts heatmap of the normalised rescue (clean-routed experts ringed)."""
        from moelens.plotting.attribution import expert_attribution_heatmap

        p = self.positions[-1]
        return expert_attribution_heatmap(
            self.rescue(self.scores), clean_routed=self.clean_routed, status="exact",
            title=title or f"Restoring one expert's clean contribution at '{self.str_tokens[p]}' (position {p}), "
                           f"every layer (exact)",
        )

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ExpertGridResult":
        data = json.loads(Path(path).read_text())
        kind = data.pop("type")
        if kind != cls.__name__:
            raise ValueError(f"{path} holds a {kind}, not a {cls.__name__}")
        for key in ("scores", "layer_scores"):
            data[key] = torch.tensor(data[key], dtype=torch.float32)
        return cls(**data)


def trace_expert_grid(
    model,
    case: Union[FactCase, TraceSetup],
    *,
    layers: Optional[Sequence[int]] = None,
    positions: PositionSpec = "last",
    max_rows: int = 512,
    progress: bool = True,
    **prepare_kwargs,
) -> ExpertGridResult:
    """Exact :func:`trace_experts` for every expert of every sparse layer (or of ``layers``), in one
    sweep: ``scores [n_layers, n_experts]``, equal to ``trace_experts(model, case, l).scores`` row by
    row. Only the (layer, expert, noise sample) rows whose patch is non-zero are run (at most
    ``2 * top_k`` per sample and layer: an expert routed in neither run leaves the corrupted run
    unchanged), and the rows of all layers share the engine's passes (``max_rows`` rows at a time,
    which also bounds the memory of the pending patches)."""
    setup = case if isinstance(case, TraceSetup) else prepare(model, case, **prepare_kwargs)
    pos = resolve_positions(positions, setup.tokenized)
    L, E, n = model.cfg.n_layers, model.cfg.n_experts, setup.n_samples
    layers = list(model.cfg.moe_layers) if layers is None else [_check_layer(model, l, sparse=True) for l in layers]
    warn_if_post_normed_moe(model, layers)
    p0 = min(pos)
    known = setup.corrupted_samples
    # values [L, 1 + E, n]: column 0 the whole layer; rows not run keep the corrupted run's value
    vals = torch.full((L, 1 + E, n), float("nan"))
    pending: list[tuple[int, int, Tensor, Tensor]] = []  # (layer, column, samples, deltas [r, T-p0, d])
    eng = setup.engine(model, max_rows=max_rows)

    def flush():
        if not pending:
            return
        ls = torch.cat([torch.full((len(sm),), l) for l, _, sm, _ in pending])
        samples = torch.cat([sm for *_, sm, _ in pending])
        deltas = torch.cat([d for *_, d in pending])
        with torch.no_grad():
            out = eng.run_from_resid_posts(ls, p0, deltas, samples)
        i = 0
        for l, col, sm, _ in pending:
            vals[l, col, sm] = out[i : i + len(sm)]
            i += len(sm)
        pending.clear()

    from tqdm.auto import tqdm

    count = 0
    for l in tqdm(layers, desc="expert grid", disable=not progress):
        for col in range(1 + E):
            delta = setup.layer_delta(l, pos) if col == 0 else setup.expert_delta(l, [col - 1], pos)
            rows = setup.rows_to_run(delta).nonzero().flatten()
            if known is not None:
                vals[l, col] = known  # the rows not run are the corrupted runs
            if len(rows):
                pending.append((l, col, rows, _mlp_out_to_resid_post(model, l, delta[rows.to(delta.device)])))
                count += len(rows)
            if count >= max_rows:
                flush()
                count = 0
    flush()
    means = vals.mean(-1)
    scores = torch.full((L, E), float("nan"))
    layer_scores = torch.full((L,), float("nan"))
    scores[layers], layer_scores[layers] = means[layers, 1:], means[layers, 0]
    clean_routed, noise_routed = [[] for _ in range(L)], [[] for _ in range(L)]
    for l in layers:
        clean_routed[l], noise_routed[l], _ = routed_sets(setup, l, pos)
    return ExpertGridResult(
        scores=scores, layer_scores=layer_scores, positions=pos, clean_routed=clean_routed, noise_routed=noise_routed,
        **{**_common(setup), "settings": {**setup.settings, "positions": positions, "layers": layers}},
    )


def coalition_score(model, setup: TraceSetup, layer: int, experts: Sequence[int], positions: list[int]) -> float:
    """Contrast after restoring the summed contributions of ``experts`` (empty: the corrupted run)."""
    if not experts:
        return setup.corrupted
    return float(setup.restore_scores(model, layer, [setup.expert_delta(layer, experts, positions)], positions)[0])


def trace_coalitions(
    model,
    case: Union[FactCase, TraceSetup],
    layer: int,
    *,
    positions: PositionSpec = "last",
    target_fraction: float = 0.9,
    max_size: Optional[int] = None,
    candidates: Optional[Sequence[int]] = None,
    max_rows: int = 128,
    progress: bool = True,
    **prepare_kwargs,
) -> CoalitionResult:
    """Coalition rescue at ``layer``: the clean-routed set, the clean-or-noise-routed union, and a
    greedy search until the coalition recovers ``target_fraction`` of the layer's effect
    ``layer_score - corrupted`` or reaches ``max_size`` (default ``2 * top_k``). ``candidates``
    default: the union.

    The search follows the sign of the layer's effect (``result.sign``): when restoring the whole
    layer raises the contrast, each step adds the expert that raises it most and the target is
    reached once the contrast is ``>= corrupted + target_fraction * (layer_score - corrupted)``;
    when restoring the layer *lowers* the contrast, each step adds the expert that lowers it most
    and the target is reached once the contrast is ``<=`` that value. ``reached`` says whether it was."""
    layer = _check_layer(model, layer, sparse=True)
    setup = case if isinstance(case, TraceSetup) else prepare(model, case, **prepare_kwargs)
    pos = resolve_positions(positions, setup.tokenized)
    clean_routed, noise_routed, _ = routed_sets(setup, layer, pos)
    union = sorted(set(clean_routed) | set(noise_routed))
    layer_score = float(setup.restore_scores(model, layer, [setup.layer_delta(layer, pos)], pos)[0])
    from moelens.patching import _check_range

    pool = list(union if candidates is None else dict.fromkeys(_check_range(candidates, model.cfg.n_experts, "expert")))
    max_size = min(len(pool), max_size or 2 * model.cfg.top_k)
    target = setup.corrupted + target_fraction * (layer_score - setup.corrupted)
    # the search moves the contrast the way restoring the whole layer does: up when the layer rescues
    # (layer_score >= corrupted), down when restoring it hurts
    sign = 1 if layer_score >= setup.corrupted else -1
    chosen, curve, reached = [], [], False
    from tqdm.auto import tqdm

    for _ in tqdm(range(max_size), desc="coalition search", disable=not progress):
        rest = [e for e in pool if e not in chosen]
        if not rest:
            break
        vals = setup.restore_scores(model, layer, [setup.expert_delta(layer, chosen + [e], pos) for e in rest], pos,
                                    max_rows=max_rows)
        best = int(torch.argmax(sign * vals))
        chosen.append(rest[best])
        curve.append(float(vals[best]))
        if sign * (curve[-1] - target) >= 0:
            reached = True
            break
    return CoalitionResult(
        layer=layer, positions=pos, layer_score=layer_score, clean_routed=clean_routed,
        clean_routed_score=coalition_score(model, setup, layer, clean_routed, pos), union=union,
        union_score=coalition_score(model, setup, layer, union, pos), greedy=chosen, curve=torch.tensor(curve),
        target_fraction=target_fraction, reached=reached, sign=sign,
        **{**_common(setup), "settings": {**setup.settings, "positions": positions}},
    )
