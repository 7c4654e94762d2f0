"""Port of TransformerLens' ``tests/integration/test_cache_hook_names.py`` (TransformerLensOrg/
TransformerLens, branch ``dev-4.x`` at commit 596e584846982c940b1418bc165d61d7c58e9eca).

Changed: the model (the bundled ``moelens-tiny-facts``, a 4-layer Qwen3-MoE) and so the expected
names: no ``hook_pos_embed`` (RoPE: ``attn.hook_rot_q/k`` instead), and each block's MLP is a sparse
MoE layer whose hooks (router, chosen experts, their outputs, the combine) replace GPT-2's
``mlp.hook_pre/mid/post`` and ``mlp.ln``. The assertion is TransformerLens': the cache holds
exactly these activations, in the order they are computed, ending with ``unembed.hook_in/out``.
(The ``tl-weights`` branch has another port of the same test, ``test_tl_cache_hook_names.py``, that
checks TransformerLens' list as an ordered subsequence; this one keeps TransformerLens' exact equality.)
"""

PROMPT = "Hello World!"

block_names = [
    "hook_resid_pre",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "mlp.hook_router_logits",
    "mlp.hook_router_scores",
    "mlp.hook_expert_indices",
    "mlp.hook_expert_weights",
    "mlp.hook_expert_out",
    "mlp.hook_routed_out",
    "hook_mlp_out",
    "hook_resid_post",
]

act_names_in_cache = (
    ["hook_embed"]
    + [f"blocks.{l}.{n}" for l in range(4) for n in block_names]
    + ["ln_final.hook_scale", "ln_final.hook_normalized", "unembed.hook_in", "unembed.hook_out"]
)


def test_cache_hook_names(model):
    _, cache = model.run_with_cache(PROMPT)
    assert list(cache.keys()) == act_names_in_cache
