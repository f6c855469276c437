"""The C kernels of `kvtier.kernels.native` against their PyTorch references, and the engine on either path."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import batch_prompt

import kvtier
from kvtier.attention import attend_mixed, RestRange
from kvtier.kernels import native
from kvtier.kernels.dequant_score import dequant_scores_reference
from kvtier.quant import dequantize_value_range, quantize_keys, quantize_values
from kvtier.retrieval.recall import PageTable, SlotRows, plan_pages_reference, recall_pages_reference

pytestmark = pytest.mark.skipif(native.library() is None and shutil.which("cc") is None,
                                reason=f"no native kernels: {native.status()}")


def test_the_kernels_build_where_there_is_a_compiler():
    assert native.library() is not None, native.status()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _recall_case(dtype=torch.float32):
    """A host pool layer of 5 pages for 2 pairs, a buffer of 2 pairs x (1 sink + 3 slots + trash) rows of 6
    elements, positions [rows, 3], and a plan with a skipped entry in each pair."""
    gen = _gen(0)
    host = torch.randn(5 * 2, 2, 6, generator=gen).to(dtype)
    keys, values = torch.randn(10, 6, generator=gen).to(dtype), torch.randn(10, 6, generator=gen).to(dtype)
    pos = torch.full((10, 3), -7, dtype=torch.long)
    pages = torch.tensor([[[4, -1, 0], [-1, 2, 3]]])
    slots = torch.tensor([[[2, -1, 0], [-1, 1, 2]]])
    return host, keys, values, pos, pages, slots, SlotRows(heads=2, rows_per_head=5, first_slot=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_recall_pages_skips_minus_one_and_equals_the_reference(dtype):
    host, keys, values, pos, pages, slots, rows = _recall_case(dtype)
    ref = keys.clone(), values.clone(), pos.clone()
    recall_pages_reference(host, *ref, pages, slots, rows)
    ours = keys.clone(), values.clone(), pos.clone()
    assert native.recall_pages(host, *ours, pages, slots, rows, None)
    # pair 0: page 4 into slot 2 (row 3), page 0 into slot 0 (row 1); pair 1: page 2 into row 7, page 3 into row 8
    for row, src, page in ((3, 4 * 2 + 0, 4), (1, 0 * 2 + 0, 0), (7, 2 * 2 + 1, 2), (8, 3 * 2 + 1, 3)):
        assert torch.equal(ours[0][row], host[src, 0]) and torch.equal(ours[1][row], host[src, 1])
        assert ours[2][row].tolist() == [page * 3, page * 3 + 1, page * 3 + 2]
    keep = torch.tensor([r % 5 != 4 for r in range(10)])
    assert all(torch.equal(x[keep], y[keep]) for x, y in zip(ours, ref))
    # the kernel does not touch the trash rows at all (the reference sends the skipped entries there)
    assert torch.equal(ours[0][~keep], keys[~keep]) and torch.equal(ours[1][~keep], values[~keep])
    assert bool((ours[2][~keep] == -7).all()) and bool((ref[2][~keep] == -1).all())
    # heads: only the pairs marked copy
    only = keys.clone(), values.clone(), pos.clone()
    assert native.recall_pages(host, *only, pages, slots, rows, torch.tensor([[False, True]]))
    assert all(torch.equal(x[:5], y[:5]) for x, y in zip(only, (keys, values, pos)))
    assert all(torch.equal(x[5:], y[5:]) for x, y in zip(only, ours))


def test_recall_pages_declines_layouts_it_does_not_handle():
    """False, and nothing written, where the C loop's contiguous same-dtype layout does not hold: the caller runs
    the reference then."""
    host, keys, values, pos, pages, slots, rows = _recall_case()
    before = keys.clone(), values.clone(), pos.clone()
    wide = torch.zeros(10, 12)
    declined = [
        (host, keys.half(), values.half(), pos, pages, slots, None),  # dtypes differ from the host pool's
        (host, keys, values.double(), pos, pages, slots, None),
        (host, wide[:, ::2], values, pos, pages, slots, None),  # keys not contiguous
        (host, keys, values, pos.int(), pages, slots, None),  # positions not int64
        (host, keys, values, pos.t().contiguous().t(), pages, slots, None),  # positions not contiguous
        (host, keys, values, pos, pages.int(), slots, None),  # the plan not int64
        (host, keys, values, pos, pages, slots.int(), None),
        (host.transpose(0, 1).contiguous().transpose(0, 1), keys, values, pos, pages, slots, None),  # host strided
        (host[..., :4].contiguous(), keys, values, pos, pages, slots, None),  # rows of another width
        (host, keys, values, pos, pages, slots, torch.ones(1, 2, dtype=torch.uint8)),  # heads not bool
    ]
    for host_, keys_, values_, pos_, pages_, slots_, heads in declined:
        assert native.recall_pages(host_, keys_, values_, pos_, pages_, slots_, rows, heads) is False
    assert torch.equal(keys, before[0]) and torch.equal(values, before[1]) and torch.equal(pos, before[2])
    assert not wide.any()


def test_plan_pages_equals_the_reference_and_declines_what_it_does_not_serve():
    gen = _gen(1)
    b, h, n_slots, n_pages = 2, 2, 4, 9
    ours, ref = PageTable(b, h, n_slots, n_pages, "cpu"), PageTable(b, h, n_slots, n_pages, "cpu")
    counts = torch.zeros(2, dtype=torch.long)  # the C kernel adds to a 0-dim view with an offset
    for step in range(6):
        wanted = torch.stack([torch.randperm(n_pages, generator=gen)[:3] for _ in range(b * h)]).view(b, h, 3)
        scores = torch.rand(b, h, n_pages, generator=gen) if step % 3 else None
        plan = native.plan_pages(*ours.tensors(), wanted, scores, counts[1])
        assert plan is not None
        expect = plan_pages_reference(*ref.tensors(), wanted, scores, counts[0:1])
        assert torch.equal(plan[0], expect[0]) and torch.equal(plan[1], expect[1])
        assert torch.equal(ours.slot_page, ref.slot_page) and torch.equal(ours.page_slot, ref.page_slot)
        assert int(counts[1]) == int(counts[0]) > 0
    before = ours.slot_page.clone(), ours.page_slot.clone()
    wanted = torch.tensor([[[8, 7, 6]] * h] * b)
    scores = torch.rand(b, h, n_pages, generator=gen)
    declined = [
        (ours.slot_page, ours.page_slot, wanted, scores.double(), None),  # scores not float32
        (ours.slot_page, ours.page_slot, wanted, scores.transpose(0, 1).contiguous().transpose(0, 1), None),
        (ours.slot_page, ours.page_slot, wanted.int(), scores, None),  # wanted not int64
        (ours.slot_page, ours.page_slot, wanted, scores, torch.zeros((), dtype=torch.int32)),  # counter not int64
        (ours.slot_page, ours.page_slot, wanted, scores, torch.zeros(2, dtype=torch.long)),  # not one counter
        (ours.slot_page.transpose(0, 1).contiguous().transpose(0, 1), ours.page_slot, wanted, scores, None),
    ]
    for args in declined:
        assert native.plan_pages(*args) is None
    assert torch.equal(ours.slot_page, before[0]) and torch.equal(ours.page_slot, before[1])


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("group,d,tokens", [(64, 64, 1), (32, 64, 2), (16, 96, 1), (128, 128, 2), (12, 64, 2), (8, 32, 7)])
def test_dequant_scores_equal_the_reference(bits, group, d, tokens):
    gen = _gen(bits * 100 + d)
    b, h, n, capacity = 2, 3, group * 5, group * 8
    keys = torch.randn(b, h, n, d, generator=gen) * 2 + 0.5
    qk = quantize_keys(keys, bits, group)
    # as the engine holds them: views of the first n tokens of buffers sized for `capacity`
    packed = torch.zeros(b, h, capacity, qk.packed.shape[-1], dtype=torch.uint8)
    scale, zero = torch.zeros(b, h, capacity // group, d), torch.zeros(b, h, capacity // group, d)
    packed[:, :, :n], scale[:, :, :n // group], zero[:, :, :n // group] = qk.packed, qk.scale, qk.zero
    q = torch.randn(b, h * 3, tokens, d, generator=gen)
    out = native.dequant_scores(q, packed[:, :, :n], scale[:, :, :n // group], zero[:, :, :n // group], bits,
                                group, 0.125)
    expected = dequant_scores_reference(q, qk, 0.125)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


def test_kernels_decline_what_they_do_not_serve():
    qk = quantize_keys(torch.randn(1, 2, 64, 32, dtype=torch.bfloat16), 2, 32)
    q = torch.randn(1, 4, 1, 32, dtype=torch.bfloat16)
    assert native.dequant_scores(q, qk.packed, qk.scale, qk.zero, 2, 32, 1.0) is None
    too_many_rows = torch.randn(1, 2 * (native.MAX_ROWS + 1), 1, 32)
    qk = quantize_keys(torch.randn(1, 2, 64, 32), 2, 32)
    assert native.dequant_scores(too_many_rows, qk.packed, qk.scale, qk.zero, 2, 32, 1.0) is None
    odd_dim = quantize_keys(torch.randn(1, 2, 64, 20), 2, 32)  # channels are read eight at a time
    assert native.dequant_scores(torch.randn(1, 4, 1, 20), odd_dim.packed, odd_dim.scale, odd_dim.zero, 2, 32,
                                 1.0) is None


def test_attend_mixed_is_the_same_on_either_path(monkeypatch):
    gen = _gen(7)
    b, h, g, d, n_full, n_low, page = 1, 2, 3, 32, 24, 96, 8
    q = torch.randn(b, h * g, 1, d, generator=gen)
    k, v = torch.randn(b, h, n_full, d, generator=gen), torch.randn(b, h, n_full, d, generator=gen)
    low_k, low_v = torch.randn(b, h, n_low, d, generator=gen), torch.randn(b, h, n_low, d, generator=gen)
    keys, values = quantize_keys(low_k, 2, 16), quantize_values(low_v, 2, 32)
    resident = torch.zeros(b, h, n_low // page + 1, dtype=torch.bool)
    resident[:, 0, 3] = resident[:, 1, 5] = True
    rest = RestRange(16, 80, resident, page)
    native_out = attend_mixed(q, k, v, None, keys, values, rest, 0.2)
    monkeypatch.setenv("KVTIER_KERNELS", "torch")
    torch.testing.assert_close(native_out, attend_mixed(q, k, v, None, keys, values, rest, 0.2), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("method,options", [
    ("freekv", dict(budget=48, page_size=4, sink=4, window=8)),
    ("freekv", dict(budget=48, page_size=4, sink=4, window=8, scorer="lowbit", rest="lowbit", score_group=8)),
    ("specache", dict(group_size=8, residual=8, topk=6)),
])
def test_decoding_is_the_same_with_and_without_the_native_kernels(tiny, monkeypatch, method, options):
    model = tiny("llama")
    ids, mask = batch_prompt(2, length=60, pad=5)
    out = kvtier.generate(model, ids, attention_mask=mask, method=method, max_new_tokens=16, eos_token_id=-1,
                          **options)
    monkeypatch.setenv("KVTIER_KERNELS", "torch")
    assert torch.equal(out, kvtier.generate(model, ids, attention_mask=mask, method=method, max_new_tokens=16,
                                            eos_token_id=-1, **options))


def test_a_failed_build_falls_back_to_the_references_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("KVTIER_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
    native.library.cache_clear()
    try:
        assert native.library() is None
        assert "could not build the CPU kernels" in native.status()
        assert not kvtier.kernels.native_enabled(torch.zeros(1))
    finally:
        monkeypatch.undo()
        native.library.cache_clear()
    assert native.library() is not None



@pytest.mark.parametrize("t,padded", [(1, False), (2, True)])
def test_fused_mixed_attention_equals_the_reference(monkeypatch, t, padded):
    """attend_mixed with the scorer's raw scores: the C kernel (one softmax, values dequantized in registers)
    against the PyTorch path, with resident pages, a masked buffer row and left padding."""
    from kvtier.kernels.dequant_score import dequant_scores_reference

    gen = _gen(11 + t)
    b, h, g, d, length, n_low, page = 2, 2, 3, 32, 40, 128, 8
    q = torch.randn(b, h * g, t, d, generator=gen)
    k, v = torch.randn(b, h, length, d, generator=gen), torch.randn(b, h, length, d, generator=gen)
    keys = quantize_keys(torch.randn(b, h, n_low, d, generator=gen), 2, 16)
    values = quantize_values(torch.randn(b, h, n_low, d, generator=gen), 2, 16)
    mask = torch.rand(b, h, t, length, generator=gen) > 0.2
    resident = torch.zeros(b, h, n_low // page + 1, dtype=torch.bool)
    resident[0, 1, 2] = resident[1, 0, 7] = resident[1, 1, 3] = True
    valid = None
    if padded:
        valid = torch.ones(b, n_low, dtype=torch.bool)
        valid[1, :20] = False
    rest = RestRange(8, 112, resident, page, valid=valid)
    raw = dequant_scores_reference(q, keys, 0.2)
    fused = attend_mixed(q, k, v, mask, keys, values, rest, 0.2, scores=raw)
    monkeypatch.setenv("KVTIER_KERNELS", "torch")
    expected = attend_mixed(q, k, v, mask, keys, values, rest, 0.2, scores=raw)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


def _buffer_case(t, padded, d=32, length=1100, n_low=1312, seed=0, value_group=16):
    """A retrieval buffer as the engine holds it: rows with token positions (some empty, -1), a low-bit rest
    with resident pages, left padding. Long enough that the kernel splits the columns into several chunks."""
    gen = _gen(seed)
    b, h, g, page = 2, 2, 3, 8
    q = torch.randn(b, h * g, t, d, generator=gen)
    k, v = torch.randn(b, h, length, d, generator=gen), torch.randn(b, h, length, d, generator=gen)
    past = n_low + 40
    positions = torch.randint(0, past + t, (b, h, length), generator=gen)  # some after the real token
    positions[torch.rand(b, h, length, generator=gen) < 0.2] = -1
    keys = quantize_keys(torch.randn(b, h, n_low, d, generator=gen), 2, 16)
    values = quantize_values(torch.randn(b, h, n_low, d, generator=gen), 2, value_group)
    resident = torch.rand(b, h, n_low // page + 1, generator=gen) < 0.3
    valid = None
    if padded:
        valid = torch.ones(b, past + t, dtype=torch.bool)
        valid[1, :37] = False
    rest = RestRange(8, n_low - 16, resident, page, valid=valid)
    return q, k, v, positions, past, valid, keys, values, rest


@pytest.mark.parametrize("t,padded,low_bit", [(1, False, False), (2, True, False), (1, True, True),
                                              (2, False, True)])
def test_buffer_attention_equals_the_reference(monkeypatch, t, padded, low_bit):
    """attend_buffer: the C kernel masks rows by their positions itself (no mask tensor), scores the buffer and
    the low-bit rest in one softmax split into chunks; the reference builds the mask and runs attend /
    attend_mixed."""
    from kvtier.attention import attend_buffer

    q, k, v, positions, past, valid, keys, values, rest = _buffer_case(t, padded, seed=20 + t)
    extra = (rest, keys, values) if low_bit else ()
    before = native.launches
    out = attend_buffer(q, k, v, positions, past, 0.2, valid, *extra)
    assert native.launches == before + (2 if low_bit else 1)  # (the low-bit scores) and the attention
    monkeypatch.setenv("KVTIER_KERNELS", "torch")
    expected = attend_buffer(q, k, v, positions, past, 0.2, valid, *extra)
    assert out.shape == expected.shape == (q.shape[0], t, q.shape[1], q.shape[3])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [1, 2])
def test_buffer_attention_off_the_vector_width(monkeypatch, t):
    """Heads of 20 channels and value groups of 10: the kernel's scalar loops (keys, values, codes) where a row is
    not a whole number of eight-channel vectors; the scores come from the reference (the C scorer declines), as
    the engine's scorer gives them."""
    from kvtier.attention import attend_buffer
    from kvtier.kernels.dequant_score import dequant_scores_reference

    q, k, v, positions, past, valid, keys, values, rest = _buffer_case(t, True, d=20, seed=50 + t, value_group=10)
    raw = dequant_scores_reference(q, keys, 0.2)
    before = native.launches
    out = attend_buffer(q, k, v, positions, past, 0.2, valid, rest, keys, values, scores=raw)
    assert native.launches == before + 1  # the attention kernel
    monkeypatch.setenv("KVTIER_KERNELS", "torch")
    expected = attend_buffer(q, k, v, positions, past, 0.2, valid, rest, keys, values, scores=raw)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("page", [1, 8])
