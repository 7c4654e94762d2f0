"""``transformer_lens.patching``, ``head_detector`` and ``utilities.test_prompt`` on a moelens model.

Every ``get_act_patch_*`` sweep (residual stream, attention and MLP outputs, attention heads' output,
q, k, v and pattern, all positions and per position, the ``*_every`` stacks) is compared with the
same patch written by hand with ``run_with_hooks``; ``detect_head`` with scores computed from the
cached patterns; ``test_prompt`` with the model's own logits. Also ports TransformerLens'
``tests/unit/test_patching.py`` (shape and "values vary") to the bundled model.
"""

import re

import pytest
import torch
from transformer_lens import head_detector, patching
from transformer_lens.utilities import test_prompt as tl_test_prompt

from moelens import HookedMoETransformer


@pytest.fixture(scope="module")
def setup():
    model = HookedMoETransformer.from_pretrained("moelens-tiny-facts")
    clean = model.to_tokens("Jor Sar works as a")  # a fact of the bundled world: " poet"
    corrupted = model.to_tokens("Mal Quil works as a")  # " sailor"
    assert clean.shape == corrupted.shape
    _, cache = model.run_with_cache(clean)
    t_a, t_b = model.to_single_token(" poet"), model.to_single_token(" sailor")

    def metric(logits):
        return logits[0, -1, t_a] - logits[0, -1, t_b]

    return model, clean, corrupted, cache, metric


def by_hand(model, corrupted, cache, metric, name, index, shape):
    """The reference: for every index in ``shape`` (first axis: layer), copy the clean activation into
    the corrupted run at ``index(rest)`` of hook ``name.format(layer)``."""
    out = torch.zeros(shape)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in shape]).tolist():
        idx = [idx] if isinstance(idx, int) else idx
        layer, rest = idx[0], idx[1:]
        hook_name = name.format(layer)
        where = (slice(None),) + index(*rest)

        def hook(act, hook, where=where, clean=cache[hook_name]):
            act = act.clone()
            act[where] = clean[where]
            return act

        out[tuple(idx)] = metric(model.run_with_hooks(corrupted, fwd_hooks=[(hook_name, hook)])).item()
    return out


def test_config_fields_transformer_lens_reads(setup):
    model = setup[0]
    cfg = model.cfg
    assert cfg.device == torch.device("cpu") and cfg.n_key_value_heads == 2 and cfg.act_fn == "silu"
    assert cfg.d_vocab_out == cfg.d_vocab and cfg.original_architecture == "Qwen3MoeForCausalLM"
    assert cfg.model_name == "moelens-tiny-facts" and cfg.default_prepend_bos is True and cfg.n_ctx == 256
    meta = HookedMoETransformer.from_pretrained("moelens-tiny-facts", device="meta")
    assert meta.cfg.device == torch.device("meta") and model.cfg.device == torch.device("cpu")  # each model its own
    meta.to_empty(device="cpu")
    assert meta.cfg.device == torch.device("cpu")
    meta.to("meta")
    assert meta.cfg.device == torch.device("meta")


@pytest.mark.parametrize("kind", ["resid_pre", "resid_mid", "attn_out", "mlp_out"])
def test_layer_pos_sweeps(setup, kind):
    model, clean, corrupted, cache, metric = setup
    fn = getattr(patching, f"get_act_patch_{kind}")
    got = fn(model, corrupted, cache, metric)
    L, P = model.cfg.n_layers, clean.shape[-1]
    want = by_hand(model, corrupted, cache, metric, f"blocks.{{}}.hook_{kind}", lambda p: (p,), (L, P))
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
    assert want.abs().max() > 1e-3  # the patches do something (a constant sweep would hide a no-op)


