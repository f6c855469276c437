"""Prefix reuse on tiny random models, for every method: fork, save and load a prefilled cache, and continue it
with kvtier.generate (input_ids = the whole sequence; the cached tokens are not fed again).

Exact methods must give a fresh prefill's tokens; every method must give what the same cache gives without the
fork or the round trip through a file, also from a cache saved in the middle of decoding (selection state,
recalled pages, speculative guesses). Forks of one parent never see each other's tokens.
"""

from __future__ import annotations

import pytest
import torch

import kvtier
from kvtier.generate import prefill
from kvtier.link import Link
from kvtier.store import HostPool

SMALL_FREEKV = dict(page_size=4, sink=8, window=8, budget=40)
SMALL_SPECACHE = dict(group_size=8, residual=8, topk=8)
KVPR_PROFILE = {"h2d_bytes_per_s": 25e9, "matmul_flops_per_s": 100e12}
CASES = [
    ("full", {}),
    ("offload", {}),
    ("kvpr", {"split": 16, "profile": KVPR_PROFILE}),  # keeps the layer inputs too: shared like the pages
    ("freekv", SMALL_FREEKV),
    ("freekv", {**SMALL_FREEKV, "scorer": "lowbit", "score_group": 8, "rest": "lowbit", "tau": 0.9}),
    ("specache", SMALL_SPECACHE),
    ("specache", {**SMALL_SPECACHE, "speculative": False}),
]
EXACT = {"full", "offload", "kvpr"}


def _label(case):
    name, opts = case
    return name + "".join(f":{k}={v}" for k, v in opts.items() if k != "profile")


def _ids(n, seed):
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


DOC = _ids(100, 0)
QUESTIONS = [_ids(7, 1), _ids(9, 2), _ids(5, 3)]


def _prefilled(model, method, opts, ids=DOC):
    # room for the questions and answers: forks append in place into the shared host buffers (no growth)
    cache = kvtier.KVCache(model, method=method, max_length=200, **opts)
    with torch.inference_mode():
        prefill(model, cache, ids)
    return cache


def _ask(model, cache, question, new=12, prefix=DOC):
    return kvtier.generate(model, torch.cat((prefix, question), 1), cache=cache, max_new_tokens=new, eos_token_id=-1)


@pytest.mark.parametrize("case", CASES, ids=[_label(c) for c in CASES])
def test_forks_answer_as_the_cache_they_came_from(tiny, case, tmp_path):
    name, opts = case
    model = tiny("llama")
    parent = _prefilled(model, name, opts)
    forks = [parent.fork() for _ in QUESTIONS]
    parent.save(tmp_path / "doc.kvc")
    answers = [_ask(model, fork, q) for fork, q in zip(forks, QUESTIONS)]
    for question, answer in zip(QUESTIONS, answers):
        loaded = kvtier.KVCache.load(tmp_path / "doc.kvc", model)
        assert torch.equal(loaded.token_ids, DOC)
        assert torch.equal(_ask(model, loaded, question), answer)
        # the same method without a fork or a file: a cache prefilled the same way, asked directly
        assert torch.equal(_ask(model, _prefilled(model, name, opts), question), answer)
        if name in EXACT:  # and a fresh prefill of document + question
            fresh = kvtier.generate(model, torch.cat((DOC, question), 1), method=name, max_new_tokens=12,
                                    eos_token_id=-1, **opts)
            assert torch.equal(fresh, answer)
    assert parent.stats()["tokens"] == DOC.shape[1]  # the forks' tokens went to the forks only
    assert torch.equal(_ask(model, parent, QUESTIONS[0]), answers[0])  # the parent goes on unharmed


