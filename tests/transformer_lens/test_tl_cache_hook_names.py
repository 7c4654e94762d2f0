"""TransformerLens' ``tests/integration/test_cache_hook_names.py`` (4.x), ported to the bundled model.

TransformerLens pins the ordered cache keys of a one-layer model. moelens' full ordered lists are
pinned per architecture in ``tests/unit/test_hook_names.py``; here TransformerLens' own list must appear
in a moelens cache in the same order, less what does not apply to a sparse MoE decoder:
``hook_pos_embed`` (rotary positions, no embedding matrix), ``mlp.hook_pre/mid/post`` and ``mlp.ln.*``
(a sparse layer has no single MLP: its experts' hooks take their place, ``mlp.hook_expert_out`` ...),
and ``unembed.hook_in/out`` (part 1 of the same issue, checked with the tokenizer port).
"""

from moelens import HookedMoETransformer

TL_NAMES = [
    "hook_embed",
    "hook_pos_embed",
    "blocks.0.hook_resid_pre",
    "blocks.0.ln1.hook_scale",
    "blocks.0.ln1.hook_normalized",
    "blocks.0.attn.hook_q",
    "blocks.0.attn.hook_k",
    "blocks.0.attn.hook_v",
    "blocks.0.attn.hook_attn_scores",
    "blocks.0.attn.hook_pattern",
    "blocks.0.attn.hook_z",
    "blocks.0.hook_attn_out",
    "blocks.0.hook_resid_mid",
    "blocks.0.ln2.hook_scale",
    "blocks.0.ln2.hook_normalized",
    "blocks.0.mlp.hook_pre",
    "blocks.0.mlp.hook_mid",
    "blocks.0.mlp.ln.hook_scale",
    "blocks.0.mlp.ln.hook_normalized",
    "blocks.0.mlp.hook_post",
    "blocks.0.hook_mlp_out",
    "blocks.0.hook_resid_post",
    "ln_final.hook_scale",
    "ln_final.hook_normalized",
    "unembed.hook_in",
    "unembed.hook_out",
]
NOT_APPLICABLE = {"hook_pos_embed", "blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_mid", "blocks.0.mlp.ln.hook_scale",
                  "blocks.0.mlp.ln.hook_normalized", "blocks.0.mlp.hook_post", "unembed.hook_in", "unembed.hook_out"}


def test_cache_hook_names():
    model = HookedMoETransformer.from_pretrained("moelens-tiny-facts")
    _, cache = model.run_with_cache("Hello World!")
    keys = [k for k in cache.keys() if not k.startswith("blocks.") or k.startswith("blocks.0.")]
    want = [n for n in TL_NAMES if n not in NOT_APPLICABLE]
    it = iter(keys)
    assert all(n in it for n in want), f"TransformerLens' names out of order or missing in {keys}"
    # what moelens adds in a sparse block sits where TransformerLens' MLP hooks were
    mlp = keys[keys.index("blocks.0.ln2.hook_normalized") + 1 : keys.index("blocks.0.hook_mlp_out")]
    assert mlp == ["blocks.0.mlp.hook_router_logits", "blocks.0.mlp.hook_router_scores", "blocks.0.mlp.hook_expert_indices",
                   "blocks.0.mlp.hook_expert_weights", "blocks.0.mlp.hook_expert_out", "blocks.0.mlp.hook_routed_out"]
