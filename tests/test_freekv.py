"""FreeKV: selection math, recall bookkeeping, correction, and identity with `full` when the budget covers all."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, batch_prompt
from transformers import DynamicCache

import kvtier
from kvtier.quant import LowBitKeys, LowBitValues, quantize_keys, quantize_values
from kvtier.link import nbytes
from kvtier.retrieval.scorer import DigestScorer, LowBitScorer
from kvtier.selection import digest_page_probs, page_digest, page_scores, query_similarity
from kvtier.store import from_pages

SMALL = dict(page_size=4, sink=8, window=8)


# -- selection math ------------------------------------------------------------------------------------------
def test_page_digest_is_elementwise_max_and_min():
    torch.manual_seed(0)
    keys = torch.randn(2, 3, 20, 8)
    dmax, dmin = page_digest(keys, 4)
    assert dmax.shape == dmin.shape == (2, 3, 5, 8)
    for page in range(5):
        chunk = keys[:, :, page * 4:(page + 1) * 4]
        assert torch.equal(dmax[:, :, page], chunk.max(dim=2).values)
        assert torch.equal(dmin[:, :, page], chunk.min(dim=2).values)
    with pytest.raises(ValueError):
        page_digest(keys[:, :, :19], 4)


def test_page_score_bounds_every_key_in_the_page():
    torch.manual_seed(1)
    b, hkv, g, d, p, pages = 2, 2, 3, 16, 8, 6
    keys = torch.randn(b, hkv, pages * p, d)
    q = torch.randn(b, hkv * g, d)
    dmax, dmin = page_digest(keys, p)
    bound = page_scores(q, dmax, dmin)  # [b, hkv, g, pages]
    qg = q.view(b, hkv, g, d)
    exact = torch.einsum("bhgd,bhnd->bhgn", qg, keys).view(b, hkv, g, pages, p)
    assert bool((exact.max(-1).values <= bound + 1e-5).all())
    # the bound is tight for a one-token page
    dmax1, dmin1 = page_digest(keys, 1)
    tight = page_scores(q, dmax1, dmin1)
    torch.testing.assert_close(tight, torch.einsum("bhgd,bhnd->bhgn", qg, keys))


def test_page_probabilities_average_each_query_heads_softmax_over_the_range():
    torch.manual_seed(2)
    keys, q = torch.randn(1, 2, 28, 8), torch.randn(1, 6, 1, 8)
    dmax, dmin = page_digest(keys, 4)
    probs = digest_page_probs(q, dmax, dmin, 0.5, 1, 6)
    scores = page_scores(q[:, :, 0], dmax[:, :, 1:6], dmin[:, :, 1:6])  # [1, 2, 3 heads per group, 5 pages]
    expected = torch.softmax(scores * 0.5, dim=-1).mean(dim=2)
    torch.testing.assert_close(probs[:, :, 0, 1:6], expected)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2, 1))
    assert not probs[..., 0].any() and not probs[..., 6].any()


def test_digest_scorer_ranks_pages_of_its_range_only():
    torch.manual_seed(3)
    keys = torch.randn(1, 2, 40, 8)
    q = torch.randn(1, 4, 2, 8)  # two query tokens: each gets its own row
    scorer = DigestScorer(keys, pages=12, page_size=4)  # capacity beyond the 10 pages written
    scorer.add_pages(0, keys)
    probs = scorer.page_probs(q, lo=3, hi=9, scaling=0.35)
    assert probs.shape == (1, 2, 2, 12)
    dmax, dmin = page_digest(keys, 4)
    for t in range(2):
        expected = torch.softmax(page_scores(q[:, :, t], dmax[:, :, 3:9], dmin[:, :, 3:9]) * 0.35, -1).mean(2)
        torch.testing.assert_close(probs[:, :, t, 3:9], expected)
    assert not probs[..., :3].any() and not probs[..., 9:].any(), "pages outside the range get nothing"


def _page_mass(q, keys, page_size, scaling):
    """Reference: each query head's softmax over all tokens, summed per page, averaged over the group."""
    b, num_heads, d = q.shape
    kv = keys.shape[1]
    logits = torch.einsum("bhgd,bhnd->bhgn", q.view(b, kv, num_heads // kv, d), keys) * scaling
    return torch.softmax(logits, -1).unflatten(-1, (-1, page_size)).sum(-1).mean(2)


def test_lowbit_scorer_page_probs_are_page_attention_mass_of_the_dequantized_keys():
    torch.manual_seed(5)
    q, keys = torch.randn(2, 6, 1, 16), torch.randn(2, 2, 48, 16)
    scorer = LowBitScorer(bits=2, group=16, page_size=4, capacity=64)
    for chunk in keys.split([16, 32], dim=2):  # whole groups, in order
        scorer.add_tokens(chunk)
    dequantized = quantize_keys(keys, 2, 16).dequantize()
    probs = scorer.page_probs(q, 2, 12, scaling=0.25)
    assert probs.shape == (2, 2, 1, 16)
    torch.testing.assert_close(probs[:, :, 0, 2:12], _page_mass(q[:, :, 0], dequantized[:, :, 8:48], 4, 0.25))
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 1))
    raw = scorer.token_scores(q, 0.25)  # the raw scores, computed once, give the same
    torch.testing.assert_close(scorer.page_probs(q, 2, 12, 0.25, raw), probs)