@pytest.mark.parametrize("act", ["out", "q", "k", "v"])
def test_head_sweeps(setup, act):
    model, clean, corrupted, cache, metric = setup
    cfg = model.cfg
    hook = {"out": "z"}.get(act, act)
    heads = cfg.n_key_value_heads if act in ("k", "v") else cfg.n_heads  # GQA: k/v have the kv heads
    L, P = cfg.n_layers, clean.shape[-1]
    name = f"blocks.{{}}.attn.hook_{hook}"
    got = getattr(patching, f"get_act_patch_attn_head_{act}_all_pos")(model, corrupted, cache, metric)
    want = by_hand(model, corrupted, cache, metric, name, lambda h: (slice(None), h), (L, heads))
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
    got = getattr(patching, f"get_act_patch_attn_head_{act}_by_pos")(model, corrupted, cache, metric)
    want = by_hand(model, corrupted, cache, metric, name, lambda p, h: (p, h), (L, P, heads))
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


def test_pattern_sweeps(setup):
    model, clean, corrupted, cache, metric = setup
    cfg = model.cfg
    L, P, H = cfg.n_layers, clean.shape[-1], cfg.n_heads
    name = "blocks.{}.attn.hook_pattern"  # [batch, head, query_pos, key_pos]
    got = patching.get_act_patch_attn_head_pattern_all_pos(model, corrupted, cache, metric)
    want = by_hand(model, corrupted, cache, metric, name, lambda h: (h,), (L, H))
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
    got = patching.get_act_patch_attn_head_pattern_by_pos(model, corrupted, cache, metric)  # [layer, head, dest]
    want = by_hand(model, corrupted, cache, metric, name, lambda h, d: (h, d), (L, H, P))
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


def test_every_stacks(setup):
    model, clean, corrupted, cache, metric = setup
    cfg = model.cfg
    block = patching.get_act_patch_block_every(model, corrupted, cache, metric)
    assert block.shape == (3, cfg.n_layers, clean.shape[-1])
    torch.testing.assert_close(block[2], patching.get_act_patch_mlp_out(model, corrupted, cache, metric))
    heads = patching.get_act_patch_attn_head_all_pos_every(model, corrupted, cache, metric)
    assert heads.shape == (5, cfg.n_layers, cfg.n_heads)
    k = patching.get_act_patch_attn_head_k_all_pos(model, corrupted, cache, metric)
    torch.testing.assert_close(heads[2, :, : cfg.n_key_value_heads], k)  # TransformerLens pads GQA's k/v


@pytest.mark.slow
def test_by_pos_every_stack(setup):
    model, clean, corrupted, cache, metric = setup
    cfg = model.cfg
    by_pos = patching.get_act_patch_attn_head_by_pos_every(model, corrupted, cache, metric)
    assert by_pos.shape == (5, cfg.n_layers, clean.shape[-1], cfg.n_heads)
    torch.testing.assert_close(by_pos[0], patching.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, metric))


# ---------------------------------------------------------------- TransformerLens' tests/unit/test_patching.py
def test_get_act_patch_attn_head_all_pos_every_shape(setup):
    model, clean, corrupted, cache, _ = setup

    def metric(logits):
        return logits[:, -1, :].sum()

    result = patching.get_act_patch_attn_head_all_pos_every(model, corrupted, cache, metric)
    assert result.shape == (5, model.cfg.n_layers, model.cfg.n_heads)
    assert not torch.all(result == result[0, 0, 0]), "All patch results are identical"
    assert torch.isfinite(result).all()


# ---------------------------------------------------------------- head_detector, test_prompt
@pytest.mark.parametrize("head", ["previous_token_head", "duplicate_token_head", "induction_head"])
def test_detect_head_equals_scores_from_the_cache(setup, head):
    model = setup[0]
    seq = "Jor Sar works as a poet. Jor Sar works as a"
    scores = head_detector.detect_head(model, seq, head)
    tokens = model.to_tokens(seq)
    pattern_fn = getattr(head_detector, f"get_{head}_detection_pattern")
    det = pattern_fn(tokens.cpu())
    _, cache = model.run_with_cache(tokens)
    assert scores.shape == (model.cfg.n_layers, model.cfg.n_heads)
    for l in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            p = cache["pattern", l][0, h]
            want = (p * det).sum() / p.sum()  # "mul": the share of attention on the detection pattern
            assert float(scores[l, h]) == pytest.approx(float(want), abs=1e-5)
    assert scores.std() > 0


