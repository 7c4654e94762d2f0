"""DeepSeek Sparse Attention parity against transformers 5.25 (fp32, CPU): DeepSeek-V3.2
(``DeepseekV32ForCausalLM``) and GLM-5 (``GlmMoeDsaForCausalLM``) on tiny random checkpoints.

The tiny checkpoints keep ``index_topk = 5`` keys per query over 16 positions, so from position 5 on
the indexer drops keys (checked); GLM-5's has a shared-indexer layer (layer 2 reuses layer 1's
top-k). Variants: ``v32`` (YaRN, half-split indexer RoPE), ``glm5`` (interleaved indexer RoPE,
sharing), ``glm5_pattern`` (the sharing pattern given as ``index_topk_pattern``, no ``indexer_types``).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import moelens
from moelens import HookedMoETransformer
from moelens.architectures import translate_config
from moelens.architectures.base import UnsupportedConfigError
from moelens.testing import save_tiny

warnings.filterwarnings("ignore", message=".*RoPE scaling factor.*")

ATOL = 1e-4
BATCH, POS = 2, 16

VARIANTS = {
    "v32": ("deepseek_v32", {}),
    "glm5": ("glm_moe_dsa", {}),
}


class Pair:
    def __init__(self, tmp_path_factory, variant: str):
        name, overrides = VARIANTS[variant]
        self.dir = tmp_path_factory.mktemp(variant)
        self.hf = save_tiny(name, self.dir, **overrides)
        self.model = HookedMoETransformer.from_pretrained(self.dir)
        self.tokens = torch.randint(0, 256, (BATCH, POS), generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def hf_run(self, tokens, attention_mask=None):
        """HF output, per sparse layer the router's (logits, weights, indices), per indexer its top-k."""
        routed, topk, handles = [], {}, []
        for l, layer in enumerate(self.hf.model.layers):
            if hasattr(layer.mlp, "gate"):
                handles.append(layer.mlp.gate.register_forward_hook(lambda m, i, o: routed.append(o)))
            if getattr(layer.self_attn, "indexer", None) is not None:
                handles.append(layer.self_attn.indexer.register_forward_hook(
                    lambda m, i, o, l=l: topk.__setitem__(l, o)))
        try:
            out = self.hf(tokens, attention_mask=attention_mask)
        finally:
            for h in handles:
                h.remove()
        return out, routed, topk


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    cache: dict[str, Pair] = {}

    def get(variant: str) -> Pair:
        if variant not in cache:
            cache[variant] = Pair(tmp_path_factory, variant)
        return cache[variant]

    return get


def kept_sets(topk: torch.Tensor, n_pos: int) -> list[list[set]]:
    """Per row and query, the set of visible kept keys (HF lists invisible keys too; ours -1)."""
    return [[{int(t) for t in topk[b, q] if 0 <= int(t) <= q} for q in range(n_pos)] for b in range(topk.shape[0])]


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_router_and_kept_keys_match(pairs, variant):
    p = pairs(variant)
    m, cfg = p.model, p.model.cfg
    assert cfg.dsa and cfg.index_topk < POS
    out, routed, hf_topk = p.hf_run(p.tokens)
    with torch.no_grad():
        logits, cache = m.run_with_cache(p.tokens)
    assert (out.logits - logits).abs().max().item() < ATOL
    assert out.logits.abs().max().item() > 1.0
    # router: logits, chosen expert sets, weights
    assert len(routed) == len(cfg.moe_layers) > 0
    for (hf_logits, hf_w, hf_idx), l in zip(routed, cfg.moe_layers):
        assert (hf_logits.view(BATCH, POS, -1) - cache[f"blocks.{l}.mlp.hook_router_logits"]).abs().max() < ATOL
        idx = cache[f"blocks.{l}.mlp.hook_expert_indices"].reshape(-1, cfg.top_k)
        assert torch.equal(hf_idx.sort(-1).values, idx.sort(-1).values), f"layer {l}: chosen experts differ"
    # the indexer: the same kept keys per query, and it really drops keys
    indexer_layers = [l for l in range(cfg.n_layers) if l not in cfg.index_shared_layers]
    assert sorted(hf_topk) == indexer_layers
    for l in range(cfg.n_layers):
        ours = cache[f"blocks.{l}.attn.hook_index_topk"]
        assert ours.shape == (BATCH, POS, cfg.index_topk) and ours.dtype == torch.int64
        source = max(i for i in indexer_layers if i <= l)  # a shared layer uses the last indexer's choice
        assert kept_sets(ours, POS) == kept_sets(hf_topk[source], POS), f"layer {l}"
        assert ((ours >= 0).sum(-1) == torch.arange(POS).clamp(max=cfg.index_topk - 1) + 1).all()
    assert cfg.index_topk < POS  # queries >= index_topk see more keys than they keep


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pattern_attends_only_to_kept_keys(pairs, variant):
    """Independent check of the mask: the attention probabilities are non-zero exactly at the kept keys."""
    p = pairs(variant)
    m = p.model
    with torch.no_grad():
        _, cache = m.run_with_cache(p.tokens)
    for l in range(m.cfg.n_layers):
        topk = cache[f"blocks.{l}.attn.hook_index_topk"]
        kept = torch.zeros(BATCH, POS, POS + 1, dtype=torch.bool).scatter_(-1, topk.clamp(min=-1) % (POS + 1), True)
        kept = kept[..., :POS]
        pattern = cache[f"blocks.{l}.attn.hook_pattern"]  # [batch, head, q, k]
        assert torch.equal(pattern > 0, kept[:, None].expand_as(pattern))