@pytest.mark.parametrize("case", CASES, ids=[_label(c) for c in CASES])
def test_saved_in_the_middle_of_decoding(tiny, case, tmp_path):
    """A cache saved (or forked) after decode steps holds its selection state: the continuation is the same."""
    name, opts = case
    model = tiny("qwen3")
    cache = _prefilled(model, name, opts)
    first = _ask(model, cache, QUESTIONS[0], new=10)  # the cache holds all but the last new token
    cache.save(tmp_path / "mid.kvc")
    forked = cache.fork()
    assert torch.equal(cache.token_ids, first[:, :-1])
    follow = torch.cat((first, QUESTIONS[1]), 1)
    expected = kvtier.generate(model, follow, cache=cache, max_new_tokens=10, eos_token_id=-1)
    loaded = kvtier.KVCache.load(tmp_path / "mid.kvc", model)
    assert torch.equal(kvtier.generate(model, follow, cache=loaded, max_new_tokens=10, eos_token_id=-1), expected)
    assert torch.equal(kvtier.generate(model, follow, cache=forked, max_new_tokens=10, eos_token_id=-1), expected)
    assert loaded.stats()["decode_steps"] == cache.stats()["decode_steps"]
    assert loaded.stats()["h2d_bytes"] == cache.stats()["h2d_bytes"]


@pytest.mark.parametrize("case", CASES, ids=[_label(c) for c in CASES])
def test_model_generate_continues_a_fork(tiny, case):
    """transformers' own prefix reuse: model.generate(whole sequence, past_key_values=fork)."""
    name, opts = case
    model = tiny("mistral")
    full = torch.cat((DOC, QUESTIONS[0]), 1)
    with torch.inference_mode():
        expected = model.generate(full, attention_mask=torch.ones_like(full), max_new_tokens=6, do_sample=False,
                                  past_key_values=kvtier.KVCache(model, method=name, **opts))
        fork = _prefilled(model, name, opts).fork()
        # model.generate slices off the 100 tokens the fork holds and feeds the question's 7
        out = model.generate(full, attention_mask=torch.ones_like(full), past_key_values=fork, max_new_tokens=6,
                             do_sample=False)
    assert out.shape == expected.shape
    if name in EXACT:
        assert torch.equal(out, expected)
    assert fork.stats()["tokens"] == out.shape[1] - 1
    assert torch.equal(fork.token_ids, out[:, :-1])


@pytest.mark.parametrize("method", ["full", "offload", "kvpr", "freekv"])
def test_forks_of_one_parent_do_not_corrupt_each_other(tiny, method):
    """Forks run interleaved, and the parent goes on after them: each matches a cache run alone."""
    model = tiny("llama")
    opts = dict(CASES)[method]

    def run(caches):
        outs = [torch.cat((DOC, q), 1) for q in QUESTIONS]
        for _ in range(3):  # three rounds, each cache in turn: their host appends interleave
            outs = [kvtier.generate(model, out, cache=c, max_new_tokens=5, eos_token_id=-1)
                    for c, out in zip(caches, outs)]
        return outs

    parent = _prefilled(model, method, opts)
    caches = [parent.fork(), parent.fork(), parent]
    forked = run(caches)
    for question, got, cache in zip(QUESTIONS, forked, caches):
        alone, out = _prefilled(model, method, opts), torch.cat((DOC, question), 1)
        for _ in range(3):
            out = kvtier.generate(model, out, cache=alone, max_new_tokens=5, eos_token_id=-1)
        assert torch.equal(got, out)
        if method != "full":  # and the host pages hold exactly what a cache run alone wrote
            for layer in range(model.config.num_hidden_layers):
                if alone.method.pool.pages[layer] is not None:  # (freekv keeps its first layer whole, on the device)
                    assert torch.equal(cache.method.pool.layer_block(layer), alone.method.pool.layer_block(layer))
                if method == "kvpr":  # the layer inputs it keeps are shared the same way
                    n = alone.method.num_acts[layer]
                    assert n > 100 and torch.equal(cache.method.acts[layer][:n], alone.method.acts[layer][:n])