def test_test_prompt_reports_the_models_logits(setup, capsys):
    model = setup[0]
    prompt, answer = "Jor Sar works as a", " poet"
    tl_test_prompt(prompt, answer, model, top_k=3)
    out = capsys.readouterr().out
    tokens = torch.cat([model.to_tokens(prompt), model.to_tokens(answer, prepend_bos=False)], 1)
    n_prompt = model.to_tokens(prompt).shape[-1]
    with torch.no_grad():
        logits = model(tokens)[0, n_prompt - 1]
    ans = int(tokens[0, n_prompt])
    rank = int((logits > logits[ans]).sum())
    m = re.search(r"Rank: (\d+)\s+Logit:\s*(-?[\d.]+)", out)
    assert m, out
    assert int(m.group(1)) == rank and float(m.group(2)) == pytest.approx(float(logits[ans]), abs=0.01)
    top = re.search(r"Top 0th token. Logit:\s*(-?[\d.]+)", out)
    assert float(top.group(1)) == pytest.approx(float(logits.max()), abs=0.01)


@pytest.mark.parametrize("arch", ["deepseek_v3", "gpt_oss", "qwen2_moe"])
@torch.no_grad()
def test_head_sweeps_on_other_attention_kinds(tiny_dirs, arch):
    """MLA (every head its own key: n_key_value_heads = n_heads), GQA with sinks and sliding windows,
    and attention biases: TransformerLens' head sweeps equal the hand-written patch."""
    d, _ = tiny_dirs(arch)
    model = HookedMoETransformer.from_pretrained(d)
    gen = torch.Generator().manual_seed(2)
    clean, corrupted = torch.randint(0, 256, (1, 5), generator=gen), torch.randint(0, 256, (1, 5), generator=gen)
    _, cache = model.run_with_cache(clean)

    def metric(logits):
        return logits[0, -1, 3] - logits[0, -1, 4]

    cfg = model.cfg
    assert cfg.n_key_value_heads == (cfg.n_heads if cfg.attention == "mla" else cfg.n_kv_heads)
    got = patching.get_act_patch_attn_head_v_all_pos(model, corrupted, cache, metric)
    want = by_hand(model, corrupted, cache, metric, "blocks.{}.attn.hook_v", lambda h: (slice(None), h),
                   (cfg.n_layers, cfg.n_key_value_heads))
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
    got = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, metric)
    want = by_hand(model, corrupted, cache, metric, "blocks.{}.attn.hook_z", lambda h: (slice(None), h),
                   (cfg.n_layers, cfg.n_heads))
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
    assert want.abs().max() > 1e-4


@pytest.mark.slow
def test_pattern_dest_src_sweep(setup):
    model, clean, corrupted, cache, metric = setup
    cfg = model.cfg
    L, P, H = cfg.n_layers, clean.shape[-1], cfg.n_heads
    got = patching.get_act_patch_attn_head_pattern_dest_src_pos(model, corrupted, cache, metric)  # [layer, head, dest, src]
    want = by_hand(model, corrupted, cache, metric, "blocks.{}.attn.hook_pattern", lambda h, d, s: (h, d, s), (L, H, P, P))
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_hybrid_models_layer_sweeps_work_head_sweeps_name_the_missing_hook(tiny_dirs):
    """Gated DeltaNet layers have no heads in TransformerLens' sense (docs/transformer_lens.md): the
    per-layer sweeps equal the hand-written patch, a head sweep stops with a KeyError naming hook_z."""
    d, _ = tiny_dirs("qwen3_next")
    model = HookedMoETransformer.from_pretrained(d)
    gen = torch.Generator().manual_seed(4)
    clean, corrupted = torch.randint(0, 256, (1, 4), generator=gen), torch.randint(0, 256, (1, 4), generator=gen)
    _, cache = model.run_with_cache(clean)

    def metric(logits):
        return logits[0, -1, 3] - logits[0, -1, 4]

    got = patching.get_act_patch_attn_out(model, corrupted, cache, metric)
    want = by_hand(model, corrupted, cache, metric, "blocks.{}.hook_attn_out", lambda p: (p,), (model.cfg.n_layers, 4))
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
    lin = model.cfg.linear_attn_layers[0]
    with pytest.raises(KeyError, match=rf"blocks\.{lin}\.attn\.hook_z"):
        patching.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, metric)