def test_lowbit_scoring_finds_the_page_a_query_points_at():
    """A page whose keys all align with the query wins, although another page has one larger key element:
    that one element makes the min/max bound of its page large too, attention mass does not follow it."""
    torch.manual_seed(6)
    d, page = 16, 4
    keys = 0.1 * torch.randn(1, 1, 40, d)
    q = torch.zeros(1, 1, 1, d)
    q[..., :8] = 1.0
    keys[:, :, 20:24, :8] += 1.0  # page 5: every key aligned with q
    keys[:, :, 33, 0] += 10.0  # page 8: one key with one large channel
    lowbit = LowBitScorer(bits=2, group=8, page_size=page, capacity=40)
    lowbit.add_tokens(keys)
    assert lowbit.page_probs(q, 0, 10, d ** -0.5).argmax().item() == 5
    digest = DigestScorer(keys, 10, page)
    digest.add_pages(0, keys)
    assert digest.page_probs(q, 0, 10, d ** -0.5).argmax().item() == 8, \
        "the digest bound prefers the outlier page: the case low-bit scoring fixes"


def test_lowbit_keys_grow_and_count_what_they_hold():
    store = LowBitKeys(bits=2, group_size=8)
    keys = torch.randn(1, 2, 1004, 16)  # long enough that the growth margin (store.grown) is a small share
    for i in range(1004):  # token by token: buffers grow with a margin, codes equal one-shot quantization
        store.append(keys[:, :, i:i + 1])
    q = store.quantized()
    whole = quantize_keys(keys[:, :, :1000], 2, 8)
    assert torch.equal(q.packed, whole.packed) and torch.equal(q.scale, whole.scale)
    assert torch.equal(store.pending, keys[:, :, 1000:])
    assert store.nbytes() == sum(t.numel() * t.element_size() for t in store.tensors())
    assert store.nbytes() < keys.numel() * keys.element_size() / 2  # 2 bits + 2 x 32 bits per 8 tokens, vs 32
    with pytest.raises(ValueError, match="do not match"):
        store.append(torch.randn(1, 3, 1, 16))


@pytest.mark.parametrize("store", [LowBitKeys(2, 8), LowBitValues(2, 8)], ids=["keys", "values"])
def test_lowbit_stores_reserved_once_hold_no_margin(store):
    """After reserve(n) the buffers are sized once for n tokens: appending up to n never regrows them (a margin
    would be device memory counted against the method), and past n they still grow."""
    store.reserve(64)
    x = torch.randn(1, 2, 80, 16)
    store.append(x[:, :, :40])
    held = store.packed
    assert held.shape[2] == 64
    for i in range(40, 64):
        store.append(x[:, :, i:i + 1])
    assert store.packed is held
    store.append(x[:, :, 64:80])
    assert store.packed.shape[2] >= 80


