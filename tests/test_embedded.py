"""The embedded SmolLM2-135M (float32, CPU) on a ~2,000-token real prompt: exact methods reproduce Hugging Face.

The prompt is Python's own documentation (`pydoc_data.topics`) wrapped as a chat user message with a question.
Reference: `model.generate` with a `DynamicCache` under transformers' own attention. The model is loaded once
per session (conftest `embedded`); the reference is computed once per module.
"""

from __future__ import annotations

import pydoc_data.topics

import pytest
import torch
import transformers

import kvtier

pytestmark = pytest.mark.embedded

NEW = 64
TARGET_TOKENS = 2000
TOPICS = ("for", "while", "if", "try", "with", "break", "continue", "pass", "return", "assert", "del", "import")


def build_prompt(tokenizer) -> torch.Tensor:
    question = ("\n\nUsing only the documentation above, explain what the `else` clause of a `for` loop does "
                "and when it runs.")
    text = ""
    topics = [t for t in TOPICS if t in pydoc_data.topics.topics]
    topics += sorted(set(pydoc_data.topics.topics) - set(topics))
    for name in topics:
        candidate = text + pydoc_data.topics.topics[name].strip() + "\n\n"
        n = len(tokenizer(candidate + question).input_ids)
        if n > TARGET_TOKENS:
            continue  # this topic does not fit; a later, shorter one may
        text = candidate
        if n > TARGET_TOKENS - 100:
            break
    messages = [{"role": "user", "content": text + question}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    return enc["input_ids"]


@pytest.fixture(scope="module")
def setup(embedded, reference_attention):
    model, tokenizer = embedded
    ids = build_prompt(tokenizer)
    mask = torch.ones_like(ids)
    with reference_attention(model), torch.inference_mode():
        assert model.config._attn_implementation != "kvtier"
        ref = model.generate(ids, attention_mask=mask, past_key_values=transformers.DynamicCache(config=model.config),
                             max_new_tokens=NEW, do_sample=False)
    return model, tokenizer, ids, mask, ref


def test_prompt_and_reference(setup):
    model, tokenizer, ids, mask, ref = setup
    assert 1500 <= ids.shape[1] <= TARGET_TOKENS + 100, ids.shape
    assert ids.shape[1] + NEW <= model.config.max_position_embeddings
    new = ref[0, ids.shape[1]:]
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    # either all 64 tokens were generated, or an eos ended the answer (then the comparisons below still cover
    # every generated token, and the outputs must end at the same place)
    assert ref.shape[1] == ids.shape[1] + NEW or int(new[-1]) in eos
    assert len(new) >= 16, "the answer is too short for the comparison to mean much"
    answer = tokenizer.decode(new, skip_special_tokens=True)
    assert len(answer.strip()) > 20 and len(set(new.tolist())) > 8, answer


@pytest.mark.parametrize("method", ["full", "offload"])
def test_model_generate_with_kvcache_identical(setup, method):
    model, _, ids, mask, ref = setup
    cache = kvtier.KVCache(model, method=method)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW, do_sample=False)
    assert out.shape == ref.shape
    assert torch.equal(out, ref), "first difference at new token %d" % _first_diff(out, ref, ids.shape[1])
    stats = cache.stats()
    assert stats["tokens"] == out.shape[1] - 1
    assert stats["decode_steps"] == out.shape[1] - ids.shape[1] - 1
    if method == "offload":
        assert stats["host_kv_bytes"] > 0 and stats["h2d_bytes"] > stats["host_kv_bytes"]
        assert stats["device_kv_bytes"] < stats["host_kv_bytes"] / 5


@pytest.mark.parametrize("method", ["full", "offload"])
def test_kvtier_generate_identical(setup, method):
    model, _, ids, mask, ref = setup
    out = kvtier.generate(model, ids, attention_mask=mask, method=method, max_new_tokens=NEW)
    assert out.shape == ref.shape
    assert torch.equal(out, ref), "first difference at new token %d" % _first_diff(out, ref, ids.shape[1])


def _first_diff(a, b, start):
    n = min(a.shape[1], b.shape[1])
    diff = (a[:, :n] != b[:, :n]).any(0).nonzero()
    return int(diff[0]) - start if len(diff) else n - start
