"""KVPR: exact against the full cache for every split, and moving exactly the bytes its cost model predicts."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvtier
from kvtier.models import kv_projectors

from conftest import FAMILIES, batch_prompt

# A fixed machine profile, so the tests never measure and always take the same decisions.
PROFILE = {"h2d_bytes_per_s": 25e9, "matmul_flops_per_s": 100e12}
NEW_TOKENS = 24


def reference(ref_model, ids, mask):
    return ref_model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                              min_new_tokens=NEW_TOKENS, past_key_values=DynamicCache(config=ref_model.config))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 2])
def test_kvpr_token_identical_for_every_split(tiny_pair, family, batch):
    ref_model, model = tiny_pair(family)
    ids, mask = batch_prompt(batch, length=40, pad=7)
    expected = reference(ref_model, ids, mask)
    assert expected.shape[1] == ids.shape[1] + NEW_TOKENS
    s = ids.shape[1]
    for split in ["auto", 0, s // 4, s // 2, s]:
        cache = kvtier.KVCache(model, method="kvpr", split=split, profile=PROFILE)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, past_key_values=cache)
        assert torch.equal(out, expected), f"model.generate differs from DynamicCache at split={split}"
        if split not in ("auto", 0):
            assert cache.stats()["recompute_tokens"] > 0, "a fixed split must really recompute"
        own = kvtier.generate(model, ids, attention_mask=mask, method="kvpr", split=split, profile=PROFILE,
                              max_new_tokens=NEW_TOKENS, eos_token_id=-1)
        assert torch.equal(own, expected), f"kvtier.generate differs from DynamicCache at split={split}"


@pytest.mark.parametrize("family", FAMILIES)
def test_recomputed_keys_and_values_equal_the_cached_ones(tiny, family):
    model = tiny(family, num_key_value_heads=4)
    ids, mask = batch_prompt(2, length=20, pad=5)
    captured = {}

    def grab(module, args, kwargs):
        captured[module.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"])

    hooks = [m.self_attn.register_forward_pre_hook(grab, with_kwargs=True) for m in model.model.layers]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    for h in hooks:
        h.remove()
    for layer, projector in enumerate(kv_projectors(model)):
        x, (cos, sin) = captured[layer]
        with torch.no_grad():
            k, v = projector(x, cos.expand(x.shape[0], -1, -1), sin.expand(x.shape[0], -1, -1))
        torch.testing.assert_close(k, cache.layers[layer].keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, cache.layers[layer].values, atol=1e-5, rtol=1e-5)


def step_h2d(model, cache, ids, mask, steps):
    """Prefill, then `steps` greedy decode forwards; returns the h2d bytes each decode forward added."""
    deltas = []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat((mask, mask.new_ones((mask.shape[0], 1))), dim=1)
            before = cache.stats()["h2d_bytes"]
            out = model(input_ids=nxt, attention_mask=mask, past_key_values=cache)
            deltas.append(cache.stats()["h2d_bytes"] - before)
    return deltas


def test_multi_head_model_moves_exactly_what_the_cost_model_predicts(tiny):
    """Tiny multi-head llama: per step kvpr copies X[0:l) + KV[l:s) per layer, offload copies KV[0:s)."""
    model = tiny("llama", num_key_value_heads=4, num_hidden_layers=3)
    spec = kvtier.ModelSpec.from_model(model)
    ids, mask = batch_prompt(2, length=48, pad=6)
    b, s0 = ids.shape
    elem = 4
    x_row = b * spec.hidden_size * elem                                  # one token's layer input
    kv_row = b * 2 * spec.num_kv_heads * spec.head_dim * elem            # one token's K and V
    assert kv_row == 2 * x_row, "multi-head: activations are half the size of the KV they replace"

    offload = kvtier.KVCache(model, method="offload")
    kvpr = kvtier.KVCache(model, method="kvpr", profile=PROFILE)
    steps = 5
    off_deltas = step_h2d(model, offload, ids, mask.clone(), steps)
    pr_deltas = step_h2d(model, kvpr, ids, mask.clone(), steps)
    stats = kvpr.stats()
    assert stats["stores_activations"] and stats["chosen_split"] > 0
    for k in range(1, steps):  # step 0's layer 0 was prefetched at prefill's end, like every later one
        n = s0 + k  # tokens cached when step k starts
        split_now = kvpr.method.plan_for(n, b).split
        split_next = kvpr.method.plan_for(n + 1, b).split
        layers = spec.num_layers
        expected_offload = (layers - 1) * n * kv_row + (n + 1) * kv_row
        expected_kvpr = ((layers - 1) * (split_now * x_row + (n - split_now) * kv_row)
                         + split_next * x_row + (n + 1 - split_next) * kv_row)
        assert off_deltas[k] == expected_offload
        assert pr_deltas[k] == expected_kvpr
        assert pr_deltas[k] < off_deltas[k]


def test_grouped_query_model_picks_no_recomputation_and_says_why(tiny):
    model = tiny("llama", num_attention_heads=8, num_key_value_heads=2, head_dim=8, hidden_size=64)
    ids, mask = batch_prompt(1, length=32)
    cache = kvtier.KVCache(model, method="kvpr", profile=PROFILE)
    out = kvtier.generate(model, ids, cache=cache, max_new_tokens=8)
    assert out.shape[1] == ids.shape[1] + 8
    stats = cache.stats()
    assert stats["stores_activations"] is False
    assert stats["recompute_tokens"] == 0
    offload = kvtier.KVCache(model, method="offload")
    kvtier.generate(model, ids, cache=offload, max_new_tokens=8)
    assert stats["h2d_bytes"] == offload.stats()["h2d_bytes"]
    assert stats["host_kv_bytes"] == offload.stats()["host_kv_bytes"]


def test_chosen_split_is_reported_with_its_reason(tiny):
    model = tiny("llama", num_key_value_heads=4)
    ids, _ = batch_prompt(1, length=32)
    cache = kvtier.KVCache(model, method="kvpr", profile=PROFILE)
    kvtier.generate(model, ids, cache=cache, max_new_tokens=4)
    stats = cache.stats()
    for key in ("chosen_split", "plan_reason", "predicted_layer_s", "predicted_offload_layer_s",
                "predicted_recompute_s", "predicted_kv_s", "profile_source"):
        assert key in stats, key
    assert stats["profile_source"] == "override"
    assert stats["predicted_layer_s"] <= stats["predicted_offload_layer_s"]


@pytest.mark.parametrize("bad", ["half", -1, 2.5, True])
def test_bad_split_is_a_clear_error(tiny, bad):
    model = tiny("llama")
    with pytest.raises(ValueError, match="split"):
        kvtier.KVCache(model, method="kvpr", split=bad, profile=PROFILE)


def test_a_bad_profile_fails_when_the_cache_is_made(tiny, tmp_path):
    # it was read in the first forward, which failed part-way and left the cache broken
    model = tiny("llama")
    with pytest.raises(FileNotFoundError, match="hardware profile file not found"):
        kvtier.KVCache(model, method="kvpr", profile=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="needs both rates"):
        kvtier.KVCache(model, method="kvpr", profile={"h2d_bytes_per_s": 25e9})
    cache = kvtier.KVCache(model, method="kvpr", profile=PROFILE)
    assert cache.method.hardware.h2d_bytes_per_s == 25e9


@pytest.mark.embedded
def test_embedded_model_kvpr_matches_full(embedded):
    model, tokenizer = embedded
    from kvtier.evaluation.common import prose_text

    ids = tokenizer(prose_text()[:6000], return_tensors="pt")["input_ids"][:, :600]
    full = kvtier.generate(model, ids, method="full", max_new_tokens=16, eos_token_id=-1)
    s = ids.shape[1]
    for split in ["auto", 0, s // 4, s // 2, s]:
        cache = kvtier.KVCache(model, method="kvpr", split=split, profile=PROFILE)
        out = kvtier.generate(model, ids, cache=cache, max_new_tokens=16, eos_token_id=-1)
        assert torch.equal(out, full), f"kvpr split={split} differs from full on the embedded model"
    # SmolLM2 is grouped-query (576 hidden vs 2 x 192 KV width): auto must not recompute.
    auto = kvtier.KVCache(model, method="kvpr", profile=PROFILE)
    kvtier.generate(model, ids, cache=auto, max_new_tokens=2)
    assert auto.stats()["chosen_split"] == 0
    assert auto.stats()["recompute_tokens"] == 0
