"""Exact traffic and memory counters of `offload` (and `full`), step by step.

One decode step of `offload` copies the whole cache host->device: layers 1..L-1 at their length at the start
of the step, and layer 0 at its length after the step (the last layer prefetches layer 0 for the next step).
Bytes per token and layer: batch * 2 (K, V) * kv_heads * head_dim * element size.
"""

from __future__ import annotations

import pytest
import torch

import kvtier

LAYERS = 6
API_KEYS = ("device_kv_bytes", "host_kv_bytes", "h2d_bytes", "d2h_bytes", "decode_steps", "tokens")


def token_layer_bytes(model, batch: int) -> int:
    c = model.config
    elem = next(model.parameters()).element_size()
    return batch * 2 * c.num_key_value_heads * c.head_dim * elem


def run_manual(model, cache, ids, mask, position_ids, steps: int):
    """Prefill, then `steps` single-token decode forwards; yields (stats before, stats after, length before)."""
    batch = ids.shape[0]
    with torch.inference_mode():
        before = cache.stats()
        pos = position_ids(mask)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        yield before, cache.stats(), 0, ids.shape[1]
        last = pos[:, -1:]
        for _ in range(steps):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat((mask, mask.new_ones((batch, 1))), dim=1)
            last = last + 1
            before, n = cache.stats(), cache.get_seq_length()
            out = model(input_ids=token, attention_mask=mask, position_ids=last, past_key_values=cache,
                        use_cache=True)
            yield before, cache.stats(), n, 1


@pytest.mark.parametrize("batch", [1, 2])
def test_offload_counters_every_step(tiny, make_batch, position_ids, batch):
    model = tiny("llama", num_hidden_layers=LAYERS)
    cache = kvtier.KVCache(model, method="offload")
    ids, mask = make_batch(batch, length=20, pad=7)
    per = token_layer_bytes(model, batch)
    L = LAYERS
    steps = 10

    seen_steps = 0
    for i, (before, after, n, t) in enumerate(run_manual(model, cache, ids, mask, position_ids, steps)):
        h2d = after["h2d_bytes"] - before["h2d_bytes"]
        d2h = after["d2h_bytes"] - before["d2h_bytes"]
        # whole cache streamed in: layers 1..L-1 at the start length n, layer 0 at n + t (prefetched for next step)
        assert h2d == ((L - 1) * n + (n + t)) * per, f"step {i}: h2d {h2d} bytes"
        # every new token of every layer written back once
        assert d2h == L * t * per, f"step {i}: d2h {d2h} bytes"
        total = n + t
        assert after["tokens"] == total
        assert after["host_kv_bytes"] == total * L * per
        assert after["d2h_bytes"] == after["host_kv_bytes"]
        assert after["decode_steps"] == i  # the prefill forward is not a decode step
        seen_steps = i
    assert seen_steps == steps

    final = ids.shape[1] + steps
    stats = cache.stats()
    layer_bytes = final * per
    # two staging buffers of (at most) one layer each, grown with a 25% margin
    assert 2 * (final - 1) * per <= stats["device_kv_bytes"] <= 2.5 * layer_bytes
    assert stats["staging_buffers"] == 2


@pytest.mark.parametrize("batch", [1, 2])
def test_full_counters_and_device_bytes_versus_offload(tiny, make_batch, position_ids, batch):
    ids, mask = make_batch(batch, length=20, pad=7)
    steps = 10
    results = {}
    for method in ("full", "offload"):
        model = tiny("llama", num_hidden_layers=LAYERS)
        cache = kvtier.KVCache(model, method=method)
        for _ in run_manual(model, cache, ids, mask, position_ids, steps):
            pass
        results[method] = cache.stats()
    per = token_layer_bytes(model, batch)
    final = ids.shape[1] + steps

    full = results["full"]
    assert full["h2d_bytes"] == 0 and full["d2h_bytes"] == 0 and full["host_kv_bytes"] == 0
    assert full["decode_steps"] == steps and full["tokens"] == final
    assert full["device_kv_bytes"] >= LAYERS * final * per  # every layer's KV on the device

    off = results["offload"]
    assert off["decode_steps"] == steps and off["tokens"] == final
    assert off["device_kv_bytes"] <= 2.5 * final * per
    assert off["device_kv_bytes"] * 2 < full["device_kv_bytes"], (off, full)


@pytest.mark.parametrize("method", ["full", "offload"])
@pytest.mark.parametrize("batch", [1, 2])
def test_generate_step_and_token_counts(tiny, make_batch, method, batch):
    """64 new tokens: 63 decode forwards, since the last new token is returned but never fed back."""
    model = tiny("llama", num_hidden_layers=LAYERS, eos_token_id=None)
    ids, mask = make_batch(batch, length=20, pad=7)
    prompt = ids.shape[1]
    per = token_layer_bytes(model, batch)

    cache = kvtier.KVCache(model, method=method)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=64, do_sample=False)
    assert out.shape == (batch, prompt + 64)
    stats = cache.stats()
    assert stats["decode_steps"] == 63
    assert stats["tokens"] == prompt + 63

    own_cache = kvtier.KVCache(model, method=method)
    own = kvtier.generate(model, ids, attention_mask=mask, cache=own_cache, max_new_tokens=64)
    assert torch.equal(own, out)
    own_stats = own_cache.stats()
    assert own_stats["decode_steps"] == 63
    assert own_stats["tokens"] == prompt + 63

    final = prompt + 63
    for s in (stats, own_stats):
        if method == "offload":
            assert s["host_kv_bytes"] == final * LAYERS * per
            assert s["d2h_bytes"] == s["host_kv_bytes"]
            # prefill brings layer 0 in (prompt); decode step with n cached: (L-1)*n + (n+1)
            expected = prompt + sum((LAYERS - 1) * n + n + 1 for n in range(prompt, final))
            assert s["h2d_bytes"] == expected * per
            assert s["device_kv_bytes"] <= 2.5 * (prompt + 64) * per
        else:
            assert s["host_kv_bytes"] == s["h2d_bytes"] == s["d2h_bytes"] == 0


@pytest.mark.parametrize("method", ["full", "offload"])
def test_stats_has_every_api_key(tiny, make_batch, method):
    model = tiny("llama")
    cache = kvtier.KVCache(model, method=method)
    fresh = cache.stats()
    assert set(API_KEYS) <= set(fresh), sorted(set(API_KEYS) - set(fresh))
    assert fresh["tokens"] == 0 and fresh["decode_steps"] == 0 and fresh["h2d_bytes"] == 0
    ids, mask = make_batch(2)
    kvtier.generate(model, ids, attention_mask=mask, cache=cache, max_new_tokens=4)
    stats = cache.stats()
    assert set(API_KEYS) <= set(stats)
    for key in API_KEYS:
        assert isinstance(stats[key], int) and stats[key] >= 0, (key, stats[key])
    assert stats["device_kv_bytes"] > 0
    assert stats["tokens"] == ids.shape[1] + 3