def test_lowbit_values_grow_per_token_and_match_quantize_values():
    v = torch.randn(2, 3, 40, 16, generator=torch.Generator().manual_seed(0))
    store = LowBitValues(bits=2, group_size=8)
    assert store.quantized() is None
    for start, end in [(0, 4), (4, 5), (5, 5), (5, 40)]:  # growing past its capacity, and an empty block
        store.append(v[:, :, start:end])
    assert store.tokens == 40
    torch.testing.assert_close(store.quantized().dequantize(), quantize_values(v, 2, 8).dequantize(), rtol=0,
                               atol=0)
    assert store.nbytes() >= store.quantized().nbytes
    with pytest.raises(ValueError, match="do not match"):
        store.append(v[:1])
    with pytest.raises(ValueError, match="does not divide"):
        LowBitValues(2, 6).append(v)


def test_query_similarity_is_grouped_cosine():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]])
    prev = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [-1.0, -1.0], [1.0, 0.0]]])
    sim = query_similarity(q, prev, num_kv_heads=2)
    torch.testing.assert_close(sim, torch.tensor([[0.5, 0.0]]))


# -- the method ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("speculative, scorer, rest", [(True, "digest", "drop"), (False, "digest", "drop"),
                                                       (True, "lowbit", "drop"), (True, "lowbit", "lowbit")])
def test_budget_covering_the_context_is_identical_to_full(tiny_pair, family, batch, speculative, scorer, rest):
    ref_model, model = tiny_pair(family)
    ids, mask = batch_prompt(batch, length=45, pad=9)
    new = 40
    expected = ref_model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, past_key_values=DynamicCache(config=ref_model.config))
    opts = dict(budget=128, speculative=speculative, scorer=scorer, rest=rest, **SMALL)
    cache = kvtier.KVCache(model, method="freekv", **opts)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         past_key_values=cache)
    assert torch.equal(out, expected)
    stats = cache.stats()
    assert stats["recalled_pages"] > 0, "pages left the window and had to be recalled"
    own = kvtier.generate(model, ids, attention_mask=mask, method="freekv", max_new_tokens=new, eos_token_id=-1,
                          **opts)
    assert torch.equal(own, expected)


def run_steps(model, cache, ids, steps):
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache)
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=nxt, past_key_values=cache)
            yield nxt


@pytest.mark.parametrize("scorer", ["digest", "lowbit"])
def test_recall_bookkeeping_no_page_lost_or_duplicated(tiny, scorer):
    model = tiny("llama", num_hidden_layers=2)
    ids, _ = batch_prompt(2, length=60, pad=0)
    cache = kvtier.KVCache(model, method="freekv", budget=32, dense_layers=0, scorer=scorer, score_group=8, **SMALL)
    method = cache.method
    recalled_before = 0
    for _ in run_steps(model, cache, ids, 12):
        for layer in range(2):
            st = method.layers[layer]
            resident = st.table.slot_page
            for row in resident.flatten(0, 1).tolist():
                pages = [p for p in row if p >= 0]
                assert len(pages) == len(set(pages)), "a page sits in two slots"
            # every wanted page is resident, and each slot holds its page's exact data at its positions
            for s in range(2):
                for h in range(model.config.num_key_value_heads):
                    assert set(st.wanted[s, h].tolist()) <= set(resident[s, h].tolist())
                    for j, page in enumerate(resident[s, h].tolist()):
                        rows = slice(st.slot_start + j * 4, st.slot_start + (j + 1) * 4)
                        if page < 0:
                            assert (st.pos[s, h, rows] == -1).all()
                            continue
                        k_host, v_host = from_pages(method.pool.pages[layer][page:page + 1, s:s + 1, h:h + 1])
                        assert torch.equal(st.k[s, h, rows], k_host[0, 0])
                        assert torch.equal(st.v[s, h, rows], v_host[0, 0])
                        assert st.pos[s, h, rows].tolist() == list(range(page * 4, page * 4 + 4))
                    # what the next step attends (the window will have moved: the next selection may already
                    # hold the page about to leave it) holds every position at most once
                    start = method._next_start(st, method.lengths[layer] + 1)
                    pos = st.pos[s, h].tolist()
                    seen = [p for i, p in enumerate(pos) if p >= 0 and (i < st.ring_start or p >= start)]
                    assert len(seen) == len(set(seen)) and max(seen) < method.lengths[layer]
        recalled = cache.stats()["recalled_pages"]
        assert recalled >= recalled_before
        recalled_before = recalled
    # resident pages are reused: far fewer copies than slots x heads x layers x steps
    assert recalled < 12 * 2 * 2 * 2 * method.o.slots
    for st in method.layers:  # one scorer's state only: the other is neither built nor held
        assert isinstance(st.scorer, LowBitScorer if scorer == "lowbit" else DigestScorer)


