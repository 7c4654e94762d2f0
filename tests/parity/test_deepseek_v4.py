"""DeepSeek-V4 parity against transformers 5.25 (fp32, CPU, eager: transformers' only V4 path) on a
tiny random checkpoint: 3 residual streams, sliding window 8, a CSA layer (rate 4, the indexer keeps
2 entries) and an HCA layer (rate 8), one hash-routed layer, 32-token sequences so that the window,
the compression and the indexer all select (checked).
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
BATCH, POS = 2, 32


class Pair:
    def __init__(self, tmp_path_factory, fused: bool = False):
        self.dir = tmp_path_factory.mktemp("v4_fused" if fused else "v4")
        self.hf = save_tiny("deepseek_v4", self.dir, fused=fused)
        self.model = HookedMoETransformer.from_pretrained(self.dir)
        self.tokens = torch.randint(0, 256, (BATCH, POS), generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def hf_run(self, tokens, attention_mask=None):
        """HF output, per layer the router's (logits, weights, indices) and per CSA layer its indexer's picks."""
        routed, picks, handles = {}, {}, []
        for l, layer in enumerate(self.hf.model.layers):
            handles.append(layer.mlp.gate.register_forward_hook(lambda m, i, o, l=l: routed.__setitem__(l, o)))
            comp = layer.self_attn.compressor
            if comp is not None and hasattr(comp, "indexer"):
                handles.append(comp.indexer.register_forward_hook(lambda m, i, o, l=l: picks.__setitem__(l, o)))
        try:
            out = self.hf(tokens, attention_mask=attention_mask)
        finally:
            for h in handles:
                h.remove()
        return out, routed, picks


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return Pair(tmp_path_factory)


def _sets(t: torch.Tensor) -> list:
    return [sorted(int(i) for i in row if i >= 0) for row in t.reshape(-1, t.shape[-1])]


# ---------------------------------------------------------------------------------------------- parity
def test_logits_router_and_selections_match(pair):
    m, cfg = pair.model, pair.model.cfg
    assert cfg.compress_kinds == ("none", "csa", "hca", "csa") and cfg.hash_moe_layers == [0] and cfg.hc_mult == 3
    out, routed, picks = pair.hf_run(pair.tokens)
    with torch.no_grad():
        logits, cache = m.run_with_cache(pair.tokens)
    assert (out.logits - logits).abs().max().item() < ATOL
    assert out.logits.abs().max().item() > 1.0
    for l in range(cfg.n_layers):
        hf_logits, hf_w, hf_idx = routed[l]
        assert (hf_logits.view(BATCH, POS, -1) - cache[f"blocks.{l}.mlp.hook_router_logits"]).abs().max() < ATOL
        idx = cache[f"blocks.{l}.mlp.hook_expert_indices"]
        assert _sets(hf_idx) == _sets(idx), f"layer {l}: chosen experts differ"
        w = cache[f"blocks.{l}.mlp.hook_expert_weights"].reshape(-1, cfg.top_k)
        order_hf, order = hf_idx.sort(-1).indices, idx.reshape(-1, cfg.top_k).sort(-1).indices
        assert (hf_w.gather(-1, order_hf) - w.gather(-1, order)).abs().max() < ATOL
    # hash routing: layer 0's experts are the table rows of the tokens, not the learned top-k
    table = m.blocks[0].mlp.router.tid2eid
    assert torch.equal(cache["blocks.0.mlp.hook_expert_indices"], table[pair.tokens])
    learned = cache["blocks.0.mlp.hook_router_scores"].topk(cfg.top_k).indices
    assert _sets(learned) != _sets(table[pair.tokens])
    # CSA: the same kept entries as transformers' indexer, and it drops visible entries
    for l in (1, 3):
        ours = cache[f"blocks.{l}.attn.hook_index_topk"]
        assert _sets(ours) == _sets(picks[l]), f"layer {l}"
        n_visible = (torch.arange(POS) + 1) // cfg.csa_rate
        kept = (ours >= 0).sum(-1)
        assert (kept == n_visible.clamp(max=cfg.index_topk)).all() and (n_visible > cfg.index_topk).any()


def test_fused_layout_loads_identically(pair, tmp_path_factory):
    fused = Pair(tmp_path_factory, fused=True).model
    ref = pair.model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in fused.state_dict().items())


def test_streams_mixing_and_compression_are_real(pair):
    """The hooks show several distinct streams, doubly-stochastic mixing matrices, a window that
    drops keys and compressed entries that queries use."""
    m, cfg = pair.model, pair.model.cfg
    with torch.no_grad():
        _, cache = m.run_with_cache(pair.tokens)
    streams = cache["blocks.1.hook_resid_post"]
    assert streams.shape == (BATCH, POS, cfg.hc_mult, cfg.d_model)
    assert (streams[:, :, 0] - streams[:, :, 1]).abs().max() > 1e-2
    comb = cache["blocks.1.attn_hc.hook_comb"]
    assert comb.shape == (BATCH, POS, 3, 3)
    assert (comb.sum(-1) - 1).abs().max() < 1e-3 and (comb.sum(-2) - 1).abs().max() < 1e-3
    for l in range(cfg.n_layers):
        pattern = cache[f"blocks.{l}.attn.hook_pattern"]  # [b, h, q, window keys ++ entries]
        window = pattern[..., :POS]
        q, k = torch.arange(POS)[:, None], torch.arange(POS)[None]
        outside = (k <= q - cfg.sliding_window) | (k > q)
        assert (window[..., outside] == 0).all() and (window[..., ~outside] > 0).all()
        if cfg.compress_kinds[l] != "none":
            entries = pattern[..., POS:]
            assert entries.shape[-1] == POS // (cfg.csa_rate if cfg.compress_kinds[l] == "csa" else cfg.hca_rate)
            assert entries.sum(-1)[..., -1].min() > 1e-4  # the last query attends to compressed entries


# ------------------------------------------------------------------------------------ negative controls
@pytest.mark.parametrize("override", [dict(sliding_window=POS), dict(index_topk=POS), dict(compress_rope_theta=1e4),
                                      dict(hc_sinkhorn_iters=1)],
                         ids=["no_window", "dense_csa", "main_rope_on_compressed_layers", "no_sinkhorn"])
def test_negative_controls_are_detected(pair, override):
    """Each knob changes the computation by construction: a window as long as the sequence keeps keys
    it drops; index_topk >= entries keeps entries the indexer drops; the main RoPE base on the
    compressed layers rotates their queries and entries by other angles; one Sinkhorn step leaves the
    mixing matrices off the doubly-stochastic set."""
    wrong = HookedMoETransformer.from_pretrained(pair.dir, **override)
    with torch.no_grad():
        diff = (pair.hf(pair.tokens).logits - wrong(pair.tokens)).abs().max().item()
    assert diff > 1e-3, override  # parity holds to 2e-6


# ------------------------------------------------------------------------------------ hooks and edits
def test_every_hook_has_its_declared_shape(pair):
    m = pair.model
    with moelens.check_shapes(m), torch.no_grad():
        _, cache = m.run_with_cache(pair.tokens)
    assert set(cache.keys()) == set(m.hook_dict)
    assert cache["blocks.1.attn.compressor.hook_kv"].shape == (BATCH, POS // 4, m.cfg.d_head)
    assert cache["blocks.2.attn.compressor.hook_kv"].shape == (BATCH, POS // 8, m.cfg.d_head)
    assert cache["blocks.1.attn.hook_index_topk"].shape == (BATCH, POS, m.cfg.index_topk)
    assert cache["hc_head.hook_pre"].shape == (BATCH, POS, 3)


def test_editing_the_mixing_matrix_propagates(pair):
    """Replacing comb by the identity makes stream k's carried part exactly input stream k: checked
    against the hooked post weights and attention output."""
    m = pair.model
    eye = torch.eye(3).expand(BATCH, POS, 3, 3).clone()
    with torch.no_grad():
        _, cache = m.run_with_cache(pair.tokens, fwd_hooks=[("blocks.1.attn_hc.hook_comb", lambda t, hook: eye)])
    want = (cache["blocks.1.attn_hc.hook_post"].unsqueeze(-1) * cache["blocks.1.hook_attn_out"].unsqueeze(-2)
            + cache["blocks.1.hook_resid_pre"])
    assert (cache["blocks.1.hook_resid_mid"] - want).abs().max() < 1e-5


def test_forced_hash_routing_and_csa_selection(pair):
    m = pair.model
    forced = torch.tensor([3, 5]).expand(BATCH, POS, 2).clone()
    keep_first = torch.full((BATCH, POS, m.cfg.index_topk), -1, dtype=torch.long)
    keep_first[:, 3:, 0] = 0  # every query from position 3 keeps only entry 0
    with torch.no_grad():
        _, cache = m.run_with_cache(pair.tokens, fwd_hooks=[
            ("blocks.0.mlp.hook_expert_indices", lambda t, hook: forced),
            ("blocks.1.attn.hook_index_topk", lambda t, hook: keep_first)])
    assert torch.equal(cache["blocks.0.mlp.hook_expert_indices"], forced)
    entries = cache["blocks.1.attn.hook_pattern"][..., POS:]
    assert (entries[..., 1:] == 0).all() and (entries[:, :, 3:, 0] > 0).all()


def test_generate_matches_transformers(pair):
    """No generation cache for the compressed attention: moelens recomputes the sequence (with a warning)."""
    ids = pair.tokens[:, :20]
    with torch.no_grad():
        want = pair.hf.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = pair.model.generate(ids, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False,
                              use_past_kv_cache=False)
    assert torch.equal(got, want)
    with pytest.warns(UserWarning, match="CompressedAttention have no generation cache"):
        cached = pair.model.generate(ids, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False)
    assert torch.equal(cached, want)


# ---------------------------------------------------------------------------------- config translation
def test_class_defaults_match_transformers():
    import transformers

    from moelens.architectures.deepseek_v4 import DEFAULTS

    hf = transformers.DeepseekV4Config().to_dict()
    checked = 0
    for key, value in DEFAULTS.items():
        if key in hf and key not in ("layer_types", "mlp_layer_types", "compress_rates", "rope_parameters",
                                     "partial_rotary_factor", "qk_rope_head_dim"):
            assert hf[key] == value, key
            checked += 1
    assert checked > 25
    cfg = translate_config({**hf, "architectures": ["DeepseekV4ForCausalLM"]})
    assert cfg.compress_kinds == tuple(["hca", "hca"] + ["csa" if i % 2 else "hca" for i in range(41)])
    assert cfg.hash_moe_layers == [0, 1, 2] and cfg.rotary_dim == 64 and cfg.compress_yarn is None
    legacy = translate_config({"architectures": ["DeepseekV4ForCausalLM"], "num_hidden_layers": 4,
                               "compress_ratios": [0, 4, 128, 4, 0], "num_hash_layers": 1, "qk_rope_head_dim": 32,
                               "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                                                "beta_fast": 32, "beta_slow": 1}})
    assert legacy.compress_kinds == ("none", "csa", "hca", "csa") and legacy.hash_moe_layers == [0]
    assert legacy.rotary_dim == 32 and legacy.compress_yarn["attention_factor"] == 1.0


@pytest.mark.parametrize("field, value", [("scoring_func", "softmax"), ("num_key_value_heads", 2),
                                          ("n_shared_experts", 2), ("layer_types", ["full_attention"] * 43)])
def test_unsupported_values_raise_naming_the_field(field, value):
    with pytest.raises(UnsupportedConfigError, match=field):
        translate_config({"architectures": ["DeepseekV4ForCausalLM"], field: value})


# ---------------------------------------------------------------------------------------------- tracing
def _manual(m, setup, hook_name, p, source_value, add=False):
    """Plain TransformerLens hooks: the corrupted runs (noise on the subject's embeddings) with
    ``hook_name`` at position ``p`` replaced by (or, with ``add``, incremented by) ``source_value``;
    the mean logit difference at the last position."""
    tc = setup.tokenized
    tokens = setup.tokens.expand(setup.n_samples, -1)

    def noise(act, hook):
        act = act.clone()
        act[:, tc.subject_positions] = act[:, tc.subject_positions] + setup.noise.to(act.dtype)
        return act

    def patch(act, hook):
        act = act.clone()
        act[:, p] = act[:, p] + source_value if add else source_value.expand_as(act[:, p])
        return act

    with torch.no_grad():
        logits = m.run_with_hooks(tokens, fwd_hooks=[("hook_embed", noise), (hook_name, patch)])
    last = logits[:, -1]
    return float((last[:, tc.target_true_id] - last[:, tc.target_foil_id]).mean())


@pytest.fixture(scope="module")
def traced(pair):
    from moelens import FactCase
    from moelens.testing import toy_tokenizer
    from moelens.tracing.trace import prepare

    m = pair.model
    m.tokenizer = toy_tokenizer(256)
    case = FactCase(" ".join(f"w{i}" for i in (5, 9, 14, 3, 77, 21, 8, 60, 33, 12, 90, 41, 17, 66, 23, 52, 7)),
                    "w14 w3", "w40", "w41")
    return m, prepare(m, case, seed=0, n_samples=2)


@pytest.mark.parametrize("kind, hook", [("resid", "hook_resid_post"), ("mlp", "hook_mlp_out"), ("attn", "hook_attn_out")])
def test_trace_layers_restores_what_the_docs_say(traced, kind, hook):
    """kind='resid' restores all streams of hook_resid_post at (l, p); 'mlp'/'attn' the block output
    before the hyper-connection spreads it (the corrupted run's post weights then spread it). The
    engine (resuming V4 at the layer, all positions) equals engine='full' and the plain-hook
    computation."""
    m, setup = traced
    T = setup.tokens.shape[1]
    assert T >= 2 * m.cfg.hca_rate  # compressed entries exist
    r = moelens.trace_layers(m, setup, kind=kind, progress=False)
    full = moelens.trace_layers(m, setup, kind=kind, engine="full", progress=False)
    assert (r.scores - full.scores).abs().max() < 1e-4
    assert (r.scores - r.corrupted).abs().max() > 1e-3
    for l, p in [(0, setup.tokenized.subject_positions[-1]), (2, T - 1), (1, 3)]:
        clean = setup.clean_cache[f"blocks.{l}.{hook}"][:, p]
        want = _manual(m, setup, f"blocks.{l}.{hook}", p, clean)
        assert abs(float(r.scores[l, p]) - want) < 1e-4, (l, p)
    if kind == "resid":
        assert r.scores[-1, -1] == pytest.approx(r.clean, abs=1e-4)  # all streams of the last position restored


def test_trace_layers_window_restores_consecutive_layers(traced):
    m, setup = traced
    r = moelens.trace_layers(m, setup, kind="mlp", window=3, positions="last", progress=False)
    T = setup.tokens.shape[1]
    tc = setup.tokenized
    tokens = setup.tokens.expand(setup.n_samples, -1)

    def noise(act, hook):
        act = act.clone()
        act[:, tc.subject_positions] = act[:, tc.subject_positions] + setup.noise.to(act.dtype)
        return act

    def restore(layer):
        def fn(act, hook):
            act = act.clone()
            act[:, T - 1] = setup.clean_cache[f"blocks.{layer}.hook_mlp_out"][:, T - 1]
            return act
        return fn

    with torch.no_grad():  # row l=1: layers 0..2 (ROME's rule for w=3)
        logits = m.run_with_hooks(tokens, fwd_hooks=[("hook_embed", noise)]
                                  + [(f"blocks.{j}.hook_mlp_out", restore(j)) for j in (0, 1, 2)])
    want = float((logits[:, -1, tc.target_true_id] - logits[:, -1, tc.target_foil_id]).mean())
    assert abs(float(r.scores[1, 0]) - want) < 1e-4


def test_trace_experts_adds_the_expert_delta_to_the_moe_output(traced):
    m, setup = traced
    layer, T = 2, setup.tokens.shape[1]
    r = moelens.trace_experts(m, setup, layer, progress=False)
    e = int(setup.clean_cache[f"blocks.{layer}.mlp.hook_expert_indices"][0, -1, 0])
    delta = (setup.clean_cache.expert_contribution(layer, e)[:, T - 1]
             - setup.corrupted_cache.expert_contribution(layer, e)[:, T - 1])
    want = _manual(m, setup, f"blocks.{layer}.hook_mlp_out", T - 1, delta, add=True)
    assert abs(float(r.scores[e]) - want) < 1e-4


def test_engine_sweeps_equal_whole_forwards(traced):
    """The engine resumes V4 at the patched layer over all positions (the streams and the
    whole-window compression need them): the expert grid and coalition scores equal whole patched
    forwards, and its resid_post deltas of d_model width are MoE-output deltas spread by ``post``."""
    m, setup = traced
    grid = moelens.trace_expert_grid(m, setup, progress=False)
    for layer in (0, 2):
        ref = moelens.trace_experts(m, setup, layer, engine="full", progress=False)
        assert (grid.scores[layer] - ref.scores).abs().max() < 1e-4
    a = moelens.attribute_experts(m, setup, progress=False)
    assert torch.isfinite(a.scores).all()


# ------------------------------------------------------------------------ decompositions and DLA
def test_decompose_resid_over_streams(pair):
    """Components carried through the cached mixing weights: the stream-resolved ones sum to the
    streams entering a block, the final ones to the collapsed residual the final norm reads, and
    their logit attributions to the logits (an independent check: the model's own forward)."""
    m = pair.model
    with torch.no_grad():
        logits, cache = m.run_with_cache(pair.tokens)
    comps, labels = cache.decompose_resid(return_labels=True, expert_level=True)
    assert labels[:3] == ["embed", "0_attn_out", "L0E0"] and "L3_shared" in labels
    assert comps.shape == (len(labels), BATCH, POS, m.cfg.d_model)
    assert (comps.sum(0) - cache["hc_head.hook_collapsed"]).abs().max() < 1e-4
    for l, mlp_input, hook in ((2, False, "hook_resid_pre"), (2, True, "hook_resid_mid"), (0, False, "hook_resid_pre")):
        streams = cache.decompose_resid(layer=l, mlp_input=mlp_input)
        assert streams.shape[-2:] == (m.cfg.hc_mult, m.cfg.d_model)
        assert (streams.sum(0) - cache[f"blocks.{l}.{hook}"]).abs().max() < 1e-4
    t = pair.tokens[:, -1]
    attrs = cache.logit_attrs(cache.decompose_resid(pos_slice=-1, expert_level=True), tokens=t, pos_slice=-1)
    assert (attrs.sum(0) - logits[torch.arange(BATCH), -1, t]).abs().max() < 1e-4
    # the gains are not trivial: a component's final contribution is not its raw vector
    raw = cache["blocks.3.hook_attn_out"]
    assert (comps[labels.index("3_attn_out")] - raw).abs().max() > 1e-3
    with pytest.raises(ValueError, match="several residual streams"):
        cache.accumulated_resid(apply_ln=True)
    with pytest.raises(ValueError, match="several residual streams"):
        cache.decompose_resid(layer=2, apply_ln=True)


def test_router_attribution_over_streams(pair):
    """The router of a V4 layer reads the streams collapsed by ffn_hc's pre weights: the components
    (carried through the cached mixing) sum to the router logits."""
    from moelens import analysis as A

    m = pair.model
    with torch.no_grad():
        _, cache = m.run_with_cache(pair.tokens)
    for l in m.cfg.moe_layers:
        ra = A.router_attribution(m, cache, l)
        assert (ra.values.sum(0) - cache[f"blocks.{l}.mlp.hook_router_logits"].float()).abs().max() < 1e-4
        assert ra.labels[0] == "embed" and f"{l}_attn_out" in ra.labels


def test_bf16_is_bit_identical_to_transformers(pair):
    """In bf16 transformers keeps the hyper-connections, norms, sinks, position biases and the
    correction bias in fp32 and casts the RoPE tables to bf16; moelens does the same: equal logits
    and experts, not merely close."""
    import transformers

    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(pair.dir, dtype=torch.bfloat16).eval()
    m = HookedMoETransformer.from_pretrained(pair.dir, dtype=torch.bfloat16)
    assert m.blocks[0].ln1.w.dtype == torch.float32 and m.blocks[0].attn_hc.fn.dtype == torch.float32
    assert m.blocks[1].mlp.router.b_correction.dtype == torch.float32 and m.blocks[1].mlp.router.W_router.dtype == torch.bfloat16
    with torch.no_grad():
        want = hf(pair.tokens).logits
        got, cache = m.run_with_cache(pair.tokens, names_filter=lambda n: n.endswith("hook_expert_indices"))
    assert torch.equal(got, want)


def test_left_padded_batch_matches_at_real_positions(pair):
    mask = torch.ones(BATCH, POS, dtype=torch.long)
    mask[0, :5] = 0
    out, _, _ = pair.hf_run(pair.tokens, attention_mask=mask)
    with torch.no_grad():
        ours = pair.model(pair.tokens, attention_mask=mask)
    real = mask.bool()
    assert (out.logits[real] - ours[real]).abs().max().item() < ATOL


def test_hook_order_is_execution_order(pair):
    names = [n for n in pair.model.hook_dict if n.startswith("blocks.1.")]
    order = ["hook_resid_pre", "attn_hc.hook_pre", "attn_hc.hook_post", "attn_hc.hook_comb", "attn_hc.hook_collapsed",
             "ln1.hook_scale", "ln1.hook_normalized", "attn.hook_q", "attn.hook_kv", "attn.hook_rot_q",
             "attn.hook_rot_kv", "attn.compressor.hook_kv", "attn.compressor.indexer.hook_k",
             "attn.compressor.indexer.hook_scores", "attn.hook_index_topk", "attn.hook_attn_scores",
             "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_mid", "ffn_hc.hook_pre"]
    assert names[: len(order)] == [f"blocks.1.{n}" for n in order]
    assert names[-2:] == ["blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
    assert list(pair.model.hook_dict)[-6:] == ["hc_head.hook_pre", "hc_head.hook_collapsed", "ln_final.hook_scale",
                                               "ln_final.hook_normalized", "unembed.hook_in", "unembed.hook_out"]


def test_deepseek_hub_names_without_model_prefix_load(pair, tmp_path):
    """DeepSeek's own layout (``embed.weight``, ``head.weight``, ``hc_head_fn``, ``layers.{L}.attn...``,
    ``mtp.*`` skipped), as the hub files name it: the same parameters as transformers' save."""
    import shutil

    from safetensors.torch import load_file, save_file

    for f in pair.dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, tmp_path / f.name)
    renamed = {}
    for k, v in load_file(pair.dir / "model.safetensors").items():
        k = k.removeprefix("model.").replace("embed_tokens.weight", "embed.weight")
        k = k.replace("hc_head.hc_", "hc_head_")
        renamed[k] = v
    renamed["mtp.0.emb.weight"] = torch.zeros(2, 2)
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert "embed.weight" in renamed and "hc_head_fn" in renamed and "layers.1.attn.wq_a.weight" in renamed
    hub = HookedMoETransformer.from_pretrained(tmp_path)
    ref = pair.model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in hub.state_dict().items())


def test_dataset_protocol_runs_on_v4(traced, tmp_path):
    """The dataset protocol (screening, expert tracing, coalitions, all on the engine) runs on V4."""
    from moelens import FactCase
    from moelens.tracing.protocol import ProtocolConfig, run_protocol

    m, _ = traced
    words = [f"w{i}" for i in range(30, 60)]
    cases = [FactCase(" ".join(words[i:i + 17]), " ".join(words[i + 2:i + 4]), "w40", "w41") for i in range(3)]
    cfg = ProtocolConfig(min_clean=-1e9, min_drop=-1e9, n_samples=2, n_bootstrap=50, n_permutations=50)
    run_protocol(m, cases, tmp_path, cfg, progress=False)
    assert len((tmp_path / "screen.jsonl").read_text().splitlines()) == 3