def test_indexer_scores_recomputed_from_hooks(pairs):
    """``indexer.hook_scores`` equals sum_h w_h relu(q_h . k_t / sqrt(D)) from the hooked q, k and w,
    -inf at future keys, and ``hook_index_topk`` is its top-k."""
    p = pairs("v32")
    m = p.model
    with torch.no_grad():
        _, cache = m.run_with_cache(p.tokens)
    d = m.cfg.index_head_dim
    for l in range(m.cfg.n_layers):
        q, k = cache[f"blocks.{l}.attn.indexer.hook_q"], cache[f"blocks.{l}.attn.indexer.hook_k"]
        w = cache[f"blocks.{l}.attn.indexer.hook_weights"]
        want = torch.einsum("bqh,bqht->bqt", w, torch.relu(torch.einsum("bqhd,btd->bqht", q, k) / d**0.5))
        future = torch.ones(POS, POS, dtype=torch.bool).triu(1)
        want = want.masked_fill(future, float("-inf"))
        got = cache[f"blocks.{l}.attn.indexer.hook_scores"]
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        assert (got - want)[~future.expand_as(got)].abs().max() < 1e-5
        top = want.topk(m.cfg.index_topk, dim=-1)
        ours = cache[f"blocks.{l}.attn.hook_index_topk"]
        expect = torch.where(torch.isinf(top.values), -1, top.indices)
        assert kept_sets(ours, POS) == kept_sets(expect, POS)


# ------------------------------------------------------------------------------------ negative controls
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dense_attention_is_detected(pairs, variant):
    """index_topk >= the sequence keeps every key: plain MLA. It differs from the sparse result by
    construction (dropped keys have positive softmax weight), so parity above sees the indexer."""
    p = pairs(variant)
    dense = HookedMoETransformer.from_pretrained(p.dir, index_topk=POS)
    with torch.no_grad():
        ref = p.hf(p.tokens).logits
        got, cache = dense.run_with_cache(p.tokens, names_filter=lambda n: n.endswith("hook_index_topk"))
        # the first index_topk positions keep every earlier key anyway: equal there
        early = slice(0, p.model.cfg.index_topk)
        assert (ref[:, early] - got[:, early]).abs().max() < ATOL
        assert (ref - got).abs().max() > 1e-2
    assert all(((cache[k] >= 0).sum(-1) == torch.arange(1, POS + 1)).all() for k in cache.keys())


def test_wrong_indexer_rope_is_detected(pairs):
    """GLM-5's indexer rotates interleaved pairs; the half-split rotation selects other keys."""
    p = pairs("glm5")
    wrong = HookedMoETransformer.from_pretrained(p.dir, index_rope="half")
    with torch.no_grad():
        _, a = p.model.run_with_cache(p.tokens, names_filter=lambda n: n.endswith("hook_index_topk"))
        logits, b = wrong.run_with_cache(p.tokens, names_filter=lambda n: n.endswith("hook_index_topk"))
    assert any(kept_sets(a[k], POS) != kept_sets(b[k], POS) for k in a.keys())
    assert (p.hf(p.tokens).logits - logits).abs().max() > 1e-2


