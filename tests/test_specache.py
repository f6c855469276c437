"""SpeCache: low-bit device copy, top-k fetch, the speculative two-token step, and its counters."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, batch_prompt

import kvtier

SMALL = dict(group_size=8, residual=8, topk=4)


def run_plain(model, cache, ids, mask, steps):
    """Prefill then plain one-token decode forwards (what model.generate does)."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            mask = torch.cat((mask, mask.new_ones((mask.shape[0], 1))), 1)
            out = model(input_ids=nxt, attention_mask=mask, past_key_values=cache)
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 2])
def test_topk_covering_the_cache_is_exact(tiny_pair, family, batch):
    """With topk >= every quantized token, mixed precision attention is full precision attention."""
    ref, model = tiny_pair(family)
    ids, mask = batch_prompt(batch, length=40, pad=6)
    expected = kvtier.generate(ref, ids, attention_mask=mask, method="full", max_new_tokens=24, eos_token_id=-1)
    for speculative in (False, True):
        out = kvtier.generate(model, ids, attention_mask=mask, method="specache", max_new_tokens=24,
                              eos_token_id=-1, speculative=speculative, group_size=8, residual=8, topk=512)
        assert torch.equal(out, expected), f"speculative={speculative}"
    cache = kvtier.KVCache(model, method="specache", group_size=8, residual=8, topk=512)
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=24, min_new_tokens=24,
                         do_sample=False)
    assert torch.equal(out, expected)


def test_speculative_step_stores_only_the_real_token_and_reports_hits(tiny):
    model = tiny("llama", num_hidden_layers=2)
    ids, mask = batch_prompt(2, length=50, pad=5)
    cache = kvtier.KVCache(model, method="specache", **SMALL)
    out = kvtier.generate(model, ids, attention_mask=mask, cache=cache, max_new_tokens=12, eos_token_id=-1)
    stats = cache.stats()
    assert out.shape[1] == ids.shape[1] + 12
    # 11 two-token steps after the lookahead pass; each keeps one token
    assert stats["tokens"] == ids.shape[1] + 11
    assert cache.method.pool.num_pages[0] == ids.shape[1] + 11
    assert stats["decode_steps"] == 12
    assert 0.0 <= stats["prefetch_hit_rate"] <= 1.0
    assert stats["fetched_tokens"] > 0


def test_real_row_cannot_see_the_speculative_token(tiny):
    """Changing the speculative token must not change the real row's logits."""
    model = tiny("qwen3", num_hidden_layers=2)
    ids, _ = batch_prompt(1, length=40)
    rows = []
    for guess in (5, 77):
        cache = kvtier.KVCache(model, method="specache", **SMALL)
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache)
            real = out.logits[:, -1].argmax(-1)
            with cache.feeding("lookahead"):
                model(input_ids=real[:, None], past_key_values=cache,
                      position_ids=torch.tensor([[ids.shape[1]]]))
            with cache.feeding("speculative"):
                out = model(input_ids=torch.tensor([[int(real), guess]]), past_key_values=cache,
                            position_ids=torch.tensor([[ids.shape[1], ids.shape[1] + 1]]))
        rows.append(out.logits[:, 0])
    torch.testing.assert_close(rows[0], rows[1])


@pytest.mark.parametrize("bits", [1, 2])
def test_device_bytes_are_the_real_packed_sizes(tiny, bits):
    model = tiny("llama", num_hidden_layers=2, head_dim=64, num_attention_heads=4, num_key_value_heads=2,
                 hidden_size=128, max_position_embeddings=8192)
    ids, mask = batch_prompt(1, length=4000)
    full = kvtier.KVCache(model, method="full")
    run_plain(model, full, ids, mask, 2)
    cache = kvtier.KVCache(model, method="specache", bits=bits)
    run_plain(model, cache, ids, mask, 2)
    stats = cache.stats()
    # what stays on the device; the step's workspace (on CPU the reference dequantizes one layer) is counted too
    assert stats["device_workspace_bytes"] > 0
    ratio = (stats["device_kv_bytes"] - stats["device_workspace_bytes"]) / full.stats()["device_kv_bytes"]
    assert ratio <= {1: 0.12, 2: 0.22}[bits], ratio
    assert stats["device_lowbit_bytes"] > 0 and stats["device_buffer_bytes"] > 0
    # packed: well below an int8-per-code copy (which alone would be 8/32 of float32)
    codes_floor = 4000 * 2 * 2 * 64 * 2 * bits / 8
    assert stats["device_lowbit_bytes"] < 4000 * 2 * 2 * 64 * 2 * 1
    assert stats["device_lowbit_bytes"] >= codes_floor
    assert stats["host_kv_bytes"] == 4002 * 2 * 2 * 2 * 64 * 4


