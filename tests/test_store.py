"""The store (page layout, the host pool, the device ledger) and the retrieval engine's recall pieces it feeds: the
page table's dense plan and the copy of planned pages from the host pool into a device buffer (CPU), each on its
three implementations: the PyTorch reference, the C kernel and the Triton kernel (in triton's interpreter)."""

from __future__ import annotations

import os
import random
from types import SimpleNamespace

import pytest
import torch
from conftest import slot_positions

from kvtier import kernels
from kvtier.kernels import native
from kvtier.link import Link
from kvtier.retrieval import recall as recall_module
from kvtier.retrieval.recall import (PageTable, SlotRows, plan_pages_reference, recall_pages, recall_pages_reference,
                                     staging_needed)
from kvtier.store import DeviceLedger, HostPool, from_pages, to_pages


def kv(b, h, t, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, d, generator=g).to(dtype), torch.randn(b, h, t, d, generator=g).to(dtype)


# -- to_pages / from_pages ----------------------------------------------------------------------------

@pytest.mark.parametrize("page_size", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("batch", [1, 2])
def test_pages_round_trip(page_size, batch):
    h, t, d = 3, 32, 5
    k, v = kv(batch, h, t, d, seed=page_size * 10 + batch)
    pages = to_pages(k, v, page_size)
    assert pages.shape == (t // page_size, batch, h, 2, page_size, d)
    assert pages.is_contiguous()
    k2, v2 = from_pages(pages)
    assert torch.equal(k2, k) and torch.equal(v2, v)
    # every page holds exactly its tokens, keys then values
    for p in range(t // page_size):
        tokens = slice(p * page_size, (p + 1) * page_size)
        assert torch.equal(pages[p, :, :, 0], k[:, :, tokens])
        assert torch.equal(pages[p, :, :, 1], v[:, :, tokens])
    # a truncated read gives the first tokens only
    kt, vt = from_pages(pages, tokens=t - page_size // 2 - 1)
    assert torch.equal(kt, k[:, :, : t - page_size // 2 - 1])
    assert torch.equal(vt, v[:, :, : t - page_size // 2 - 1])


def test_to_pages_of_non_contiguous_input():
    k, v = kv(2, 8, 3, 4, seed=1)
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # [2, 3, 8, 4], not contiguous
    assert not k.is_contiguous()
    k2, v2 = from_pages(to_pages(k, v, 4))
    assert torch.equal(k2, k) and torch.equal(v2, v)


@pytest.mark.parametrize("t,page_size", [(7, 2), (5, 4), (3, 8)])
def test_to_pages_rejects_partial_pages(t, page_size):
    k, v = kv(1, 2, t, 4)
    with pytest.raises(ValueError):
        to_pages(k, v, page_size)


# -- DeviceLedger ----------------------------------------------------------------------------------------

def test_ledger_hold_release_peak():
    ledger = DeviceLedger()
    assert (ledger.current, ledger.peak) == (0, 0)
    a = torch.empty(10, dtype=torch.float32)  # 40 bytes
    b = torch.empty(3, 5, dtype=torch.float16)  # 30 bytes
    ledger.hold("a", a)
    assert (ledger.current, ledger.peak) == (40, 40)
    ledger.hold("b", a, b)  # several tensors under one name
    assert ledger.held == {"a": 40, "b": 70}
    assert (ledger.current, ledger.peak) == (110, 110)
    ledger.hold("b", b)  # re-holding a name replaces its bytes
    assert (ledger.current, ledger.peak) == (70, 110)
    ledger.release("a")
    assert ledger.held == {"b": 30}
    assert (ledger.current, ledger.peak) == (30, 110)
    ledger.release("a")  # releasing twice (or an unknown name) is harmless
    ledger.release("nothing")
    assert (ledger.current, ledger.peak) == (30, 110)
    ledger.hold("c", torch.empty(100, dtype=torch.int64))  # 800 bytes
    assert (ledger.current, ledger.peak) == (830, 830)
    ledger.release("b")
    ledger.release("c")
    assert (ledger.current, ledger.peak, ledger.held) == (0, 830, {})


# -- HostPool -------------------------------------------------------------------------------------------

def make_pool(layers=2, batch=2, heads=3, d=4, page_size=4, dtype=torch.float32):
    link = Link("cpu")
    return HostPool(layers, batch, heads, d, page_size, dtype, link), link


@pytest.mark.parametrize("page_size", [1, 4, 8])
@pytest.mark.parametrize("batch", [1, 2])
def test_host_pool_head_page_and_layer_block(page_size, batch):
    heads, d, t = 3, 4, 32
    pool, _ = make_pool(batch=batch, heads=heads, d=d, page_size=page_size)
    k, v = kv(batch, heads, t, d, seed=page_size + batch)
    pool.write(1, to_pages(k, v, page_size))
    assert pool.tokens(1) == t and pool.tokens(0) == 0
    for page in range(t // page_size):
        for s in range(batch):
            for h in range(heads):
                block = pool.head_page(1, page, s, h)
                assert block.shape == (2, page_size, d)
                assert block.is_contiguous()
                tokens = slice(page * page_size, (page + 1) * page_size)
                assert torch.equal(block[0], k[s, h, tokens])
                assert torch.equal(block[1], v[s, h, tokens])
    block = pool.layer_block(1)
    assert block.shape == (t // page_size, batch, heads, 2, page_size, d)
    assert block.is_contiguous()
    k2, v2 = from_pages(block)
    assert torch.equal(k2, k) and torch.equal(v2, v)


def test_host_pool_write_grow_preserves_pages_and_counts_bytes():
    batch, heads, d, page_size = 2, 3, 4, 4
    pool, link = make_pool(batch=batch, heads=heads, d=d, page_size=page_size)
    page_bytes = batch * heads * 2 * page_size * d * 4
    assert pool.page_bytes == page_bytes
    written = {0: [], 1: []}
    expected_d2h = 0
    copies = 0
    ptrs = set()
    torch.manual_seed(0)
    # many small appends to layer 0 (forcing growth several times) and a few big ones to layer 1
    for step, (layer, n) in enumerate([(0, 3), (1, 10), (0, 14), (0, 1), (1, 30), (0, 20), (0, 2), (1, 1),
                                       (0, 40)]):
        block = torch.randn(n, batch, heads, 2, page_size, d)
        pool.write(layer, block)
        written[layer].append(block)
        expected_d2h += block.numel() * 4
        copies += 1
        ptrs.add(pool.pages[0].data_ptr())
        for lyr in (0, 1):
            if written[lyr]:
                assert torch.equal(pool.layer_block(lyr), torch.cat(written[lyr]))
            assert pool.num_pages[lyr] == sum(b.shape[0] for b in written[lyr])
            assert pool.tokens(lyr) == pool.num_pages[lyr] * page_size
        assert link.d2h_bytes == expected_d2h
        assert link.d2h_copies == copies
        assert link.h2d_bytes == 0 and link.h2d_copies == 0
        assert pool.used_bytes() == (pool.num_pages[0] + pool.num_pages[1]) * page_bytes
        assert pool.held_bytes() >= pool.used_bytes()
    assert len(ptrs) > 1  # layer 0 really was reallocated along the way
    assert pool.used_bytes() == (80 + 41) * page_bytes


def test_host_pool_reserve_avoids_reallocation_and_preserves():
    pool, link = make_pool(layers=1, batch=1, heads=2, d=3, page_size=2)
    pool.reserve(0, 50)
    assert pool.pages[0].shape[0] == 50
    ptr = pool.pages[0].data_ptr()
    torch.manual_seed(1)
    blocks = [torch.randn(n, 1, 2, 2, 2, 3) for n in (7, 13, 30)]
    for block in blocks:
        pool.write(0, block)
    assert pool.pages[0].data_ptr() == ptr  # 50 pages fit: no reallocation
    assert pool.held_bytes() == 50 * pool.page_bytes
    pool.reserve(0, 10)  # smaller than held: no-op
    assert pool.pages[0].data_ptr() == ptr
    pool.reserve(0, 200)  # larger after writes: earlier pages survive
    assert pool.pages[0].shape[0] == 200
    assert pool.pages[0].data_ptr() != ptr
    assert torch.equal(pool.layer_block(0), torch.cat(blocks))
    assert pool.num_pages[0] == 50
    # reserve itself moves nothing across the link
    assert link.d2h_copies == 3
    assert link.d2h_bytes == sum(b.numel() for b in blocks) * 4
    pool.write(0, blocks[0])
    assert torch.equal(pool.layer_block(0), torch.cat(blocks + blocks[:1]))


@pytest.mark.parametrize("dtype,elem", [(torch.float16, 2), (torch.bfloat16, 2), (torch.float32, 4)])
def test_host_pool_bytes_by_dtype(dtype, elem):
    pool, link = make_pool(layers=3, batch=2, heads=2, d=8, page_size=4, dtype=dtype)
    assert pool.dtype_bytes == elem
    assert pool.page_bytes == 2 * 2 * 2 * 4 * 8 * elem
    assert pool.used_bytes() == 0 and pool.held_bytes() == 0
    k, v = kv(2, 2, 12, 8, dtype=dtype)
    pool.write(0, to_pages(k, v, 4))
    pool.write(2, to_pages(k[:, :, :4], v[:, :, :4], 4))
    assert pool.used_bytes() == 4 * pool.page_bytes
    assert link.d2h_bytes == 4 * pool.page_bytes
    assert pool.pages[0].dtype == dtype


def test_host_pool_rejects_mismatched_pages():
    pool, link = make_pool(batch=2, heads=3, d=4, page_size=4)
    with pytest.raises(ValueError):
        pool.write(0, torch.zeros(2, 1, 3, 2, 4, 4))  # wrong batch
    with pytest.raises(ValueError):
        pool.write(0, torch.zeros(2, 2, 3, 2, 2, 4))  # wrong page size
    with pytest.raises(ValueError):
        pool.write(0, torch.zeros(2, 2, 2, 2, 4, 4))  # wrong head count
    assert pool.num_pages == [0, 0]
    assert link.d2h_bytes == 0


def test_cpu_host_pool_is_not_pinned():
    pool, _ = make_pool()
    assert pool.pin is False


# -- the three implementations of the recall ------------------------------------------------------------------
# Each test of the plan and of the copy through the library's entry points runs once per implementation (`path`):
# KVTIER_KERNELS=torch (the PyTorch references), native (the C kernels) or triton (the Triton kernels, in triton's
# interpreter on CPU). The fixture fails the test if any other implementation ran: a kernel that declined a call
# it should take would otherwise pass, silently, through the reference.

CPU = torch.device("cpu")
PATHS = ("torch", "native", "triton")


def triton_interprets() -> bool:
    """Whether the Triton kernels run on CPU tensors here: triton imports and its interpreter was chosen before
    triton was first imported (conftest.py does that without CUDA)."""
    return kernels.available() and os.environ.get("TRITON_INTERPRET") == "1"


def skip_unless_available(name: str) -> None:
    if name == "native" and native.library() is None:
        pytest.skip(f"no C kernels: {native.status()}")
    if name == "triton" and not triton_interprets():
        pytest.skip("the Triton kernels need triton and its interpreter (TRITON_INTERPRET=1) on CPU")


def implementations(kind: str) -> dict:
    """{path: function} of the plan ("plan") or the copy ("copy") that can run here, called directly."""
    out = {"torch": plan_pages_reference if kind == "plan" else recall_pages_reference}
    if native.library() is not None:
        out["native"] = native.plan_pages if kind == "plan" else native.recall_pages
    if triton_interprets():
        from kvtier.kernels import recall as kernel_recall

        out["triton"] = kernel_recall.plan_pages if kind == "plan" else kernel_recall.recall_pages
    if len(out) < 2:
        pytest.skip("only the PyTorch references run here: nothing to compare them with")
    return out


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """KVTIER_KERNELS set to one implementation; `.ran` lists the implementations that ran, and the test fails at
    teardown if one of the others did."""
    name = request.param
    skip_unless_available(name)
    monkeypatch.setenv("KVTIER_KERNELS", name)
    ran = []

    def spy(module, attr, label):
        original = getattr(module, attr)

        def recorded(*args, **kwargs):
            ran.append(label)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, attr, recorded)

    spy(recall_module, "plan_pages_reference", "torch")
    spy(recall_module, "recall_pages_reference", "torch")
    spy(native, "plan_pages", "native")
    spy(native, "recall_pages", "native")
    if kernels.available():
        from kvtier.kernels import recall as kernel_recall

        spy(kernel_recall, "plan_pages", "triton")
        spy(kernel_recall, "recall_pages", "triton")
    state = SimpleNamespace(name=name, ran=ran)
    yield state
    assert set(ran) <= {name}, f"KVTIER_KERNELS={name} ran {sorted(set(ran))}"


# -- PageTable: the dense plan ----------------------------------------------------------------------------
# plan(wanted [b, h, k], page_scores [b, h, >= pages] | None, recalled) -> (pages, slots), both [b, h, k]: copy
# pages[..., i] into slots[..., i], nothing where pages[..., i] is -1 (slots is -1 there too). Scores are what the
# engine passes, page probabilities.

def rows(table):
    return table.slot_page.tolist()


def as_wanted(rows_):
    return torch.tensor(rows_, dtype=torch.long)


def copies(plan):
    """{(seq, head, slot): page} of the entries that copy."""
    pages, slots = plan
    out = {}
    for s, hh, i in (pages >= 0).nonzero().tolist():
        key = (s, hh, int(slots[s, hh, i]))
        assert key not in out, "a slot was written twice in one plan"
        out[key] = int(pages[s, hh, i])
    return out


def check_inverse(table):
    """page_slot is the exact inverse of slot_page (the slot of each resident page, -1 for the others), and its
    last column, which absorbs the -1 entries of the kernels' scatters, stays -1."""
    b, h, n_slots = table.slot_page.shape
    assert table.page_slot.shape == (b, h, table.pages + 1)
    assert table.slot_page.is_contiguous() and table.page_slot.is_contiguous()  # the kernels assume it
    for s in range(b):
        for hh in range(h):
            held = table.slot_page[s, hh].tolist()
            where = table.page_slot[s, hh].tolist()
            assert where[-1] == -1, "the last column of page_slot was written"
            assert all(-1 <= p < table.pages for p in held)
            expect = [-1] * table.pages
            for j, p in enumerate(held):
                if p >= 0:
                    expect[p] = j
            assert where[:-1] == expect, f"page_slot {where} is not the inverse of slot_page {held}"


def test_page_table_starts_empty():
    table = PageTable(2, 3, 5, 8, CPU)
    assert (table.slots, table.pages) == (5, 8)
    assert table.slot_page.shape == (2, 3, 5)
    assert table.page_slot.shape == (2, 3, 9)
    assert table.slot_page.dtype == torch.long and table.page_slot.dtype == torch.int32
    assert bool((table.slot_page == -1).all()) and bool((table.page_slot == -1).all())
    assert table.tensors() == (table.slot_page, table.page_slot)


def test_plan_takes_the_chosen_path(path):
    """The dispatch itself: the plan and the copy each run the implementation KVTIER_KERNELS names, exactly once."""
    pool, _, k, v = filled_pool(1, 2, 4, 2, 6)
    rec = Recall(pool, 1, 3)
    rec.recall(as_wanted([[[5, 0], [1, 3]]]), torch.rand(1, 2, 6))
    assert path.ran == [path.name] * 2
    check_recalled(rec, k, v)


def test_page_table_plan_is_dense(path):
    table = PageTable(2, 3, 4, 9, CPU)
    wanted = torch.stack([torch.randperm(9)[:3] for _ in range(6)]).view(2, 3, 3)
    pages, slots = table.plan(wanted, torch.rand(2, 3, 9))
    assert pages.shape == slots.shape == (2, 3, 3)
    assert pages.dtype == slots.dtype == torch.long
    check_inverse(table)


def test_page_table_fills_empty_slots_first_in_order(path):
    table = PageTable(1, 1, 4, 10, CPU)
    pages, slots = table.plan(as_wanted([[[7, 3]]]))
    assert pages.tolist() == [[[7, 3]]] and slots.tolist() == [[[0, 1]]]
    assert rows(table) == [[[7, 3, -1, -1]]]
    check_inverse(table)
    # the next miss takes an empty slot even when a resident page scores lowest
    scores = torch.full((1, 1, 10), 0.5)
    scores[..., 7] = 0.0
    pages, slots = table.plan(as_wanted([[[5]]]), scores)
    assert pages.tolist() == [[[5]]] and slots.tolist() == [[[2]]]
    assert rows(table) == [[[7, 3, 5, -1]]]
    # a resident page among the wanted ones: only the miss is copied, into the last empty slot
    pages, slots = table.plan(as_wanted([[[3, 6]]]), scores)
    assert pages.tolist() == [[[6, -1]]] and slots.tolist() == [[[3, -1]]]
    assert rows(table) == [[[7, 3, 5, 6]]]
    check_inverse(table)


def test_page_table_misses_come_first_in_wanted_order(path):
    table = PageTable(1, 1, 6, 10, CPU)
    table.plan(as_wanted([[[4, 2]]]))
    pages, slots = table.plan(as_wanted([[[9, 2, 0, 4, 8]]]))
    assert pages.tolist() == [[[9, 0, 8, -1, -1]]]
    assert slots.tolist() == [[[2, 3, 4, -1, -1]]]
    assert rows(table) == [[[4, 2, 9, 0, 8, -1]]]
    check_inverse(table)


def test_page_table_resident_pages_are_not_copied_again(path):
    table = PageTable(2, 2, 3, 10, CPU)
    wanted = as_wanted([[[0, 1, 2], [4, 5, 6]], [[9, 8, 7], [1, 3, 5]]])
    plan = table.plan(wanted)
    assert bool((plan[0] >= 0).all()) and len(copies(plan)) == 12
    before = table.slot_page.clone(), table.page_slot.clone()
    for _ in range(2):
        pages, slots = table.plan(wanted, torch.rand(2, 2, 10))
        assert bool((pages == -1).all()) and bool((slots == -1).all())
        assert torch.equal(table.slot_page, before[0]) and torch.equal(table.page_slot, before[1])
    # a subset, in another order, is all resident too
    pages, _ = table.plan(as_wanted([[[2, 0], [6, 4]], [[7, 9], [5, 1]]]), torch.rand(2, 2, 10))
    assert pages.shape == (2, 2, 2) and bool((pages == -1).all())
    assert torch.equal(table.slot_page, before[0]) and torch.equal(table.page_slot, before[1])
    check_inverse(table)


def test_page_table_evicts_lowest_scoring_unwanted_pages(path):
    table = PageTable(1, 1, 4, 20, CPU)
    table.plan(as_wanted([[[10, 11, 12, 13]]]))
    scores = torch.zeros(1, 1, 20)
    scores[0, 0, 10] = 0.5
    scores[0, 0, 11] = 0.01  # lowest, but wanted: must stay
    scores[0, 0, 12] = 0.05
    scores[0, 0, 13] = 0.2
    pages, slots = table.plan(as_wanted([[[11, 1, 2]]]), scores)
    # two misses evict the two lowest-scoring pages that are not wanted: 12 (slot 2) then 13 (slot 3)
    assert pages.tolist() == [[[1, 2, -1]]]
    assert slots.tolist() == [[[2, 3, -1]]]
    assert rows(table) == [[[10, 11, 1, 2]]]
    check_inverse(table)
    assert table.page_slot[0, 0, [12, 13]].tolist() == [-1, -1]  # the evicted pages left the map


def test_page_table_without_scores_evicts_unwanted_pages(path):
    table = PageTable(1, 2, 3, 10, CPU)
    table.plan(as_wanted([[[0, 1, 2], [3, 4, 5]]]))
    pages, slots = table.plan(as_wanted([[[1, 9], [5, 4]]]))
    assert pages.tolist() == [[[9, -1], [-1, -1]]]  # head 1 already holds 5 and 4
    assert int(slots[0, 0, 0]) in (0, 2)  # page 0 or page 2: never the wanted page 1
    assert 1 in rows(table)[0][0] and 9 in rows(table)[0][0]
    assert rows(table)[0][1] == [3, 4, 5]
    check_inverse(table)


def test_page_table_rows_are_independent(path):
    table = PageTable(2, 1, 2, 3, CPU)
    table.plan(as_wanted([[[0, 1]], [[0, 1]]]))
    scores = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]])
    pages, slots = table.plan(as_wanted([[[2]], [[2]]]), scores)
    assert pages.tolist() == [[[2]], [[2]]]
    # sequence 0 evicts page 1 (lower score), sequence 1 evicts page 0
    assert slots.tolist() == [[[1]], [[0]]]
    assert rows(table) == [[[0, 2]], [[2, 1]]]
    assert table.page_slot.tolist() == [[[0, -1, 1, -1]], [[-1, 1, 0, -1]]]


def test_page_table_too_many_pages_raises(path):
    table = PageTable(1, 1, 3, 4, CPU)
    with pytest.raises(ValueError, match="slots"):
        table.plan(as_wanted([[[0, 1, 2, 3]]]))
    with pytest.raises(ValueError, match="match"):
        table.plan(as_wanted([[[0], [1]]]))  # two heads for a table of one
    assert bool((table.slot_page == -1).all()) and bool((table.page_slot == -1).all())


def test_page_table_already_resident_request_copies_nothing(path):
    table = PageTable(2, 2, 3, 9, CPU)
    table.plan(as_wanted([[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [0, 2, 4]]]))
    before = table.slot_page.clone(), table.page_slot.clone()
    recalled = torch.zeros((), dtype=torch.long)
    pages, slots = table.plan(as_wanted([[[1], [5]], [[6], [2]]]), torch.rand(2, 2, 9), recalled)
    assert pages.tolist() == slots.tolist() == [[[-1], [-1]], [[-1], [-1]]]
    assert int(recalled) == 0
    assert torch.equal(table.slot_page, before[0]) and torch.equal(table.page_slot, before[1])
    # and an empty request (k = 0) is an empty plan
    pages, slots = table.plan(torch.empty(2, 2, 0, dtype=torch.long), None, recalled)
    assert pages.shape == slots.shape == (2, 2, 0)
    assert int(recalled) == 0
    assert torch.equal(table.slot_page, before[0]) and torch.equal(table.page_slot, before[1])


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("on", ["unwanted", "wanted", "all"])
def test_page_table_never_evicts_a_wanted_page_even_with_infinite_scores(path, bad, on):
    table = PageTable(1, 1, 3, 10, CPU)
    table.plan(as_wanted([[[0, 1, 2]]]))
    scores = torch.zeros(1, 1, 10)
    if on in ("unwanted", "all"):
        scores[..., 1] = bad
        scores[..., 2] = bad
    if on in ("wanted", "all"):
        scores[..., 0] = bad
        scores[..., 5] = bad
    pages, slots = table.plan(as_wanted([[[5, 0]]]), scores)
    assert pages.tolist() == [[[5, -1]]] and int(slots[0, 0, 1]) == -1
    resident = rows(table)[0][0]
    assert {0, 5} <= set(resident) and len(set(resident)) == 3
    # pages 1 and 2 score alike once cleaned as probabilities (+inf is 1, NaN and -inf 0): the lower slot goes
    assert resident == [0, 5, 2]
    check_inverse(table)


def check_plan(prev, new, wanted, scores, plan):
    """The invariants of one dense plan, per (sequence, head) row."""
    pages, slots = plan
    b, h, n_slots = prev.shape
    assert pages.shape == slots.shape == wanted.shape
    if scores is not None:  # compared as the plan reads them: probabilities, NaN and -inf 0, +inf 1
        scores = scores.float().nan_to_num(0.0, 1.0, 0.0)
    assert torch.equal(slots < 0, pages < 0), "slots must be -1 exactly where pages is"
    copied = copies(plan)
    for s in range(b):
        for hh in range(h):
            before = prev[s, hh].tolist()
            after = new[s, hh].tolist()
            want = wanted[s, hh].tolist()
            # the copies applied to the old row give the new row (entries with page -1 change nothing)
            expect = list(before)
            for j in range(n_slots):
                if (s, hh, j) in copied:
                    expect[j] = copied[(s, hh, j)]
            assert after == expect
            resident_before = {p for p in before if p >= 0}
            resident_after = [p for p in after if p >= 0]
            assert len(resident_after) == len(set(resident_after)), "duplicate page in a row"
            assert set(want) <= set(resident_after), "a wanted page is not resident"
            # exactly the wanted pages not resident before are copied: first, in wanted order, then -1s
            missing = [p for p in want if p not in resident_before]
            row = pages[s, hh].tolist()
            assert row == missing + [-1] * (len(want) - len(missing))
            # evictions: only empty slots or unwanted pages; empty slots first, lowest index first
            used = [int(slots[s, hh, i]) for i in range(len(missing))]
            filled = [j for j in used if before[j] < 0]
            assert filled == [j for j in range(n_slots) if before[j] < 0][:len(filled)]
            evicted = [before[j] for j in used if before[j] >= 0]
            assert not set(evicted) & set(want)
            if evicted:
                assert sum(p < 0 for p in after) == 0, "a resident page was evicted while an empty slot remained"
            if evicted and scores is not None:
                survivors = [p for p in resident_after if p in resident_before and p not in want]
                if survivors:
                    worst_kept = min(float(scores[s, hh, p]) for p in survivors)
                    best_evicted = max(float(scores[s, hh, p]) for p in evicted)
                    assert best_evicted <= worst_kept, "evicted a page scoring higher than one kept"


def random_wanted(rng, table, k, n_pages):
    """[b, h, k] distinct pages per row: mostly random, or (a third of the time) mostly what is resident already,
    in a shuffled order, to exercise hits."""
    b, h, _ = table.slot_page.shape
    if rng.random() < 0.35:
        wanted = []
        for s in range(b):
            for hh in range(h):
                res = [p for p in table.slot_page[s, hh].tolist() if p >= 0]
                rest = [p for p in range(n_pages) if p not in res]
                pick = rng.sample(res, min(k, len(res)))
                pick += rng.sample(rest, k - len(pick))
                rng.shuffle(pick)
                wanted.append(pick)
        return torch.tensor(wanted, dtype=torch.long).view(b, h, k)
    return torch.tensor([rng.sample(range(n_pages), k) for _ in range(b * h)], dtype=torch.long).view(b, h, k)


@pytest.mark.parametrize("seed", range(6))
def test_page_table_randomized_invariants(path, seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    b, h = rng.choice([1, 2]), rng.choice([1, 3])
    n_slots = rng.choice([1, 3, 6])
    n_pages = rng.choice([n_slots, n_slots + 2, 20])
    table = PageTable(b, h, n_slots, n_pages, CPU)
    recalled = torch.zeros((), dtype=torch.long)
    total_copies = 0
    for _ in range(20 if path.name == "triton" else 60):  # the interpreter is slow; test_plan_paths_agree covers it
        k = rng.randint(0, n_slots)
        wanted = random_wanted(rng, table, k, n_pages)
        scores = torch.softmax(4 * torch.randn(b, h, n_pages), -1) if rng.random() < 0.7 else None
        prev = table.slot_page.clone()
        plan = table.plan(wanted, scores, recalled)
        check_plan(prev, table.slot_page, wanted, scores, plan)
        check_inverse(table)
        total_copies += int((plan[0] >= 0).sum())
        assert int(recalled) == total_copies, "the counter counts the pages to copy"
        # planning the same pages again copies nothing and leaves the table as it is
        after = table.slot_page.clone(), table.page_slot.clone()
        again, again_slots = table.plan(wanted, scores, recalled)
        assert bool((again == -1).all()) and bool((again_slots == -1).all())
        assert torch.equal(table.slot_page, after[0]) and torch.equal(table.page_slot, after[1])
        assert int(recalled) == total_copies
    assert total_copies > 0


def test_grow_keeps_the_map(path):
    torch.manual_seed(5)
    table = PageTable(2, 2, 3, 6, CPU)
    table.plan(torch.stack([torch.randperm(6)[:3] for _ in range(4)]).view(2, 2, 3), torch.rand(2, 2, 6))
    before = table.slot_page.clone(), table.page_slot.clone()
    table.grow(4)  # smaller: nothing changes
    assert table.pages == 6 and torch.equal(table.page_slot, before[1])
    table.grow(11)
    assert table.pages == 11 and table.page_slot.shape == (2, 2, 12)
    assert torch.equal(table.slot_page, before[0])
    assert torch.equal(table.page_slot[..., :6], before[1][..., :6])
    assert bool((table.page_slot[..., 6:] == -1).all())
    check_inverse(table)
    # pages past the old capacity plan like any other: they evict, the map follows
    recalled = torch.zeros((), dtype=torch.long)
    prev = table.slot_page.clone()
    wanted = as_wanted([[[10, 6], [7, 8]], [[9, 10], [6, 7]]])
    scores = torch.rand(2, 2, 11)
    plan = table.plan(wanted, scores, recalled)
    check_plan(prev, table.slot_page, wanted, scores, plan)
    check_inverse(table)
    assert int(recalled) == 8


# -- the plan's implementations against each other ------------------------------------------------------------

def random_scores(rng, b, h, n_pages, kind):
    """Page scores of one kind: None, probabilities, ties with NaN, infinities and -0.0 (all mapped as the
    reference's nan_to_num does), or a non-contiguous view of probabilities (probs[:, :, 0] of [b, h, t, pages+]
    as the engine passes them)."""
    if kind == "none":
        return None
    if kind == "probs":
        return torch.softmax(4 * torch.randn(b, h, n_pages), -1)
    if kind == "ties":
        choices = torch.tensor([0.0, -0.0, 0.25, 0.25, 1.0, float("nan"), float("inf"), float("-inf")])
        return choices[torch.randint(0, len(choices), (b, h, n_pages))]
    probs = torch.softmax(torch.randn(b, h, 3, n_pages + 2), -1)
    return probs[:, :, rng.randrange(3)]  # rows t apart, two pages beyond the table's


@pytest.mark.parametrize("b, h, n_slots, n_pages, steps", [
    (1, 1, 3, 7, 25),
    (2, 3, 4, 9, 25),
    (2, 2, 20, 26, 20),  # more than 16 misses: the C kernel's sort rather than its selection
    (1, 4, 1, 2, 15),
])
def test_plan_paths_agree(b, h, n_slots, n_pages, steps):
    """Random sequences of plans, each implementation on its own copy of one table: the same plan, the same
    table (both maps) and the same count, step after step."""
    impls = implementations("plan")
    rng = random.Random(b * 100 + n_slots)
    torch.manual_seed(n_pages)
    tables = {name: PageTable(b, h, n_slots, n_pages, CPU) for name in impls}
    counters = {name: torch.zeros((), dtype=torch.long) for name in impls}
    ref = tables["torch"]
    kinds = ["none", "probs", "ties", "view"]
    for step in range(steps):
        k = rng.choice([0, n_slots, rng.randint(1, n_slots), rng.randint(1, n_slots)])
        wanted = random_wanted(rng, ref, k, n_pages)
        scores = random_scores(rng, b, h, n_pages, kinds[step % 4])
        prev = ref.slot_page.clone()
        out = {}
        for name, plan in impls.items():
            table = tables[name]
            got = plan(table.slot_page, table.page_slot, wanted, scores, counters[name])
            assert got is not None, f"{name} declined a float32 plan"
            out[name] = got
        check_plan(prev, ref.slot_page, wanted, scores, out["torch"])
        for name in impls:
            check_inverse(tables[name])
            assert torch.equal(out[name][0], out["torch"][0]), f"{name}: pages differ at step {step}"
            assert torch.equal(out[name][1], out["torch"][1]), f"{name}: slots differ at step {step}"
            assert torch.equal(tables[name].slot_page, ref.slot_page), f"{name}: slot_page differs at step {step}"
            assert torch.equal(tables[name].page_slot, ref.page_slot), f"{name}: page_slot differs at step {step}"
            assert int(counters[name]) == int(counters["torch"]), f"{name}: recalled differs at step {step}"
    assert int(counters["torch"]) > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_plan_paths_agree_on_scores_of_other_dtypes(dtype):
    """The Triton kernel and the reference read scores of any float dtype; the C kernel takes float32 only and
    declines others (None) without touching the table, so that the reference can run on it."""
    impls = implementations("plan")
    rng = random.Random(7)
    b, h, n_slots, n_pages = 2, 2, 3, 8
    tables = {name: PageTable(b, h, n_slots, n_pages, CPU) for name in impls}
    for step in range(6):
        wanted = random_wanted(rng, tables["torch"], rng.randint(1, n_slots), n_pages)
        scores = random_scores(rng, b, h, n_pages, "ties" if step % 2 else "probs").to(dtype)
        expect = plan_pages_reference(*tables["torch"].tensors(), wanted, scores)
        if "native" in impls:
            table = tables["native"]
            before = table.slot_page.clone(), table.page_slot.clone()
            assert native.plan_pages(*table.tensors(), wanted, scores, None) is None
            assert torch.equal(table.slot_page, before[0]) and torch.equal(table.page_slot, before[1])
            plan_pages_reference(*table.tensors(), wanted, scores)
        if "triton" in impls:
            got = impls["triton"](*tables["triton"].tensors(), wanted, scores, None)
            assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])
        for table in tables.values():
            assert torch.equal(table.slot_page, tables["torch"].slot_page)
            assert torch.equal(table.page_slot, tables["torch"].page_slot)


# -- PageTable: positions ---------------------------------------------------------------------------------------

def test_positions_values():
    table = PageTable(1, 2, 3, 6, CPU)
    assert slot_positions(table, 3).tolist() == [[[-1] * 9, [-1] * 9]]
    table.slot_page[0, 0] = torch.tensor([2, -1, 0])
    table.slot_page[0, 1] = torch.tensor([-1, 5, -1])
    pos = slot_positions(table, 3)
    assert pos.shape == (1, 2, 9) and pos.dtype == torch.long
    assert pos.tolist() == [[[6, 7, 8, -1, -1, -1, 0, 1, 2], [-1, -1, -1, 15, 16, 17, -1, -1, -1]]]
    assert slot_positions(table, 1).tolist() == [[[2, -1, 0], [-1, 5, -1]]]


def test_page_slot_marks_the_resident_pages_after_plans(path):
    """`page_slot >= 0` is what `resident` was: every wanted page, and as many pages as there are full slots."""
    torch.manual_seed(4)
    table = PageTable(2, 3, 4, 11, CPU)
    for _ in range(6):
        wanted = torch.stack([torch.randperm(11)[:3] for _ in range(6)]).view(2, 3, 3)
        table.plan(wanted, torch.rand(2, 3, 11))
        resident = table.page_slot >= 0
        assert bool(resident.gather(-1, wanted).all())
        assert torch.equal(resident.sum(-1), (table.slot_page >= 0).sum(-1))
        check_inverse(table)


# -- recall_pages: the copy of a plan --------------------------------------------------------------------------
# The device buffer as rows of one page: per (sequence, KV head) pair `rows_per_head` rows, slot j at row
# first_slot + j, the last row a trash row (the reference sends skipped entries there); the host pool's row of
# page p of pair r is p * pairs + r. Positions [rows, P] get page * P + j for the rows copied.

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_recall(b, h, k, n_slots, n_pages, page_size, d, dtype, seed, first_slot=1, after=1):
    """(host [n_pages * b * h, 2, P*d], keys, values [rows, P*d], positions [rows, P] (all random), pages, slots
    [b, h, k] (distinct pages and slots per pair, about a third of the entries -1 in both, anywhere), rows)."""
    g = torch.Generator().manual_seed(seed)
    pairs, elems = b * h, page_size * d
    rows_ = SlotRows(heads=pairs, rows_per_head=first_slot + n_slots + after + 1, first_slot=first_slot)
    host = torch.randn(n_pages * pairs, 2, elems, generator=g).to(dtype)
    n_rows = pairs * rows_.rows_per_head
    keys, values = (torch.randn(n_rows, elems, generator=g).to(dtype) for _ in range(2))
    positions = torch.randint(-1, 1000, (n_rows, page_size), generator=g)
    pages = torch.stack([torch.randperm(n_pages, generator=g)[:k] for _ in range(pairs)]).view(b, h, k)
    slots = torch.stack([torch.randperm(n_slots, generator=g)[:k] for _ in range(pairs)]).view(b, h, k)
    skip = torch.rand(b, h, k, generator=g) < 0.35
    pages[skip], slots[skip] = -1, -1
    return host, keys, values, positions, pages, slots, rows_


def check_copy(host, before, after, pages, slots, rows_, heads, trash_untouched):
    """Copied rows hold their host page's keys and values and its tokens' positions; every other row is as it was
    (the trash rows too, for the kernels: `trash_untouched`)."""
    keys0, values0, pos0 = before
    keys, values, pos = after
    pairs, page_size = rows_.heads, pos.shape[-1]
    written = set()
    for r in range(pairs):
        if heads is not None and not bool(heads.view(-1)[r]):
            continue
        for p, j in zip(pages.view(pairs, -1)[r].tolist(), slots.view(pairs, -1)[r].tolist()):
            if p < 0:
                continue
            row = r * rows_.rows_per_head + rows_.first_slot + j
            assert torch.equal(keys[row], host[p * pairs + r, 0]) and torch.equal(values[row], host[p * pairs + r, 1])
            assert pos[row].tolist() == list(range(p * page_size, (p + 1) * page_size))
            written.add(row)
    for row in range(keys.shape[0]):
        trash = row % rows_.rows_per_head == rows_.rows_per_head - 1
        if row in written or (trash and not trash_untouched):
            continue
        assert torch.equal(keys[row], keys0[row]) and torch.equal(values[row], values0[row]), f"row {row} changed"
        assert torch.equal(pos[row], pos0[row]), f"positions of row {row} changed"
    return written


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("with_heads", [False, True])
def test_recall_paths_agree(dtype, page_size, with_heads):
    """The reference, the C kernel and the Triton kernel copy the same rows and write the same positions; the
    kernels leave the trash rows alone, the reference sends skipped entries there (positions -1)."""
    impls = implementations("copy")
    b, h, k, n_slots, n_pages, d = 2, 3, 3, 4, 7, 4
    host, keys, values, pos, pages, slots, rows_ = random_recall(b, h, k, n_slots, n_pages, page_size, d, dtype,
                                                                 seed=page_size * 10 + with_heads)
    heads = torch.tensor([[True, False, True], [False, True, True]]) if with_heads else None
    before = keys.clone(), values.clone(), pos.clone()
    out = {}
    for name, copy in impls.items():
        got = tuple(x.clone() for x in before)
        done = copy(host, *got, pages, slots, rows_, heads)
        assert done is not False, f"{name} declined a contiguous layout"
        written = check_copy(host, before, got, pages, slots, rows_, heads, trash_untouched=name != "torch")
        assert written, "the plan copies something"
        out[name] = got
    trash = torch.arange(keys.shape[0]) % rows_.rows_per_head == rows_.rows_per_head - 1
    for name, got in out.items():
        for x, ref in zip(got, out["torch"]):
            assert torch.equal(x[~trash], ref[~trash]), f"{name} differs from the reference"
    # a pair with a skipped entry (page -1, or a pair left out by heads): the reference's trash row has position -1
    skipped = (pages < 0).view(b * h, k).any(-1)
    if heads is not None:
        skipped |= ~heads.view(-1)
    assert bool(skipped.any())
    ref_trash = out["torch"][2][trash]
    assert bool((ref_trash[skipped] == -1).all())


@pytest.mark.parametrize("with_heads", [False, True])
def test_recall_of_a_plan_with_nothing_to_copy_changes_nothing(with_heads):
    """An all -1 plan (or heads all False): the kernels write nothing at all, the reference only its trash rows."""
    impls = implementations("copy")
    host, keys, values, pos, pages, slots, rows_ = random_recall(2, 2, 3, 3, 5, 2, 4, torch.float32, seed=3)
    heads = None
    if with_heads:
        heads = torch.zeros(2, 2, dtype=torch.bool)
    else:
        pages, slots = torch.full_like(pages, -1), torch.full_like(slots, -1)
    before = keys.clone(), values.clone(), pos.clone()
    for name, copy in impls.items():
        got = tuple(x.clone() for x in before)
        copy(host, *got, pages, slots, rows_, heads)
        assert not check_copy(host, before, got, pages, slots, rows_, heads, trash_untouched=name != "torch")
        if name != "torch":
            assert all(torch.equal(x, y) for x, y in zip(got, before))


@pytest.mark.parametrize("dtype", DTYPES)
def test_recall_reference_with_a_staging_buffer(dtype):
    """The engine hands the reference a reused buffer for the gathered rows: the same copy as without one."""
    host, keys, values, pos, pages, slots, rows_ = random_recall(1, 2, 3, 4, 6, 2, 4, dtype, seed=9)
    plain = keys.clone(), values.clone(), pos.clone()
    staged = keys.clone(), values.clone(), pos.clone()
    recall_pages_reference(host, *plain, pages, slots, rows_)
    staging = host.new_full((pages.numel(), *host.shape[1:]), 7.0)
    recall_pages_reference(host, *staged, pages, slots, rows_, staging=staging)
    assert all(torch.equal(x, y) for x, y in zip(plain, staged))
    check_copy(host, (keys, values, pos), staged, pages, slots, rows_, None, trash_untouched=False)


# -- recall: host pool -> plan -> copy into a device buffer ------------------------------------------------
# The engine's layout (retrieval/engine.py): per (sequence, KV head) a buffer of a sink page, `slots` pages, a ring
# page and a trash page, viewed as rows of one page [rows, P*d] (positions [rows, P]); the host pool's layer viewed
# as [page * b * h + seq * h + head, 2, P*d].

class Recall:
    SINK, RING = 1, 1  # pages before and after the slots, which a recall must never write

    def __init__(self, pool: HostPool, layer: int, slots: int, device=CPU):
        b, h, _, p, d = pool.shape_tail
        self.pool, self.layer, self.p, self.n_slots = pool, layer, p, slots
        self.table = PageTable(b, h, slots, pool.num_pages[layer], device)
        self.rows = SlotRows(heads=b * h, rows_per_head=self.SINK + slots + self.RING + 1, first_slot=self.SINK)
        self.k = torch.zeros(b, h, self.rows.rows_per_head * p, d, dtype=pool.dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((b, h, self.rows.rows_per_head * p), -1, dtype=torch.long, device=device)
        self.recalled = torch.zeros((), dtype=torch.long, device=device)

    def recall(self, wanted, scores=None):
        plan = self.table.plan(wanted, scores, self.recalled)
        elems = self.p * self.k.shape[-1]
        host = self.pool.pages[self.layer].view(-1, 2, elems)
        keys, values = self.k.view(-1, elems), self.v.view(-1, elems)
        staging = host.new_empty((plan[0].numel(), 2, elems)) if staging_needed(host, keys) else None
        recall_pages(host, keys, values, self.pos.view(-1, self.p), *plan, self.rows, staging=staging)
        return plan

    def slots_kv(self):
        lo, hi = self.SINK * self.p, (self.SINK + self.n_slots) * self.p
        return self.k[:, :, lo:hi], self.v[:, :, lo:hi], self.pos[:, :, lo:hi]

    def outside(self):
        """Keys, values and positions of the sink and ring pages."""
        lo, hi = self.SINK * self.p, (self.SINK + self.n_slots) * self.p
        end = hi + self.RING * self.p
        return [torch.cat([x[:, :, :lo], x[:, :, hi:end]], dim=2) for x in (self.k, self.v, self.pos)]


def filled_pool(batch, heads, d, page_size, n_pages, dtype=torch.float32, seed=0):
    link = Link("cpu")
    pool = HostPool(2, batch, heads, d, page_size, dtype, link)
    k, v = kv(batch, heads, n_pages * page_size, d, seed=seed, dtype=dtype)
    junk_k, junk_v = kv(batch, heads, n_pages * page_size, d, seed=seed + 1, dtype=dtype)
    pool.write(0, to_pages(junk_k, junk_v, page_size))  # layer 0 holds other data: recall must read layer 1
    pool.write(1, to_pages(k, v, page_size))
    return pool, link, k, v


def check_recalled(rec, k, v):
    """Every slot holds its page's keys and values (empty slots zero) and its tokens' positions (the table's),
    checked through the host pool and through the token positions against the original keys and values; the
    sink and ring pages are never written."""
    p = rec.p
    slot_k, slot_v, slot_pos = rec.slots_kv()
    b, h, slots = rec.table.slot_page.shape
    for s in range(b):
        for hh in range(h):
            for j in range(slots):
                pg = int(rec.table.slot_page[s, hh, j])
                got_k, got_v = slot_k[s, hh, j * p:(j + 1) * p], slot_v[s, hh, j * p:(j + 1) * p]
                if pg < 0:
                    assert bool((got_k == 0).all()) and bool((got_v == 0).all())
                    continue
                host = rec.pool.head_page(rec.layer, pg, s, hh)
                assert torch.equal(got_k, host[0]) and torch.equal(got_v, host[1])
    pos = slot_positions(rec.table, p)
    assert pos.shape == (b, h, slots * p)
    assert torch.equal(slot_pos, pos), "the copy wrote other positions than the table's"
    present = pos >= 0
    idx = pos.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
    assert torch.equal(slot_k[present], k.gather(2, idx)[present])
    assert torch.equal(slot_v[present], v.gather(2, idx)[present])
    out_k, out_v, out_pos = rec.outside()
    assert not out_k.any() and not out_v.any() and bool((out_pos == -1).all())
    check_inverse(rec.table)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 4])
def test_recall_through_the_plan(path, dtype, page_size):
    batch, heads, d, n_pages, slots = 2, 3, 5, 9, 4
    pool, _, k, v = filled_pool(batch, heads, d, page_size, n_pages, dtype)
    rec = Recall(pool, 1, slots)
    assert bool((slot_positions(rec.table, page_size) == -1).all())
    torch.manual_seed(3)
    copied = 0
    for step in range(8):
        kk = [1, 4, 3, 4, 2, 4, 0, 4][step]
        wanted = torch.stack([torch.randperm(n_pages)[:kk] for _ in range(batch * heads)]).view(batch, heads, kk)
        scores = torch.rand(batch, heads, n_pages)
        prev_k = rec.slots_kv()[0].clone()
        pages, slots_ = rec.recall(wanted, scores)
        copied += int((pages >= 0).sum())
        assert int(rec.recalled) == copied
        check_recalled(rec, k, v)
        # slots that were not copied into are untouched
        written = torch.zeros(batch, heads, slots + 1, dtype=torch.bool)
        written.scatter_(-1, torch.where(pages >= 0, slots_, slots), True)  # -1 entries land in a spare column
        untouched = ~written[..., :slots].repeat_interleave(page_size, dim=-1)
        assert torch.equal(rec.slots_kv()[0][untouched], prev_k[untouched])
        # every wanted page's tokens are at their positions
        pos = slot_positions(rec.table, page_size)
        for s in range(batch):
            for hh in range(heads):
                have = set(pos[s, hh].tolist())
                for pg in wanted[s, hh].tolist():
                    assert set(range(pg * page_size, (pg + 1) * page_size)) <= have
    assert copied > 0


def test_recall_of_the_same_pages_copies_nothing(path):
    pool, _, k, v = filled_pool(1, 2, 4, 2, 6)
    rec = Recall(pool, 1, 3)
    wanted = torch.tensor([[[5, 0, 2], [1, 3, 4]]])
    pages, _ = rec.recall(wanted)
    assert bool((pages >= 0).all()) and int(rec.recalled) == 6
    check_recalled(rec, k, v)
    before = rec.slots_kv()[0].clone(), rec.slots_kv()[1].clone(), rec.slots_kv()[2].clone()
    pages, slots = rec.recall(wanted)
    assert bool((pages == -1).all()) and bool((slots == -1).all())
    assert int(rec.recalled) == 6
    assert all(torch.equal(x, y) for x, y in zip(rec.slots_kv(), before))
    check_recalled(rec, k, v)
