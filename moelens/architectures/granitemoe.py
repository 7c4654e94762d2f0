"""Granite MoE (``GraniteMoeForCausalLM``, e.g. ibm-granite/granite-3.1-1b-a400m-instruct, -3b-a800m) and
GraniteMoeShared (``GraniteMoeSharedForCausalLM``, e.g. ibm-research/moe-7b-1b-active-shared-experts), as
transformers 5.25 computes them (ibm/PowerMoE-3b and the Granite 3.0 MoE checkpoints are ``GraniteMoe`` too).

* Four scalars (config data, :class:`~moelens.config.MoEConfig`): ``embedding_multiplier`` scales
  the embeddings (``hook_embed`` is the scaled embedding); ``attention_multiplier`` *is* the
  attention softmax scale (``attn_softmax_scale``, replacing ``d_head ** -0.5``); ``residual_multiplier``
  scales each block's update before the residual add (moelens applies it to the attention output
  and, inside the MoE, to the combine weights and the shared-expert output, so that
  ``hook_attn_out`` / ``hook_mlp_out`` are what is added and the expert contributions still sum to
  them); ``logits_scaling`` divides the logits.
* Router ``block_sparse_moe.router``: model-dtype logits upcast to fp32 (``router_dtype="model_upcast"``),
  top-k of the **logits** (sorted), fp32 softmax over the k, cast to the model dtype
  (``router_order="topk_softmax"``); ``hook_router_scores`` is the fp32 softmax over all experts.
* Experts: the hub's fused ``input_linear [E, 2I, d]`` (gate rows first, then up) and
  ``output_linear [E, d, I]``; every layer is sparse. GraniteMoeShared adds one ungated shared
  SwiGLU ``shared_mlp`` (``input_linear [2I_s, d]``, ``output_linear``) of width
  ``shared_intermediate_size``, summed with the routed output before the residual multiplier.
* Attention: GQA; ``attention_bias`` puts biases on q, k, v **and** o.
"""

import torch

from moelens.architectures.base import COMMON_RULES, GQA_RULES, Architecture, KeyRule, rope_settings

NAME = "GraniteMoeForCausalLM"
SHARED_NAME = "GraniteMoeSharedForCausalLM"

# class defaults of transformers 5.25 GraniteMoeConfig / GraniteMoeSharedConfig (checked in the tests)
DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "rope_parameters": None, "rope_theta": None, "rope_scaling": None, "attention_bias": False,
    "embedding_multiplier": 1.0, "logits_scaling": 1.0, "residual_multiplier": 1.0, "attention_multiplier": 1.0,
    "num_local_experts": 8, "num_experts_per_tok": 2, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
}
SHARED_DEFAULTS = {**DEFAULTS, "shared_intermediate_size": 0}

REQUIRED = {"hidden_act": ("silu",)}
# transformers' GraniteMoe attention has no head_dim field: head_dim = hidden_size // num_attention_heads
IGNORED = frozenset({"attention_dropout", "router_aux_loss_coef", "output_router_logits"})


def translate(hf: dict) -> dict:
    rope = rope_settings(hf, NAME)
    n, d, h = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]
    bias = bool(hf["attention_bias"])
    return dict(
        n_layers=n, d_model=d, d_vocab=hf["vocab_size"], n_heads=h, n_kv_heads=hf["num_key_value_heads"] or h,
        d_head=d // h, n_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
        d_expert=hf["intermediate_size"], moe_layers=tuple(range(n)), rms_norm_eps=hf["rms_norm_eps"],
        rope_theta=rope["rope_theta"] or 1e4, qkv_bias=bias, attn_o_bias=bias,
        router_order="topk_softmax", router_dtype="model_upcast", router_weights_dtype="model", norm_topk_prob=True,
        embedding_multiplier=float(hf["embedding_multiplier"]), attn_softmax_scale=float(hf["attention_multiplier"]),
        residual_multiplier=float(hf["residual_multiplier"]), logits_scaling=float(hf["logits_scaling"]),
        d_shared=int(hf.get("shared_intermediate_size") or 0),
    )


def split_gate_up(t: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared MLP's fused ``input_linear [2 I, d]``: first half gate, second half up
    (transformers: ``chunk(2, dim=-1)`` of the output)."""
    gate, up = t.chunk(2, dim=0)
    return gate, up


ATTN_O_BIAS = (KeyRule("model.layers.{L}.self_attn.o_proj.bias", "blocks.{L}.attn.b_o"),)

EXPERT_RULES = (
    # hub layout (fused banks under the original names)
    KeyRule("model.layers.{L}.block_sparse_moe.router.layer.weight", "blocks.{L}.mlp.router.W_router"),
    KeyRule("model.layers.{L}.block_sparse_moe.input_linear.weight",
            ("blocks.{L}.mlp.experts.w_gate", "blocks.{L}.mlp.experts.w_up"), "split"),
    KeyRule("model.layers.{L}.block_sparse_moe.output_linear.weight", "blocks.{L}.mlp.experts.w_down"),
    # transformers 5 in-memory layout (save_pretrained(save_original_format=False))
    KeyRule("model.layers.{L}.block_sparse_moe.router.weight", "blocks.{L}.mlp.router.W_router"),
    KeyRule("model.layers.{L}.block_sparse_moe.experts.gate_up_proj",
            ("blocks.{L}.mlp.experts.w_gate", "blocks.{L}.mlp.experts.w_up"), "split"),
    KeyRule("model.layers.{L}.block_sparse_moe.experts.down_proj", "blocks.{L}.mlp.experts.w_down"),
)

SHARED_RULES = (
    KeyRule("model.layers.{L}.shared_mlp.input_linear.weight",
            ("blocks.{L}.mlp.shared_experts.w_gate", "blocks.{L}.mlp.shared_experts.w_up"), "convert",
            convert=split_gate_up),
    KeyRule("model.layers.{L}.shared_mlp.output_linear.weight", "blocks.{L}.mlp.shared_experts.w_down"),
)

ARCH = Architecture(
    name=NAME,
    model_type="granitemoe",
    translate=translate,
    defaults=DEFAULTS,
    required=REQUIRED,
    ignored=IGNORED,
    key_rules=COMMON_RULES + GQA_RULES + ATTN_O_BIAS + EXPERT_RULES,
    hf_config_class="GraniteMoeConfig",
    hf_model_class=NAME,
)

SHARED_ARCH = Architecture(
    name=SHARED_NAME,
    model_type="granitemoeshared",
    translate=translate,
    defaults=SHARED_DEFAULTS,
    required=REQUIRED,
    ignored=IGNORED,
    key_rules=COMMON_RULES + GQA_RULES + ATTN_O_BIAS + EXPERT_RULES + SHARED_RULES,
    hf_config_class="GraniteMoeSharedConfig",
    hf_model_class=SHARED_NAME,
)