def test_plain_decode_fetches_by_the_current_query(tiny):
    model = tiny("llama", num_hidden_layers=2)
    ids, mask = batch_prompt(1, length=60)
    cache = kvtier.KVCache(model, method="specache", **SMALL)
    run_plain(model, cache, ids, mask, 5)
    stats = cache.stats()
    heads = model.config.num_key_value_heads
    # at most topk per KV head, layer and step; only the tokens not already on the device move
    assert 0 < stats["fetched_tokens"] <= 5 * 2 * heads * 4
    assert stats["h2d_bytes"] == stats["fetched_tokens"] * 2 * model.config.head_dim * 4  # keys and values, fp32
    assert stats["prefetch_hit_rate"] is None, "no speculation under plain decoding"


@pytest.mark.parametrize("correct", [0.0, 0.5, 1.0])
def test_correction_fetches_the_real_top_k_when_the_guess_missed(tiny, correct):
    model = tiny("llama", num_hidden_layers=2)
    ids, mask = batch_prompt(2, length=50, pad=5)
    cache = kvtier.KVCache(model, method="specache", correct=correct, **SMALL)
    kvtier.generate(model, ids, attention_mask=mask, cache=cache, max_new_tokens=12, eos_token_id=-1)
    stats = cache.stats()
    checks = 11 * 2 * 2 * model.config.num_key_value_heads  # two-token steps x layers x sequences x KV heads
    if correct == 0.0:
        assert stats["corrections"] == 0 and stats["correction_rate"] is None
    else:
        assert stats["correction_rate"] == stats["corrections"] / checks
        if correct == 1.0 and stats["prefetch_hit_rate"] < 1.0:
            assert stats["corrections"] > 0, "a miss below a threshold of 1 must correct"
    # a selection per layer and step (and the lookahead's), a correction's on top; only missing tokens move
    per_selection = 2 * model.config.num_key_value_heads * 4  # sequences x KV heads x topk
    assert 0 < stats["fetched_tokens"] <= (11 * 2 * 2 + 2) * per_selection


def test_value_group_sets_the_value_quantization_alone(tiny):
    model = tiny("llama", num_hidden_layers=2, head_dim=64, num_attention_heads=4, num_key_value_heads=2,
                 hidden_size=128)
    ids, mask = batch_prompt(1, length=200)
    lowbit = {}
    for value_group in (None, 32, 16):
        cache = kvtier.KVCache(model, method="specache", group_size=64, value_group=value_group)
        run_plain(model, cache, ids, mask, 1)
        layer = cache.method.layers[0]
        assert layer.scorer.keys.group_size == 64 and layer.values.group_size == (value_group or 64)
        lowbit[value_group] = cache.stats()["device_lowbit_bytes"]
    # one scale and one zero (float32) per value group of each token: 2 * 4 bytes more per halving
    assert lowbit[None] < lowbit[32] < lowbit[16]


@pytest.mark.parametrize("bad, named", [(dict(bits=3), "bits"), (dict(bits=True), "bits"), (dict(topk=0), "topk"),
                                        (dict(group_size=5), "group_size"), (dict(speculative="y"), "speculative"),
                                        (dict(value_group=48), "value_group"), (dict(value_group=3), "value_group"),
                                        (dict(value_group=0), "value_group"), (dict(correct=1.5), "correct"),
                                        (dict(correct=True), "correct")])
def test_bad_options(tiny, bad, named):
    """Each bad value is refused by the option it was given as (True is not the bits count 1)."""
    with pytest.raises(ValueError, match=f"specache.* {named} "):
        kvtier.KVCache(tiny("llama"), method="specache", **bad)


def test_feed_modes_are_refused_by_methods_without_a_speculative_step(tiny):
    cache = kvtier.KVCache(tiny("llama"), method="full")
    with pytest.raises(NotImplementedError):
        with cache.feeding("speculative"):
            pass
    with pytest.raises(ValueError):
        with cache.feeding("nope"):
            pass