def test_rest_lowbit_reads_every_token_once(tiny):
    """rest="lowbit": attention sees each past position exactly once per KV head, at full precision where it is
    in the sink, the window or a recalled page, and from the low-bit copy everywhere else."""
    model = tiny("llama", num_hidden_layers=2)
    ids, _ = batch_prompt(2, length=60, pad=0)
    cache = kvtier.KVCache(model, method="freekv", budget=32, dense_layers=0, scorer="lowbit", score_group=8,
                           rest="lowbit", **SMALL)
    method = cache.method
    for _ in run_steps(model, cache, ids, 10):
        n = method.lengths[1]
        st = method.layers[1]
        resident = st.table.page_slot >= 0  # [b, h, pages + 1]: the pages some slot holds
        written_k, written_v = from_pages(method.pool.layer_block(1))
        scored = st.scored
        low_k = quantize_keys(written_k[:, :, :scored], 2, 8).dequantize()
        low_v = quantize_values(written_v[:, :, :scored], 2, 16).dequantize()  # per token, head_dim 16: one group
        torch.testing.assert_close(st.scorer.quantized().dequantize()[:, :, :scored], low_k)
        torch.testing.assert_close(st.values.quantized().dequantize(), low_v)
        start = method._next_start(st, n + 1)  # as the next step will see it (see the bookkeeping test)
        for s in range(2):
            for h in range(2):
                exact = [p for i, p in enumerate(st.pos[s, h].tolist()) if p >= 0 and (i < st.ring_start or p >= start)]
                rest = [p for p in range(8, start) if not resident[s, h, p // 4]]
                assert sorted(exact + rest) == list(range(n)), "a position is missing or counted twice"
    # the low-bit values are counted on the device with the rest of the layer's state
    assert method.ledger.held["layer1"] == sum(nbytes(t) for t in st.tensors())
    assert st.values.nbytes() > 0


def test_host_pool_holds_the_whole_cache(tiny):
    model = tiny("qwen3", num_hidden_layers=2)
    ids, _ = batch_prompt(1, length=50)
    full = kvtier.KVCache(model, method="full")
    list(run_steps(model, full, ids, 9))
    model2 = tiny("qwen3", num_hidden_layers=2)
    cache = kvtier.KVCache(model2, method="freekv", budget=32, dense_layers=0, **SMALL)
    list(run_steps(model2, cache, ids, 9))
    method = cache.method
    for layer in range(2):
        pages = method.pool.num_pages[layer]
        k, v = from_pages(method.pool.layer_block(layer))
        n = pages * 4
        # identical prefill; decode diverges only through the approximate attention, so compare the prompt
        torch.testing.assert_close(k[:, :, :48], full.method.keys[layer][:, :, :48])
        torch.testing.assert_close(v[:, :, :48], full.method.values[layer][:, :, :48])
        assert n == (50 + 9) // 4 * 4
    assert cache.stats()["host_kv_bytes"] == sum(method.pool.num_pages) * method.pool.page_bytes


@pytest.mark.parametrize("tau,expect", [(1.0, "all"), (-1.0, "none")])
def test_correction_triggers_by_threshold(tiny, tau, expect):
    model = tiny("llama", num_hidden_layers=2)
    ids, _ = batch_prompt(1, length=60)
    cache = kvtier.KVCache(model, method="freekv", budget=32, dense_layers=0, tau=tau, **SMALL)
    list(run_steps(model, cache, ids, 6))
    stats = cache.stats()
    method = cache.method
    checks = method.checks
    assert checks == 5 * 2 * model.config.num_key_value_heads  # every step after the first, every layer, head
    if expect == "all":
        # cosine similarity of distinct queries is below 1: every head is corrected
        assert stats["corrections"] == checks and stats["correction_rate"] == 1.0
    else:
        assert stats["corrections"] == 0 and stats["correction_rate"] == 0.0
    assert len(stats["correction_rate_per_layer"]) == model.config.num_hidden_layers


def test_non_speculative_selects_synchronously_every_step(tiny):
    model = tiny("llama", num_hidden_layers=2)
    ids, _ = batch_prompt(1, length=60)
    cache = kvtier.KVCache(model, method="freekv", budget=32, dense_layers=0, speculative=False, **SMALL)
    list(run_steps(model, cache, ids, 5))
    stats = cache.stats()
    assert stats["corrections"] == 0
    assert stats["selections"] == 5 * 2


def test_dense_layers_keep_everything_on_device(tiny):
    model = tiny("llama", num_hidden_layers=3)
    ids, _ = batch_prompt(1, length=60)
    cache = kvtier.KVCache(model, method="freekv", budget=32, dense_layers=1, **SMALL)
    list(run_steps(model, cache, ids, 3))
    method = cache.method
    assert method.layers[0] is None and method.dense.lengths[0] == 63
    assert method.pool.num_pages[0] == 0 and method.pool.num_pages[1] > 0


@pytest.mark.parametrize("options, sink, window", [
    (dict(), 128, 128),  # the paper's values (FreeKVOptions.edge_tokens) at the default budget of 2048
    (dict(budget=512), 32, 32),  # a sixteenth of the budget each
    (dict(budget=1024, page_size=16), 64, 64),
    (dict(budget=100, page_size=32), 32, 32),  # at least one page
    (dict(budget=8192), 128, 128),  # at most the paper's 128
    (dict(budget=512, sink=64), 64, 32),  # explicit values win
])
def test_sink_and_window_scale_with_the_budget(tiny, options, sink, window):
    method = kvtier.KVCache(tiny("llama"), method="freekv", **options).method
    assert (method.o.sink, method.o.window) == (sink, window)
    assert method.o.slots == (method.options["budget"] - sink - window) // method.o.page_size


@pytest.mark.parametrize("bad", [dict(budget=16, **SMALL), dict(page_size=4, sink=6, window=8),
                                 dict(tau=2.0), dict(dense_layers=99), dict(speculative="yes"),
                                 dict(budget=-1), dict(page_size=0), dict(scorer="exact"), dict(score_bits=3),
                                 dict(score_bits=True), dict(page_size=32, score_group=48), dict(score_group=0),
                                 dict(rest="zero"), dict(rest="lowbit")])
def test_bad_options_are_clear_errors(tiny, bad):
    with pytest.raises(ValueError, match="freekv"):
        kvtier.KVCache(tiny("llama"), method="freekv", **bad)


@pytest.mark.parametrize("scorer", ["digest", "lowbit"])
def test_traffic_and_memory_at_4k_budget_512(tiny, scorer):
    """h2d per decode step >= 10x below offload; device KV >= 4x below full (4k context, 16 layers of which the
    first stays dense: the ratio depends on the share of dense layers, 1/30 on the embedded model)."""
    model = tiny("llama", num_hidden_layers=16, max_position_embeddings=8192)
    ids = torch.randint(3, 256, (1, 4096), generator=torch.Generator().manual_seed(0))
    per_step = {}
    device = {}
    for method in ("full", "offload", "freekv"):
        opts = dict(budget=512, scorer=scorer, page_size=32 if scorer == "digest" else 8) if method == "freekv" else {}
        cache = kvtier.KVCache(model, method=method, **opts)
        cache.reserve(4096 + 9)
        steps = list(run_steps(model, cache, ids, 1))
        before = cache.stats()["h2d_bytes"]
        steps = list(run_steps_continue(model, cache, steps[-1], 8))
        per_step[method] = (cache.stats()["h2d_bytes"] - before) / 8
        stats = cache.stats()
        # the state a layer keeps; a step's workspace (on CPU: one layer's low-bit copy dequantized by the
        # PyTorch reference, which kernels never write out) is counted in device_kv_bytes, beside it
        device[method] = stats["device_kv_bytes"] - stats.get("device_workspace_bytes", 0)
        if method == "freekv":
            assert 0 < stats["device_workspace_bytes"] < stats["device_kv_bytes"]
    assert per_step["freekv"] * 10 <= per_step["offload"], per_step
    assert device["freekv"] * 4 <= device["full"], device


def run_steps_continue(model, cache, nxt, steps):
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=cache)
            nxt = out.logits[:, -1:].argmax(-1)
            yield nxt


@pytest.mark.parametrize("length", [64, 66])
def test_chunked_prefill_reads_the_whole_cache(tiny_pair, monkeypatch, length):
    """A prompt longer than one prefill chunk: later chunks attend over everything (also when the first chunk
    ended on a page boundary, so no token is left outside the host pool)."""
    import sys

    monkeypatch.setattr(sys.modules["kvtier.generate"], "PREFILL_CHUNK", 32)
    ref, model = tiny_pair("llama")
    ids, _ = batch_prompt(1, length=length)
    expected = kvtier.generate(ref, ids, method="full", max_new_tokens=8, eos_token_id=-1)
    out = kvtier.generate(model, ids, method="freekv", budget=256, max_new_tokens=8, eos_token_id=-1, **SMALL)
    assert torch.equal(out, expected)


def test_pages_chosen_by_the_speculative_token_is_an_option(tiny_pair):
    """A combination neither paper has: FreeKV's pages selected by kvtier.generate's speculative next token
    (SpeCache's query source). With a budget covering the context it is exact; it reports its hit rate."""
    ref, model = tiny_pair("qwen2")
    ids, mask = batch_prompt(2, length=45, pad=9)
    expected = kvtier.generate(ref, ids, attention_mask=mask, method="full", max_new_tokens=30, eos_token_id=-1)
    cache = kvtier.KVCache(model, method="freekv", budget=128, query="speculative", **SMALL)
    assert cache.method.supports_speculation
    out = kvtier.generate(model, ids, attention_mask=mask, cache=cache, max_new_tokens=30, eos_token_id=-1)
    assert torch.equal(out, expected)
    stats = cache.stats()
    assert stats["query"] == "speculative" and 0.0 <= stats["prefetch_hit_rate"] <= 1.0


@pytest.mark.parametrize("options", [dict(), dict(scorer="lowbit", score_group=8, rest="lowbit")])
def test_the_ledger_counts_every_buffer_and_the_step_workspace(tiny, options):
    model = tiny("llama", num_hidden_layers=2)
    ids, _ = batch_prompt(1, length=60)
    cache = kvtier.KVCache(model, method="freekv", budget=32, dense_layers=0, **SMALL, **options)
    list(run_steps(model, cache, ids, 6))
    method = cache.method
    held = method.ledger.held
    for layer, st in enumerate(method.layers):
        assert held[f"layer{layer}"] == sum(nbytes(t) for t in st.tensors())
    assert held["step_workspace"] > 0, "the transient scores of a step are device memory too"
    assert method.ledger.peak >= sum(held.values())
    assert cache.stats()["device_kv_bytes"] == method.ledger.peak


@pytest.mark.parametrize("options", [dict(), dict(scorer="lowbit", score_group=8, rest="lowbit")])
def test_growing_past_the_first_capacity_stays_exact(tiny_pair, options):
    """model.generate without max_length: the layer state starts at the prompt + a margin and grows once the
    sequence passes it; with a budget covering the context the output stays full's."""
    ref, model = tiny_pair("llama", num_hidden_layers=2)
    ids, mask = batch_prompt(1, length=20)
    new = 262  # past the 20 + 256 tokens sized at the prompt
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                            past_key_values=DynamicCache(config=ref.config))
    cache = kvtier.KVCache(model, method="freekv", budget=512, dense_layers=0, **SMALL, **options)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         past_key_values=cache)
    assert torch.equal(out, expected)
    assert cache.method.layers[1].capacity > 20 + 256


