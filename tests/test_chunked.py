"""Chunked prefill (a prompt longer than one chunk) through every method equals one full pass."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import batch_prompt

import kvtier
from kvtier.generate import Decoder

# options under which each method keeps the whole context, so the output must equal full's
COVERING = {"full": {}, "offload": {}, "kvpr": {"split": 20, "profile": {"h2d_bytes_per_s": 1e10,
                                                                          "matmul_flops_per_s": 1e12}},
            "freekv": {"budget": 256, "page_size": 4, "sink": 8, "window": 8},
            "specache": {"group_size": 8, "residual": 8, "topk": 512}}


def test_every_method_is_covered():
    assert set(COVERING) == set(kvtier.METHODS)


@pytest.mark.parametrize("method", sorted(COVERING))
@pytest.mark.parametrize("batch", [1, 2])
def test_chunked_prefill_matches_one_pass(tiny_pair, monkeypatch, method, batch):
    ref, model = tiny_pair("qwen3")
    ids, mask = batch_prompt(batch, length=70, pad=9)
    expected = kvtier.generate(ref, ids, attention_mask=mask, method="full", max_new_tokens=10, eos_token_id=-1)
    monkeypatch.setattr(sys.modules["kvtier.generate"], "PREFILL_CHUNK", 32)
    cache = kvtier.KVCache(model, method=method, **COVERING[method])
    out = kvtier.generate(model, ids, attention_mask=mask, cache=cache, max_new_tokens=10, eos_token_id=-1)
    assert torch.equal(out, expected)
    assert cache.stats()["decode_steps"] == 9 + (1 if method == "specache" else 0)


@pytest.mark.parametrize("method, options", [
    ("freekv", {"budget": 16, "page_size": 4, "sink": 4, "window": 4}),
    ("specache", {"group_size": 8, "residual": 8, "topk": 8}),
])
def test_a_lossy_method_reads_a_padded_row_the_same_however_the_prompt_is_chunked(tiny, method, options):
    """Padding queries see no real key; what they see instead must not depend on the chunks (they saw every key
    of their chunk), or the padding's keys in later layers, which page digests and low-bit groups take in,
    differ between a chunked prefill and a whole one, and so does the padded row's output (by 0.08 here)."""
    model = tiny("llama")
    ids, mask = batch_prompt(2, length=30, pad=9)
    first_steps = []
    for chunk in (None, 8):
        cache = kvtier.KVCache(model, method=method, **options)
        with torch.inference_mode():
            logits = kvtier.prefill(model, cache, ids, mask, chunk=chunk)
            first_steps.append(Decoder(model, cache, ids, mask, speculate=False).step(logits.argmax(-1)))
    torch.testing.assert_close(first_steps[1], first_steps[0], atol=1e-5, rtol=1e-5)
