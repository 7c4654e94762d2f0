"""Greedy generate() equals transformers' generate(do_sample=False) token for token (fp32, tiny models).

Left-padded batches of prompts of different lengths, with and without the KV cache, on every
architecture. transformers builds RoPE position ids from the attention mask when generating
(``cumsum(mask) - 1``): the padded rows must match that, not the plain forward's ``arange``.
"""

import copy

import pytest
import torch

from moelens import HookedMoETransformer

ARCHS = ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v2_lite", "deepseek_v2_full", "deepseek_v3",
         "glm4_moe", "glm4_moe_lite", "gpt_oss", "qwen3_next", "qwen3_5_moe", "granitemoe", "granitemoeshared", "minimax_m2", "ernie4_5_moe", "phimoe", "llama4", "flex_olmo", "gemma4", "deepseek_v32", "glm_moe_dsa"]
N_NEW = 8


def padded_prompts(seed=0, lengths=(7, 4, 1)):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, length in enumerate(lengths):
        ids[i, n - length:] = torch.randint(3, 256, (length,), generator=g)
        mask[i, n - length:] = 1
    return ids, mask


def hf_greedy(hf, ids, mask, n_new, use_cache=True):
    gc = copy.deepcopy(hf.generation_config)
    gc.eos_token_id = None
    gc.pad_token_id = 0
    gc.do_sample = False
    gc.max_new_tokens = gc.min_new_tokens = n_new
    gc.use_cache = use_cache
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, generation_config=gc)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers_left_padded(arch, tiny_dirs):
    d, hf = tiny_dirs(arch)
    model = HookedMoETransformer.from_pretrained(d)
    ids, mask = padded_prompts()
    want = hf_greedy(hf, ids, mask, N_NEW)
    assert want.shape == (3, ids.shape[1] + N_NEW)
    for cache in (True, False):
        got = model.generate(ids, max_new_tokens=N_NEW, do_sample=False, stop_at_eos=False, verbose=False,
                             use_past_kv_cache=cache, attention_mask=mask)
        assert torch.equal(got, want), (arch, cache, got, want)
    # the padded rows really depend on the mask-derived positions: with the plain forward's
    # positions (pads counted) the shortest row's continuation changes
    row = model.generate(ids[2:, -1:], max_new_tokens=N_NEW, do_sample=False, stop_at_eos=False, verbose=False)
    assert torch.equal(row[0, 1:], want[2, ids.shape[1]:])


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v2_lite"])
def test_greedy_unpadded_matches_transformers_without_cache(arch, tiny_dirs):
    d, hf = tiny_dirs(arch)
    model = HookedMoETransformer.from_pretrained(d)
    ids = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    want = hf_greedy(hf, ids, torch.ones_like(ids), N_NEW, use_cache=False)
    got = model.generate(ids, max_new_tokens=N_NEW, do_sample=False, stop_at_eos=False, verbose=False)
    assert torch.equal(got, want)