def test_buffer_attention_reads_the_resident_pages_from_the_slots(monkeypatch, page):
    """RestRange(resident=None, slots=rows): the pages the slots hold are read from the slots' first positions
    (the engine's buffer, where a deferred copy may leave the page table ahead of the buffer), in the kernel
    and in `RestRange.with_resident` alike."""
    from dataclasses import replace

    from kvtier.attention import attend_buffer

    q, k, v, positions, past, valid, keys, values, rest = _buffer_case(1, True, seed=40 + page)
    gen, slots = _gen(page), 20
    positions[:, :, 8:8 + slots * page] = -1
    for s_ in range(positions.shape[0]):
        for h_ in range(positions.shape[1]):
            pages = torch.randperm(rest.hi // page, generator=gen)[:slots - 3]  # three empty slots
            for j, pg in enumerate(pages.tolist()):
                row = 8 + j * page
                positions[s_, h_, row:row + page] = torch.arange(pg * page, (pg + 1) * page)
    by_slots = replace(rest, resident=None, page_size=page, slots=slice(8, 8 + slots * page))
    out = attend_buffer(q, k, v, positions, past, 0.2, valid, by_slots, keys, values)
    explicit = by_slots.with_resident(positions)
    assert explicit.resident[..., :-1].sum() == positions.shape[0] * positions.shape[1] * (slots - 3)
    monkeypatch.setenv("KVTIER_KERNELS", "torch")
    torch.testing.assert_close(out, attend_buffer(q, k, v, positions, past, 0.2, valid, explicit, keys, values),
                               rtol=1e-5, atol=1e-5)


def test_buffer_attention_is_the_same_on_any_number_of_threads():
    """The columns are cut into the same chunks and merged in the same order whatever the threads: bit for bit."""
    from kvtier.attention import attend_buffer

    q, k, v, positions, past, valid, keys, values, rest = _buffer_case(2, True, n_low=2400, seed=31)  # threaded
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(attend_buffer(q, k, v, positions, past, 0.2, valid, rest, keys, values))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.skipif(not (native.library() is not None and native.threaded), reason="needs the OpenMP build")
def test_two_loops_with_a_late_thread_halve_the_threads_for_a_spell():
    """With a lag limit of 0 every worker starts "late": two such loops begin a spell of contention, the loops
    take half of torch's threads (one of two here) until it ends, and the results do not change."""
    from kvtier.attention import attend_buffer

    q, k, v, positions, past, valid, keys, values, rest = _buffer_case(2, True, n_low=2400, seed=32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        native.contention(native.CONTENTION_LAG_S, native.CONTENTION_HOLD_S)
        quiet = attend_buffer(q, k, v, positions, past, 0.2, valid, rest, keys, values)
        before = native.contention(0.0, 60.0)
        assert before["threads"] == 2 and before["spell_s"] == 0
        attend_buffer(q, k, v, positions, past, 0.2, valid, rest, keys, values)  # scores, attention: two loops
        during = native.contention()
        assert during["spells"] == before["spells"] + 1
        assert during["threads"] == 1 and 0 < during["spell_s"] <= 60
        loops = during["parallel_loops"]
        assert torch.equal(attend_buffer(q, k, v, positions, past, 0.2, valid, rest, keys, values), quiet)
        assert native.contention()["parallel_loops"] == loops  # one thread during the spell
    finally:
        torch.set_num_threads(threads)
        native.contention(native.CONTENTION_LAG_S, native.CONTENTION_HOLD_S)
    after = native.contention()
    assert after["spell_s"] == 0 and after["threads"] == threads


def test_buffer_attention_declines_what_it_does_not_serve():
    q, k, v, positions, past, *_ = _buffer_case(1, False, length=40, n_low=64)
    assert native.attention(q.double(), k.double(), v.double(), 0.2, positions=positions, past=past) is None
    assert native.attention(q, k, v, 0.2, positions=positions.int(), past=past) is None
    assert native.attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, 0.2, positions=positions,
                            past=past) is None
    many = torch.randn(1, 2, native.MAX_TOKENS + 1, 32)
    assert native.attention(many, k[:1], v[:1], 0.2, positions=positions[:1], past=past) is None


@pytest.mark.parametrize("page,tokens,group", [(1, 2, 3), (4, 1, 2), (32, 2, 4), (3, 1, 1)])
def test_page_probs_equal_the_scorer_reference(monkeypatch, page, tokens, group):
    from kvtier.retrieval.scorer import LowBitScorer

    gen = _gen(page)
    b, h, n = 2, 3, page * 40
    raw = torch.randn(b, h, group * tokens, n, generator=gen) * 3
    q = torch.zeros(b, h * group, tokens, 8)  # shapes only: page_probs reads raw
    scorer = LowBitScorer(2, page, page, n)
    out = scorer.page_probs(q, 3, 37, 1.0, raw)
    monkeypatch.setenv("KVTIER_KERNELS", "torch")
    expected = scorer.page_probs(q, 3, 37, 1.0, raw)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tokens,group,d,lo,hi", [(1, 3, 64, 2, 30), (2, 4, 20, 0, 33), (1, 1, 128, 5, 6)])
def test_digest_probs_equal_the_scorer_reference(monkeypatch, tokens, group, d, lo, hi):
    from kvtier.retrieval.scorer import DigestScorer

    gen = _gen(d)
    b, h, pages = 2, 3, 33
    keys = torch.randn(b, h, pages * 4, d, generator=gen)
    q = torch.randn(b, h * group, tokens, d, generator=gen)
    scorer = DigestScorer(keys, pages, 4)
    scorer.add_pages(0, keys)
    before = native.launches
    out = scorer.page_probs(q, lo, hi, d ** -0.5)
    assert native.launches == before + 1
    monkeypatch.setenv("KVTIER_KERNELS", "torch")
    expected = scorer.page_probs(q, lo, hi, d ** -0.5)
    assert out.shape == expected.shape == (b, h, tokens, pages)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)
    assert not out[..., :lo].any() and not out[..., hi:].any()
    # declined (the reference runs): another dtype, an empty range
    assert native.digest_probs(q.double(), scorer.max, scorer.min, 1.0, lo, hi) is None
    assert native.digest_probs(q, scorer.max, scorer.min, 1.0, lo, lo) is None