def test_shared_layer_reuses_the_previous_indexer(pairs):
    p = pairs("glm5")
    m = p.model
    assert m.cfg.index_shared_layers == [2] and not hasattr(m.blocks[2].attn, "indexer")
    with torch.no_grad():
        _, cache = m.run_with_cache(p.tokens)
    assert torch.equal(cache["blocks.2.attn.hook_index_topk"], cache["blocks.1.attn.hook_index_topk"])
    assert not torch.equal(cache["blocks.3.attn.hook_index_topk"], cache["blocks.1.attn.hook_index_topk"])


def test_sharing_pattern_from_index_topk_pattern(pairs, tmp_path):
    """Without indexer_types, GLM-5 derives the sharing from index_topk_pattern, as GlmMoeDsaConfig."""
    p = pairs("glm5")
    import json
    import shutil

    shutil.copytree(p.dir, tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg.pop("indexer_types")
    cfg["index_topk_pattern"] = "FFSF"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    m = HookedMoETransformer.from_pretrained(tmp_path / "ckpt")
    assert m.cfg.index_shared_layers == [2]
    with torch.no_grad():
        assert (m(p.tokens) - p.hf(p.tokens).logits).abs().max() < ATOL
    # and the freq/offset schedule: layer i full iff max(i - offset + 1, 0) % freq == 0
    base = {"architectures": ["GlmMoeDsaForCausalLM"], "num_hidden_layers": 6, "hidden_size": 64,
            "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8, "n_group": 1}
    assert translate_config({**base, "index_topk_freq": 2, "index_skip_topk_offset": 2}).index_shared_layers == [2, 4]
    assert translate_config(base).index_shared_layers == []


# ------------------------------------------------------------------------------------ hooks and edits
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_hook_has_its_declared_shape(pairs, variant):
    m = pairs(variant).model
    with moelens.check_shapes(m), torch.no_grad():
        _, cache = m.run_with_cache(pairs(variant).tokens)
    assert set(cache.keys()) == set(m.hook_dict)
    assert cache["blocks.0.attn.indexer.hook_scores"].shape == (BATCH, POS, POS)
    assert cache["blocks.0.attn.indexer.hook_q"].shape == (BATCH, POS, m.cfg.index_n_heads, m.cfg.index_head_dim)
    assert cache["blocks.0.attn.indexer.hook_k"].shape == (BATCH, POS, m.cfg.index_head_dim)


def test_editing_the_kept_keys_changes_attention(pairs):
    """Forcing every query to keep only key 0 (an attention sink) makes each head's output the value
    of position 0; hf-free check through hook_z and hook_v."""
    p = pairs("v32")
    m = p.model
    l = 1
    forced = torch.full((BATCH, POS, m.cfg.index_topk), -1, dtype=torch.long)
    forced[..., 0] = 0
    with torch.no_grad():
        _, cache = m.run_with_cache(
            p.tokens, fwd_hooks=[(f"blocks.{l}.attn.hook_index_topk", lambda t, hook: forced.clone())])
    z, v = cache[f"blocks.{l}.attn.hook_z"], cache[f"blocks.{l}.attn.hook_v"]
    assert (z - v[:, :1].expand_as(z)).abs().max() < 1e-5
    with pytest.raises(IndexError, match="hook_index_topk"):
        with torch.no_grad():
            m.run_with_hooks(p.tokens, fwd_hooks=[(f"blocks.{l}.attn.hook_index_topk",
                                                   lambda t, hook: torch.full_like(t, POS))])


def test_editing_the_scores_changes_the_selection(pairs):
    p = pairs("v32")
    m = p.model
    l = 1

    def prefer_early(scores, hook):  # rank keys by position, earliest first
        return torch.where(torch.isinf(scores), scores, -torch.arange(POS, dtype=scores.dtype))

    with torch.no_grad():
        _, cache = m.run_with_cache(p.tokens, fwd_hooks=[(f"blocks.{l}.attn.indexer.hook_scores", prefer_early)])
    topk = cache[f"blocks.{l}.attn.hook_index_topk"]
    k = m.cfg.index_topk
    assert torch.equal(topk[:, -1], torch.arange(k).expand(BATCH, k))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_left_padded_batch_matches_at_real_positions(pairs, variant):
    p = pairs(variant)
    mask = torch.ones(BATCH, POS, dtype=torch.long)
    mask[0, :5] = 0
    out, _, _ = p.hf_run(p.tokens, attention_mask=mask)
    with torch.no_grad():
        ours, cache = p.model.run_with_cache(p.tokens, attention_mask=mask)
    real = mask.bool()
    assert (out.logits[real] - ours[real]).abs().max().item() < ATOL
    # padding keys are never kept
    assert not (cache["blocks.1.attn.hook_index_topk"][0, 5:].unsqueeze(-1) == torch.arange(5)).any()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_prefix_recomputation_matches_full_sequence(pairs, variant):
    """What the suffix engine does: positions p0.. of one layer from the cached keys, values and
    indexer keys of the earlier positions (GLM-5 shared layers: with the carried top-k)."""
    p = pairs(variant)
    m, p0 = p.model, 7
    with torch.no_grad():
        _, cache = m.run_with_cache(p.tokens)
        for layer in range(m.cfg.n_layers):
            attn = m.blocks[layer].attn
            x = cache[f"blocks.{layer}.ln1.hook_normalized"]
            prefix = tuple(cache[f"blocks.{layer}.attn.{h}"][:, :p0] for h in attn.prefix_hooks)
            ctx = m.attention_context(POS - p0, q_offset=p0)
            if attn.shares_index:
                ctx.carry.index_topk = cache[f"blocks.{layer - 1}.attn.hook_index_topk"][:, p0:]
            full = cache[f"blocks.{layer}.hook_attn_out"][:, p0:]
            assert (attn(x[:, p0:], ctx, kv_prefix=prefix) - full).abs().max().item() < 1e-5


def test_shared_layer_without_a_previous_indexer_fails_loudly(pairs):
    p = pairs("glm5")
    m = p.model
    with torch.no_grad():
        resid = m(p.tokens, stop_at_layer=2)
        with pytest.raises(ValueError, match="reuses the top-k"):
            m(resid, start_at_layer=2)


# ---------------------------------------------------------------------------------- config translation
@pytest.mark.parametrize("cls, module", [("DeepseekV32Config", "deepseek_v32"), ("GlmMoeDsaConfig", "glm_moe_dsa")])
def test_class_defaults_match_transformers(cls, module):
    import importlib

    import transformers

    defaults = importlib.import_module(f"moelens.architectures.{module}").DEFAULTS
    hf = getattr(transformers, cls)().to_dict()
    checked = 0
    for key, value in defaults.items():
        if key in ("rope_parameters", "rope_theta", "rope_scaling", "mlp_layer_types", "layer_types",
                   "indexer_types", "index_topk_pattern", "index_topk_freq", "index_skip_topk_offset"):
            continue  # derived in __post_init__ (checked through translate_config below)
        if key in hf:
            assert hf[key] == value, key
            checked += 1
    assert checked > 20
    cfg = translate_config({**hf, "architectures": [getattr(transformers, cls).__name__.replace("Config", "ForCausalLM")]})
    assert cfg.moe_layers == list(range(hf["first_k_dense_replace"], hf["num_hidden_layers"]))


@pytest.mark.parametrize(
    "arch, field, value",
    [("DeepseekV32ForCausalLM", "q_lora_rank", None), ("DeepseekV32ForCausalLM", "scoring_func", "softmax"),
     ("DeepseekV32ForCausalLM", "layer_types", ["full_attention"] * 61), ("GlmMoeDsaForCausalLM", "mlp_bias", True),
     ("GlmMoeDsaForCausalLM", "indexer_types", ["shared"] + ["full"] * 77),
     ("DeepseekV32ForCausalLM", "index_head_dim", 32), ("DeepseekV32ForCausalLM", "rope_interleave", False),
     ("GlmMoeDsaForCausalLM", "indexer_rope_interleave", False)],
)
def test_unsupported_values_raise_naming_the_field(arch, field, value):
    with pytest.raises(UnsupportedConfigError, match=field):
        translate_config({"architectures": [arch], field: value})


# ---------------------------------------------------------------------------------------------- tracing
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_restoring_recomputes_the_selection_and_the_engine_agrees(pairs, variant):
    """Restoring ``hook_resid_post`` of layer 0 at the subject changes which keys later queries keep
    in later layers (the selection is recomputed, never frozen), computed with plain hooks; the
    suffix engine (indexer keys of earlier positions from the corrupted run, GLM-5's shared top-k
    carried) gives trace_layers' scores equal to whole patched forwards."""
    from moelens import FactCase
    from moelens.testing import toy_tokenizer
    from moelens.tracing.trace import prepare

    p = pairs(variant)
    m = p.model
    m.tokenizer = toy_tokenizer(256)
    case = FactCase("w5 w9 w14 w3 w77 w21 w8 w60 w33 w12 w90", "w14 w3", "w40", "w41")
    setup = prepare(m, case, seed=0, n_samples=2)
    T = setup.tokens.shape[1]
    assert T > m.cfg.index_topk + 3
    # plain hooks: the corrupted runs, then the same with layer 0's clean output restored at the
    # subject's last token; the later layers' selections move
    subj = setup.tokenized.subject_positions
    tokens = setup.tokens.expand(setup.n_samples, -1)

    def noise(act, hook):
        act = act.clone()
        act[:, subj] = act[:, subj] + setup.noise.to(act.dtype)
        return act

    p0 = subj[-1]
    clean_out = setup.clean_cache["blocks.0.hook_resid_post"][:, p0]

    def restore(act, hook):
        act = act.clone()
        act[:, p0] = clean_out
        return act

    names = lambda n: n.endswith("hook_index_topk")
    with torch.no_grad():
        _, corrupted = m.run_with_cache(tokens, names_filter=names, fwd_hooks=[("hook_embed", noise)])
        _, restored = m.run_with_cache(tokens, names_filter=names, fwd_hooks=[
            ("hook_embed", noise), ("blocks.0.hook_resid_post", restore)])
    moved = [l for l in range(1, m.cfg.n_layers)
             if kept_sets(corrupted[f"blocks.{l}.attn.hook_index_topk"], T)
             != kept_sets(restored[f"blocks.{l}.attn.hook_index_topk"], T)]
    assert moved, "restoring one position never changed a later selection: the test cannot see a frozen selection"
    fast = moelens.trace_layers(m, setup, kind="resid", progress=False)
    ref = moelens.trace_layers(m, setup, kind="resid", engine="full", progress=False)
    assert (fast.scores - ref.scores).abs().max() < 1e-4
    assert (ref.scores - ref.corrupted).abs().max() > 1e-3
    fast = moelens.trace_layers(m, setup, kind="mlp", window=3, progress=False)
    ref = moelens.trace_layers(m, setup, kind="mlp", window=3, engine="full", progress=False)
    assert (fast.scores - ref.scores).abs().max() < 1e-4


def test_replace_freezes_a_selection(pairs):
    """The documented way to freeze a layer's selection: patching.Replace of hook_index_topk from
    another run's cache; that run's kept keys are then used (checked through the pattern)."""
    from moelens import patching as P

    p = pairs("v32")
    m = p.model
    other = torch.randint(0, 256, (BATCH, POS), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        _, src = m.run_with_cache(other, names_filter=lambda n: n.endswith("hook_index_topk"))
        hooks = P.to_hooks(m, [P.Replace("blocks.1.attn.hook_index_topk", source=src)])
        _, cache = m.run_with_cache(p.tokens, fwd_hooks=hooks)
    frozen = cache["blocks.1.attn.hook_index_topk"]
    assert torch.equal(frozen, src["blocks.1.attn.hook_index_topk"])
    kept = torch.zeros(BATCH, POS, POS + 1, dtype=torch.bool).scatter_(-1, frozen % (POS + 1), True)[..., :POS]
    assert torch.equal(cache["blocks.1.attn.hook_pattern"] > 0, kept[:, None].expand(-1, m.cfg.n_heads, -1, -1))