def test_a_budget_beyond_the_sequence_holds_no_more_than_the_sequence_needs(tiny):
    """Slots and the window's ring are sized by what the reserved length can fill: a budget of a billion tokens on
    a 300-token prompt holds what one covering the prompt holds, and gives the same tokens."""
    model = tiny("llama", num_hidden_layers=2)
    ids, _ = batch_prompt(1, length=300)
    held, tokens = {}, {}
    for method, options in (("full", {}), ("freekv", dict(budget=2048)), ("freekv", dict(budget=10**9)),
                            ("specache", dict(topk=10**6, residual=10**5))):
        cache = kvtier.KVCache(model, method=method, **options)
        tokens[method, str(options)] = kvtier.generate(model, ids, cache=cache, max_new_tokens=4)
        held[method, str(options)] = cache.stats()["device_kv_bytes"]
    full = held["full", "{}"]
    assert held["freekv", "{'budget': 2048}"] == held["freekv", "{'budget': 1000000000}"] < 1.5 * full
    assert held["specache", "{'topk': 1000000, 'residual': 100000}"] < 2 * full
    assert torch.equal(tokens["freekv", "{'budget': 2048}"], tokens["freekv", "{'budget': 1000000000}"])


@pytest.mark.parametrize("method, options", [
    ("freekv", dict(budget=256, page_size=8, sink=16, window=64, dense_layers=0)),
    ("freekv", dict(budget=256, page_size=8, sink=16, window=64, dense_layers=0, scorer="lowbit", rest="lowbit",
                    score_group=8)),
    ("specache", dict(topk=64, residual=64, group_size=16, speculative=False)),
])
def test_a_sequence_past_its_reserved_length_widens_slots_and_ring_and_decodes_the_same(tiny, monkeypatch, method,
                                                                                          options):
    """Without reserve() a layer starts at the prompt's length and a margin, with as many slots and ring rows as
    that fills; as the sequence grows they widen (the ring's tokens move to their rows in the larger ring) and
    every step attends what a cache sized for the whole sequence from the start attends."""
    monkeypatch.setattr(kvtier.sizes, "GROWTH_MARGIN", 8)  # grow every few steps, not once in 256
    model = tiny("llama", num_hidden_layers=2)
    ids, _ = batch_prompt(1, length=40)
    sized, growing = (kvtier.KVCache(model, method=method, **options) for _ in range(2))
    sized.reserve(40 + 90)
    first = growing.method
    with torch.no_grad():
        out_sized = model(input_ids=ids, past_key_values=sized)
        out_growing = model(input_ids=ids, past_key_values=growing)
        slots, ring = first.layers[1].table.slots, first.layers[1].ring
        for _ in range(90):
            nxt = out_sized.logits[:, -1:].argmax(-1)  # both fed the same tokens
            out_sized = model(input_ids=nxt, past_key_values=sized)
            out_growing = model(input_ids=nxt, past_key_values=growing)
            torch.testing.assert_close(out_growing.logits, out_sized.logits, atol=1e-4, rtol=1e-4)
    st = first.layers[1]
    assert slots < st.table.slots <= first.o.slots and ring < st.ring == first.o.ring
    assert growing.stats()["device_kv_bytes"] == growing.method.ledger.peak


def test_widen_never_narrows_a_layer(tiny):
    """A layer holding more slots and ring than its capacity needs (a cache file saved before the rows were capped
    to the reserved length) keeps them as it grows."""
    model = tiny("llama", num_hidden_layers=2)
    ids, _ = batch_prompt(1, length=40)
    cache = kvtier.KVCache(model, method="freekv", budget=256, page_size=8, sink=16, window=64, dense_layers=0)
    cache.reserve(1000)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
    st = cache.method.layers[1]
    held = (st.table.slots, st.ring, st.k.shape)
    st.widen(cache.method.o, 48)
    assert (st.table.slots, st.ring, st.k.shape) == held