def test_a_kernel_call_counts_as_one_op(monkeypatch):
    """`StepCounter` counts a C kernel call as one op, as it counts a launch on a GPU, however many pages it moves:
    the plan and the copy each count their wrapper's tensor operations and one more for the kernel."""
    from kvtier.stepcheck import StepCounter

    def ops(call):
        with StepCounter() as counter:
            call()
        return counter.ops

    host, keys, values, pos, pages, slots, rows = _recall_case()
    wanted = torch.tensor([[[4, 1, 0], [2, 3, 1]]])

    def plan():
        table = PageTable(1, 2, 3, 5, "cpu")
        got = native.plan_pages(*table.tensors(), wanted, None, None)
        assert bool((got[0] >= 0).all())

    def copy():
        assert native.recall_pages(host, keys, values, pos, pages, slots, rows, None)

    with_kernel = ops(plan), ops(copy)
    launches = native.launches
    assert ops(copy) == with_kernel[1] and native.launches == launches + 1  # one launch per call
    assert with_kernel[1] == 1  # the copy's wrapper runs no tensor operation of its own
    # the same calls with the launches left uncounted: one op less each
    monkeypatch.setattr(native, "_launch", lambda kernel, *args: kernel(*args))
    assert (ops(plan), ops(copy)) == (with_kernel[0] - 1, with_kernel[1] - 1)


