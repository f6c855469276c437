"""A steady decode step reads nothing back to the host, for every method and option (engine.md).

Each method runs a few decode steps on a tiny model under `stepcheck.no_host_sync`, which raises at the first
`.item()`, `.tolist()`, `.cpu()`, `bool/int/float` of a tensor, `nonzero`, `unique` or boolean-mask index. The
first steps after the prefill (the first selection, buffers' first use) run outside it: only steady steps count.
"""

from __future__ import annotations

import pytest
import torch

import kvtier
from kvtier.generate import decode_step, lookahead, positions, prefill, speculative_step
from kvtier.stepcheck import HostSyncError, no_host_sync
from conftest import batch_prompt

SMALL = dict(page_size=4, sink=8, window=8, budget=40)
METHODS = [
    ("full", {}), ("offload", {}), ("kvpr", {}),
    ("freekv", SMALL),
    ("freekv", {**SMALL, "speculative": False}),
    ("freekv", {**SMALL, "scorer": "lowbit", "score_group": 8}),
    ("freekv", {**SMALL, "scorer": "lowbit", "score_group": 8, "rest": "lowbit", "tau": 0.9}),
    ("freekv", {**SMALL, "scorer": "lowbit", "score_group": 8, "rest": "lowbit", "query": "speculative",
                "correct": 0.5}),
    ("specache", {"group_size": 8, "residual": 8, "topk": 8}),
    ("specache", {"group_size": 8, "residual": 8, "topk": 8, "correct": 0.9}),
    ("specache", {"group_size": 8, "residual": 8, "topk": 8, "bits": 1, "speculative": False}),
]


def _label(case):
    name, opts = case
    return name + "".join(f":{k}={v}" for k, v in opts.items())


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("case", METHODS, ids=[_label(c) for c in METHODS])
def test_plain_decode_steps_do_not_sync(tiny, case, batch):
    """model(...) one token at a time, as model.generate decodes (left padding at batch 2)."""
    name, opts = case
    model = tiny("llama")
    ids, mask = batch_prompt(batch, length=60, pad=5)
    cache = kvtier.KVCache(model, method=name, **opts)
    cache.reserve(ids.shape[1] + 40)
    with torch.inference_mode():
        logits = prefill(model, cache, ids, mask)
        position = positions(mask, ids.shape[1] - 1, ids.shape[1], ids.device)
        for step in range(30):  # crosses page, window and key-group boundaries
            token = logits.argmax(-1)
            if step < 2:
                logits, mask, position = decode_step(model, cache, token, mask, position)
                continue
            with no_host_sync():
                logits, mask, position = decode_step(model, cache, token, mask, position)
    assert bool(torch.isfinite(logits).all())
    assert cache.stats()["decode_steps"] == 30


@pytest.mark.parametrize("case", [c for c in METHODS if c[1].get("query") == "speculative" or
                                  (c[0] == "specache" and c[1].get("speculative", True))],
                         ids=lambda c: _label(c))
def test_speculative_steps_do_not_sync(tiny, case):
    """kvtier.generate's two-token step (the real token and a guessed next one)."""
    name, opts = case
    model = tiny("llama")
    ids, mask = batch_prompt(2, length=60, pad=5)
    cache = kvtier.KVCache(model, method=name, **opts)
    cache.reserve(ids.shape[1] + 40)
    with torch.inference_mode():
        logits = prefill(model, cache, ids, mask)
        position = positions(mask, ids.shape[1] - 1, ids.shape[1], ids.device) + 1
        real = logits.argmax(-1)
        state = [real, lookahead(model, cache, real, mask, position), mask, position]
        for step in range(30):
            if step < 2:
                state = list(speculative_step(model, cache, *state))
                continue
            with no_host_sync():
                state = list(speculative_step(model, cache, *state))
    assert cache.stats()["decode_steps"] == 31  # the lookahead pass counts as one


def test_the_sentinel_catches_a_sync(tiny):
    """The check above can fail: a method that reads a device value during the step is caught."""
    model = tiny("llama")
    cache = kvtier.KVCache(model, method="full")
    ids, _ = batch_prompt(1, length=20)
    original = cache.method._attend

    def reads_back(layer, q, valid, scaling):
        int(q.abs().sum() > 0)
        return original(layer, q, valid, scaling)

    cache.method._attend = reads_back
    with torch.inference_mode():
        logits = prefill(model, cache, ids)
        with pytest.raises(HostSyncError):
            with no_host_sync():
                decode_step(model, cache, logits.argmax(-1), None, positions(None, 19, 20, ids.device))


def test_max_length_sizes_the_buffers_once(tiny):
    """KVCache(max_length=) for model.generate: no buffer of a retrieval layer is reallocated while decoding."""
    model = tiny("llama")
    ids, mask = batch_prompt(1, length=40)
    cache = kvtier.KVCache(model, method="freekv", max_length=40 + 30, **SMALL)
    model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=2, min_new_tokens=2,
                   do_sample=False)
    held = [(t.data_ptr(), t.shape) for st in cache.method.layers if st is not None for t in st.tensors()]
    pool = [p.data_ptr() for p in cache.method.pool.pages if p is not None]
    with torch.inference_mode():
        logits = model(ids[:, -1:], past_key_values=cache).logits
        for _ in range(25):
            logits = model(logits[:, -1:].argmax(-1), past_key_values=cache).logits
    assert [(t.data_ptr(), t.shape) for st in cache.method.layers if st is not None for t in st.tensors()] == held
    assert [p.data_ptr() for p in cache.method.pool.pages if p is not None] == pool
    with pytest.raises(ValueError, match="max_length"):
        kvtier.KVCache(model, method="freekv", max_length=10**9)