def test_forks_share_the_host_pages_and_copy_only_on_write():
    """HostPool.fork shares the buffer; the first to append past the shared rows does so in place, any other
    copies first; rows of the shared prefix are never written again."""
    link = Link("cpu")
    pool = HostPool(1, 1, 2, 4, 2, torch.float32, link)
    pool.reserve(0, 16)

    def pages(n, value):
        return torch.full((n, 1, 2, 2, 2, 4), float(value))

    pool.write(0, pages(3, 1))
    a, b = pool.fork(Link("cpu")), pool.fork(Link("cpu"))
    base = pool.pages[0].data_ptr()
    assert a.pages[0].data_ptr() == base and b.pages[0].data_ptr() == base  # shared, not copied
    a.write(0, pages(2, 2))  # nobody holds rows past 3: in place
    assert a.pages[0].data_ptr() == base
    b.write(0, pages(1, 3))  # a holds rows 3..4: copy first
    assert b.pages[0].data_ptr() != base
    pool.write(0, pages(1, 4))  # a holds rows 3..4: copy first
    assert pool.pages[0].data_ptr() != base
    assert a.layer_block(0)[:, 0, 0, 0, 0, 0].tolist() == [1, 1, 1, 2, 2]
    assert b.layer_block(0)[:, 0, 0, 0, 0, 0].tolist() == [1, 1, 1, 3]
    assert pool.layer_block(0)[:, 0, 0, 0, 0, 0].tolist() == [1, 1, 1, 4]
    # a fork that is gone no longer holds its rows: `a` goes on in place after its own fork `c` is dropped
    c = a.fork(Link("cpu"))
    del c
    a.write(0, pages(1, 5))
    assert a.pages[0].data_ptr() == base and a.layer_block(0)[:, 0, 0, 0, 0, 0].tolist() == [1, 1, 1, 2, 2, 5]


def test_a_fork_counts_what_its_parent_counted_and_goes_on(tiny):
    model = tiny("llama")
    parent = _prefilled(model, "offload", {})
    fork = parent.fork()
    before = parent.stats()
    assert fork.stats() == before  # the prefix's traffic and memory, carried on
    _ask(model, fork, QUESTIONS[0], new=4)
    assert parent.stats() == before
    # the fork appended its tokens in place, past the parent's rows: the document's pages were never copied
    for layer in range(model.config.num_hidden_layers):
        assert fork.method.pool.pages[layer].data_ptr() == parent.method.pool.pages[layer].data_ptr()
    assert fork.stats()["d2h_bytes"] > before["d2h_bytes"] and fork.stats()["tokens"] > before["tokens"]


def test_fork_and_save_refuse_a_broken_cache(tiny, tmp_path):
    model = tiny("llama")
    cache = _prefilled(model, "full", {})
    cache._break("a test interrupted it")
    with pytest.raises(kvtier.CacheBrokenError):
        cache.fork()
    with pytest.raises(kvtier.CacheBrokenError):
        cache.save(tmp_path / "x.kvc")
    assert not (tmp_path / "x.kvc").exists()


def test_generate_checks_the_prefix(tiny):
    model = tiny("llama")
    cache = _prefilled(model, "full", {})
    other = DOC.clone()
    other[0, 42] = 3 if int(other[0, 42]) != 3 else 4
    with pytest.raises(ValueError, match="token 42 is .* in input_ids but .* in the cache"):
        kvtier.generate(model, torch.cat((other, QUESTIONS[0]), 1), cache=cache, max_new_tokens=2)
    with pytest.raises(ValueError, match="the cache already holds 100: give the whole sequence"):
        kvtier.generate(model, QUESTIONS[0], cache=cache, max_new_tokens=2)
    with pytest.raises(ValueError, match="the cache already holds 100"):
        kvtier.generate(model, DOC, cache=cache, max_new_tokens=2)
    with pytest.raises(ValueError, match="has 2 sequences but the cache holds 1"):
        kvtier.generate(model, torch.cat((DOC, DOC)), cache=cache, max_new_tokens=2)
    assert cache.broken is None and cache.stats()["tokens"] == 100  # refused before anything was fed


def test_generate_refuses_a_cache_fed_embeddings(tiny):
    model = tiny("llama")
    cache = kvtier.KVCache(model, method="full")
    with torch.inference_mode():
        model(inputs_embeds=model.get_input_embeddings()(DOC), past_key_values=cache, use_cache=True)
    assert cache.token_ids is None
    with pytest.raises(ValueError, match="fed as embeddings"):
        kvtier.generate(model, torch.cat((DOC, QUESTIONS[0]), 1), cache=cache, max_new_tokens=2)