def test_query_drift_equals_the_reference(monkeypatch):
    """The drifted KV heads (`selection.query_drift`): one C call against cosine_similarity's grouped mean, on
    strided queries (a token of [b, H, t, d]) and at the threshold's edges (zero queries: similarity 0)."""
    from kvtier.selection import query_drift, query_similarity

    gen = _gen(50)
    q = torch.randn(2, 12, 2, 64, generator=gen)[:, :, 0]
    previous = q + 0.8 * torch.randn(2, 12, 64, generator=gen)
    previous[1, :4] = 0.0  # KV head 0 of sequence 1: similarity 0
    for tau in (-1.0, 0.0, 0.6, 1.0):
        before = native.launches
        drift = query_drift(q, previous, 3, tau)
        assert native.launches == before + 1
        assert torch.equal(drift, query_similarity(q, previous, 3) < tau)
    assert bool(query_drift(q, previous, 3, 0.0)[1, 0]) is False and bool(query_drift(q, previous, 3, 1e-6)[1, 0])
    assert native.query_drift(q.double(), previous.double(), 3, 0.5) is None


@pytest.mark.parametrize("b,t,first,count", [(1, 1, 0, 1), (2, 1, 0, 1), (1, 5, 1, 3)])
def test_store_rows_equals_slice_assignment(b, t, first, count):
    """The engine's ring writes in one call: keys, values and positions of `count` fed tokens into buffer rows,
    from keys laid out as transformers hands them over ([b, t, h, d] transposed to [b, h, t, d])."""
    gen = _gen(60 + t)
    h, L, d, row0 = 3, 12, 16, 4
    k_new = torch.randn(b, t, h, d, generator=gen).transpose(1, 2)
    v_new = torch.randn(b, t, h, d, generator=gen).transpose(1, 2)
    ours = [torch.randn(b, h, L, d, generator=gen), torch.randn(b, h, L, d, generator=gen),
            torch.full((b, h, L), -1, dtype=torch.long)]
    expected = [x.clone() for x in ours]
    assert native.store_rows(k_new, v_new, *ours, row0, first, count, 100)
    expected[0][:, :, row0:row0 + count] = k_new[:, :, first:first + count]
    expected[1][:, :, row0:row0 + count] = v_new[:, :, first:first + count]
    expected[2][:, :, row0:row0 + count] = torch.arange(100, 100 + count)
    for got, want in zip(ours, expected):
        assert torch.equal(got, want)
    # declined: another dtype, a buffer that is not contiguous
    assert not native.store_rows(k_new.double(), v_new.double(), *ours, row0, first, count, 100)
    assert not native.store_rows(k_new, v_new, ours[0].transpose(2, 3), *ours[1:], row0, first, count, 100)


@pytest.mark.parametrize("shape, lo, hi, k", [((1, 3, 2, 8000), 0, 7936, 64), ((2, 2, 1300), 37, 1291, 5),
                                              ((1, 4, 1, 600), 8, 584, 9), ((2, 4096), 0, 4096, 64), ((70,), 3, 70, 1)])
def test_topk_equals_torch_on_distinct_values(shape, lo, hi, k):
    """The engine's selection: the k largest of each row of a slice, best first, as torch.topk gives them."""
    x = torch.randn(shape, generator=_gen(70 + k))
    window = x[..., lo:hi]
    got = native.topk_indices(window, k, lo)
    assert torch.equal(got, window.topk(k, dim=-1).indices + lo)


def test_topk_takes_ties_lowest_index_first_and_declines_what_it_does_not_serve():
    x = torch.zeros(1, 400)
    x[0, :11] = torch.tensor([0.0, 1.0, 1.0, -float("inf"), 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 0.5])
    assert native.topk_indices(x, 5).tolist() == [[9, 1, 2, 4, 5]]
    assert native.topk_indices(torch.zeros(1, 2000), 3).tolist() == [[0, 1, 2]]
    assert native.topk_indices(x.double(), 2) is None
    assert native.topk_indices(x, 7) is None  # a short row per selected value: torch's own is as fast
    assert native.topk_indices(torch.tensor([1.0, float("nan"), 0.0] * 80), 2) is None  # torch ranks NaN first
    wide = torch.rand(6, 4000)
    wide[3, 1234] = float("nan")  # rows in parallel, a NaN in a block
    assert native.topk_indices(wide, 62) is None
    assert native.topk_indices(torch.randn(4, 6, 1000).transpose(0, 1), 2) is None  # rows not equally spaced
