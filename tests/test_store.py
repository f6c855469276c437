"""The store (page layout, the host pool, the device ledger) and the retrieval engine's recall pieces it feeds: the
page table's dense plan and the row copy from the host pool into a device buffer (CPU)."""

from __future__ import annotations

import random

import pytest
import torch

from kvtier.link import Link
from kvtier.retrieval.recall import PageTable, copy_rows_reference
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


# -- PageTable: the dense plan ----------------------------------------------------------------------------
# plan(wanted [b, h, k], page_scores [b, h, pages] | None) -> (pages, slots), both [b, h, k]: copy pages[..., i]
# into slots[..., i], nothing where pages[..., i] is -1. Scores are what the engine passes, page probabilities.

CPU = torch.device("cpu")


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


def test_page_table_starts_empty():
    table = PageTable(2, 3, 5, CPU)
    assert table.slots == 5
    assert table.slot_page.shape == (2, 3, 5)
    assert table.slot_page.dtype == torch.long
    assert bool((table.slot_page == -1).all())


def test_page_table_plan_is_dense():
    table = PageTable(2, 3, 4, CPU)
    wanted = torch.stack([torch.randperm(9)[:3] for _ in range(6)]).view(2, 3, 3)
    pages, slots = table.plan(wanted, torch.rand(2, 3, 9))
    assert pages.shape == slots.shape == (2, 3, 3)
    assert pages.dtype == slots.dtype == torch.long


def test_page_table_fills_empty_slots_first_in_order():
    table = PageTable(1, 1, 4, CPU)
    pages, slots = table.plan(as_wanted([[[7, 3]]]))
    assert pages.tolist() == [[[7, 3]]] and slots.tolist() == [[[0, 1]]]
    assert rows(table) == [[[7, 3, -1, -1]]]
    # the next miss takes an empty slot even when a resident page scores lowest
    scores = torch.full((1, 1, 10), 0.5)
    scores[..., 7] = 0.0
    pages, slots = table.plan(as_wanted([[[5]]]), scores)
    assert pages.tolist() == [[[5]]] and slots.tolist() == [[[2]]]
    assert rows(table) == [[[7, 3, 5, -1]]]
    # a resident page among the wanted ones: only the miss is copied, into the last empty slot
    pages, slots = table.plan(as_wanted([[[3, 6]]]), scores)
    assert pages.tolist() == [[[6, -1]]] and slots[..., 0].tolist() == [[3]]
    assert rows(table) == [[[7, 3, 5, 6]]]


def test_page_table_misses_come_first_in_wanted_order():
    table = PageTable(1, 1, 6, CPU)
    table.plan(as_wanted([[[4, 2]]]))
    pages, slots = table.plan(as_wanted([[[9, 2, 0, 4, 8]]]))
    assert pages.tolist() == [[[9, 0, 8, -1, -1]]]
    assert slots[..., :3].tolist() == [[[2, 3, 4]]]
    assert rows(table) == [[[4, 2, 9, 0, 8, -1]]]


def test_page_table_resident_pages_are_not_copied_again():
    table = PageTable(2, 2, 3, CPU)
    wanted = as_wanted([[[0, 1, 2], [4, 5, 6]], [[9, 8, 7], [1, 3, 5]]])
    plan = table.plan(wanted)
    assert bool((plan[0] >= 0).all()) and len(copies(plan)) == 12
    before = table.slot_page.clone()
    for _ in range(2):
        pages, _ = table.plan(wanted, torch.rand(2, 2, 10))
        assert bool((pages == -1).all())
        assert torch.equal(table.slot_page, before)
    # a subset, in another order, is all resident too
    pages, _ = table.plan(as_wanted([[[2, 0], [6, 4]], [[7, 9], [5, 1]]]), torch.rand(2, 2, 10))
    assert pages.shape == (2, 2, 2) and bool((pages == -1).all())
    assert torch.equal(table.slot_page, before)


def test_page_table_evicts_lowest_scoring_unwanted_pages():
    table = PageTable(1, 1, 4, CPU)
    table.plan(as_wanted([[[10, 11, 12, 13]]]))
    scores = torch.zeros(1, 1, 20)
    scores[0, 0, 10] = 0.5
    scores[0, 0, 11] = 0.01  # lowest, but wanted: must stay
    scores[0, 0, 12] = 0.05
    scores[0, 0, 13] = 0.2
    pages, slots = table.plan(as_wanted([[[11, 1, 2]]]), scores)
    # two misses evict the two lowest-scoring pages that are not wanted: 12 (slot 2) then 13 (slot 3)
    assert pages.tolist() == [[[1, 2, -1]]]
    assert slots[..., :2].tolist() == [[[2, 3]]]
    assert rows(table) == [[[10, 11, 1, 2]]]


def test_page_table_without_scores_evicts_unwanted_pages():
    table = PageTable(1, 2, 3, CPU)
    table.plan(as_wanted([[[0, 1, 2], [3, 4, 5]]]))
    pages, slots = table.plan(as_wanted([[[1, 9], [5, 4]]]))
    assert pages.tolist() == [[[9, -1], [-1, -1]]]  # head 1 already holds 5 and 4
    assert int(slots[0, 0, 0]) in (0, 2)  # page 0 or page 2: never the wanted page 1
    assert 1 in rows(table)[0][0] and 9 in rows(table)[0][0]
    assert rows(table)[0][1] == [3, 4, 5]


def test_page_table_rows_are_independent():
    table = PageTable(2, 1, 2, CPU)
    table.plan(as_wanted([[[0, 1]], [[0, 1]]]))
    scores = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]])
    pages, slots = table.plan(as_wanted([[[2]], [[2]]]), scores)
    assert pages.tolist() == [[[2]], [[2]]]
    # sequence 0 evicts page 1 (lower score), sequence 1 evicts page 0
    assert slots.tolist() == [[[1]], [[0]]]
    assert rows(table) == [[[0, 2]], [[2, 1]]]


def test_page_table_too_many_pages_raises():
    table = PageTable(1, 1, 3, CPU)
    with pytest.raises(ValueError, match="slots"):
        table.plan(as_wanted([[[0, 1, 2, 3]]]))
    assert bool((table.slot_page == -1).all())


def test_page_table_already_resident_request_copies_nothing():
    table = PageTable(2, 2, 3, CPU)
    table.plan(as_wanted([[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [0, 2, 4]]]))
    before = table.slot_page.clone()
    pages, slots = table.plan(as_wanted([[[1], [5]], [[6], [2]]]), torch.rand(2, 2, 9))
    assert pages.tolist() == [[[-1], [-1]], [[-1], [-1]]]
    assert slots.shape == (2, 2, 1)
    assert torch.equal(table.slot_page, before)
    # and an empty request (k = 0) is an empty plan
    pages, slots = table.plan(torch.empty(2, 2, 0, dtype=torch.long))
    assert pages.shape == slots.shape == (2, 2, 0)
    assert torch.equal(table.slot_page, before)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("on", ["unwanted", "wanted", "all"])
def test_page_table_never_evicts_a_wanted_page_even_with_infinite_scores(bad, on):
    table = PageTable(1, 1, 3, CPU)
    table.plan(as_wanted([[[0, 1, 2]]]))
    scores = torch.zeros(1, 1, 10)
    if on in ("unwanted", "all"):
        scores[..., 1] = bad
        scores[..., 2] = bad
    if on in ("wanted", "all"):
        scores[..., 0] = bad
        scores[..., 5] = bad
    pages, _ = table.plan(as_wanted([[[5, 0]]]), scores)
    assert pages.tolist() == [[[5, -1]]]
    resident = rows(table)[0][0]
    assert {0, 5} <= set(resident) and len(set(resident)) == 3


def check_plan(prev, new, wanted, scores, plan):
    """The invariants of one dense plan, per (sequence, head) row."""
    pages, slots = plan
    b, h, n_slots = prev.shape
    assert pages.shape == slots.shape == wanted.shape
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


@pytest.mark.parametrize("seed", range(6))
def test_page_table_randomized_invariants(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    b, h = rng.choice([1, 2]), rng.choice([1, 3])
    n_slots = rng.choice([1, 3, 6])
    n_pages = rng.choice([n_slots, n_slots + 2, 20])
    table = PageTable(b, h, n_slots, CPU)
    total_copies = 0
    for _ in range(60):
        k = rng.randint(0, n_slots)
        if rng.random() < 0.3:
            # mostly what is resident already, to exercise hits
            wanted = []
            for s in range(b):
                row = []
                for hh in range(h):
                    res = [p for p in table.slot_page[s, hh].tolist() if p >= 0]
                    rest = [p for p in range(n_pages) if p not in res]
                    pick = rng.sample(res, min(k, len(res)))
                    pick += rng.sample(rest, k - len(pick))
                    rng.shuffle(pick)
                    row.append(pick)
                wanted.append(row)
            wanted = torch.tensor(wanted, dtype=torch.long).view(b, h, k)
        else:
            wanted = torch.stack([torch.randperm(n_pages)[:k] for _ in range(b * h)]).view(b, h, k)
        scores = torch.softmax(4 * torch.randn(b, h, n_pages), -1) if rng.random() < 0.7 else None
        prev = table.slot_page.clone()
        plan = table.plan(wanted, scores)
        check_plan(prev, table.slot_page, wanted, scores, plan)
        total_copies += int((plan[0] >= 0).sum())
        # planning the same pages again copies nothing and leaves the table as it is
        after = table.slot_page.clone()
        again, _ = table.plan(wanted, scores)
        assert bool((again == -1).all())
        assert torch.equal(table.slot_page, after)
    assert total_copies > 0


# -- PageTable: positions and residency ----------------------------------------------------------------------

def test_positions_values():
    table = PageTable(1, 2, 3, CPU)
    assert table.positions(3).tolist() == [[[-1] * 9, [-1] * 9]]
    table.slot_page[0, 0] = torch.tensor([2, -1, 0])
    table.slot_page[0, 1] = torch.tensor([-1, 5, -1])
    pos = table.positions(3)
    assert pos.shape == (1, 2, 9) and pos.dtype == torch.long
    assert pos.tolist() == [[[6, 7, 8, -1, -1, -1, 0, 1, 2], [-1, -1, -1, 15, 16, 17, -1, -1, -1]]]
    assert table.positions(1).tolist() == [[[2, -1, 0], [-1, 5, -1]]]


def test_resident_marks_the_pages_in_slots():
    table = PageTable(2, 2, 3, CPU)
    resident = table.resident(6)
    assert resident.shape == (2, 2, 7) and resident.dtype == torch.bool
    assert not resident[..., :6].any() and resident[..., 6].all()  # every slot empty: only the last column
    table.slot_page[0, 0] = torch.tensor([2, -1, 0])
    table.slot_page[0, 1] = torch.tensor([5, 4, 3])
    table.slot_page[1, 0] = torch.tensor([1, -1, -1])
    resident = table.resident(6)
    expect = torch.zeros(2, 2, 7, dtype=torch.bool)
    expect[0, 0, [0, 2, 6]] = True
    expect[0, 1, [3, 4, 5]] = True
    expect[1, 0, [1, 6]] = True
    expect[1, 1, 6] = True
    assert torch.equal(resident, expect)


def test_resident_follows_plans():
    torch.manual_seed(4)
    table = PageTable(2, 3, 4, CPU)
    for _ in range(10):
        wanted = torch.stack([torch.randperm(11)[:3] for _ in range(6)]).view(2, 3, 3)
        table.plan(wanted, torch.rand(2, 3, 11))
        resident = table.resident(11)
        assert bool(resident.gather(-1, wanted).all())
        assert torch.equal(resident[..., :11].sum(-1), (table.slot_page >= 0).sum(-1))


# -- copy_rows_reference ----------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_copy(n_src, n_dst, elems, n, skip, dtype, seed):
    """src [n_src, 2, elems], dst_k, dst_v [n_dst + 1, elems] (the last row is the trash row) and a plan of n
    distinct destination rows, a share `skip` of its entries -1 (pointed at the trash row)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(n_src, 2, elems, generator=g).to(dtype)
    dst_k = torch.randn(n_dst + 1, elems, generator=g).to(dtype)
    dst_v = torch.randn(n_dst + 1, elems, generator=g).to(dtype)
    src_rows = torch.randint(0, n_src, (n,), generator=g)
    dst_rows = torch.randperm(n_dst, generator=g)[:n]
    off = torch.rand(n, generator=g) < skip
    src_rows[off] = -1
    dst_rows[off] = n_dst
    return src, dst_k, dst_v, src_rows, dst_rows


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("skip", [0.0, 0.4, 1.0])
def test_copy_rows_reference_copies_rows_exactly(dtype, skip):
    n_src, n_dst, elems = 13, 10, 24
    src, dst_k, dst_v, src_rows, dst_rows = random_copy(n_src, n_dst, elems, 7, skip, dtype, seed=int(skip * 10))
    old_k, old_v = dst_k.clone(), dst_v.clone()
    copy_rows_reference(src, dst_k, dst_v, src_rows, dst_rows)
    written = set()
    for s, d in zip(src_rows.tolist(), dst_rows.tolist()):
        if s >= 0:
            assert torch.equal(dst_k[d], src[s, 0]) and torch.equal(dst_v[d], src[s, 1])
            written.add(d)
    # every row but the written ones and the trash row is untouched, bit for bit
    for d in range(n_dst):
        if d not in written:
            assert torch.equal(dst_k[d], old_k[d]) and torch.equal(dst_v[d], old_v[d])
    if skip == 1.0:
        assert not written


def test_copy_rows_reference_skipped_entries_touch_only_the_trash_row():
    src = torch.arange(4 * 2 * 3, dtype=torch.float32).view(4, 2, 3)
    dst_k, dst_v = torch.full((5, 3), -1.0), torch.full((5, 3), -2.0)
    copy_rows_reference(src, dst_k, dst_v, torch.tensor([-1, 2, -1]), torch.tensor([4, 0, 4]))
    assert torch.equal(dst_k[0], src[2, 0]) and torch.equal(dst_v[0], src[2, 1])
    assert bool((dst_k[1:4] == -1).all()) and bool((dst_v[1:4] == -2).all())


def test_copy_rows_reference_of_an_empty_plan_changes_nothing():
    src = torch.randn(3, 2, 4)
    dst_k, dst_v = torch.randn(2, 4), torch.randn(2, 4)
    before = dst_k.clone(), dst_v.clone()
    empty = torch.empty(0, dtype=torch.long)
    copy_rows_reference(src, dst_k, dst_v, empty, empty)
    assert torch.equal(dst_k, before[0]) and torch.equal(dst_v, before[1])


# -- recall: host pool -> plan -> copy into a device buffer ------------------------------------------------
# The engine's layout (retrieval/engine.py): per (sequence, KV head) a buffer of `slots` pages and one trash page,
# viewed as rows of one page [rows, P*d]; the host pool's layer viewed as [page * b * h + seq * h + head, 2, P*d].

class Recall:
    def __init__(self, pool: HostPool, layer: int, slots: int, device=CPU):
        b, h, _, p, d = pool.shape_tail
        self.pool, self.layer, self.p = pool, layer, p
        self.table = PageTable(b, h, slots, device)
        self.k = torch.zeros(b, h, (slots + 1) * p, d, dtype=pool.dtype, device=device)
        self.v = torch.zeros_like(self.k)
        seq_head = torch.arange(b * h, device=device).view(b, h, 1)
        self.slot_rows = seq_head * (slots + 1)
        self.trash_rows = self.slot_rows + slots
        self.pool_rows = seq_head

    def rows(self, plan):
        pages, slots = plan
        b, h = pages.shape[:2]
        copy = pages >= 0
        src = torch.where(copy, pages * (b * h) + self.pool_rows, -1).flatten()
        dst = torch.where(copy, self.slot_rows + slots, self.trash_rows).flatten()
        return src, dst

    def recall(self, wanted, scores=None, copy=copy_rows_reference):
        plan = self.table.plan(wanted, scores)
        host = self.pool.pages[self.layer].view(-1, 2, self.p * self.k.shape[-1])
        copy(host, self.k.view(-1, self.p * self.k.shape[-1]), self.v.view(-1, self.p * self.k.shape[-1]),
             *self.rows(plan))
        return plan

    def slots_kv(self):
        n = self.table.slots * self.p
        return self.k[:, :, :n], self.v[:, :, :n]


def filled_pool(batch, heads, d, page_size, n_pages, dtype=torch.float32, seed=0):
    link = Link("cpu")
    pool = HostPool(2, batch, heads, d, page_size, dtype, link)
    k, v = kv(batch, heads, n_pages * page_size, d, seed=seed, dtype=dtype)
    junk_k, junk_v = kv(batch, heads, n_pages * page_size, d, seed=seed + 1, dtype=dtype)
    pool.write(0, to_pages(junk_k, junk_v, page_size))  # layer 0 holds other data: recall must read layer 1
    pool.write(1, to_pages(k, v, page_size))
    return pool, link, k, v


def check_recalled(rec, k, v):
    """Every slot holds its page's keys and values (empty slots zero), checked through the host pool and
    through the token positions against the original keys and values."""
    p = rec.p
    slot_k, slot_v = rec.slots_kv()
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
    pos = rec.table.positions(p)
    assert pos.shape == (b, h, slots * p)
    present = pos >= 0
    idx = pos.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
    assert torch.equal(slot_k[present], k.gather(2, idx)[present])
    assert torch.equal(slot_v[present], v.gather(2, idx)[present])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 4])
def test_recall_through_the_plan(dtype, page_size):
    batch, heads, d, n_pages, slots = 2, 3, 5, 9, 4
    pool, _, k, v = filled_pool(batch, heads, d, page_size, n_pages, dtype)
    rec = Recall(pool, 1, slots)
    assert bool((rec.table.positions(page_size) == -1).all())
    torch.manual_seed(3)
    for step in range(8):
        kk = [1, 4, 3, 4, 2, 4, 0, 4][step]
        wanted = torch.stack([torch.randperm(n_pages)[:kk] for _ in range(batch * heads)]).view(batch, heads, kk)
        scores = torch.rand(batch, heads, n_pages)
        prev_k = rec.slots_kv()[0].clone()
        pages, slots_ = rec.recall(wanted, scores)
        check_recalled(rec, k, v)
        # slots that were not copied into are untouched
        written = torch.zeros(batch, heads, slots, dtype=torch.bool)
        written.scatter_(-1, slots_, pages >= 0)
        untouched = ~written.repeat_interleave(page_size, dim=-1)
        assert torch.equal(rec.slots_kv()[0][untouched], prev_k[untouched])
        # every wanted page's tokens are at their positions
        pos = rec.table.positions(page_size)
        for s in range(batch):
            for hh in range(heads):
                have = set(pos[s, hh].tolist())
                for pg in wanted[s, hh].tolist():
                    assert set(range(pg * page_size, (pg + 1) * page_size)) <= have


def test_recall_of_the_same_pages_copies_nothing():
    pool, _, k, v = filled_pool(1, 2, 4, 2, 6)
    rec = Recall(pool, 1, 3)
    wanted = torch.tensor([[[5, 0, 2], [1, 3, 4]]])
    pages, _ = rec.recall(wanted)
    assert bool((pages >= 0).all())
    check_recalled(rec, k, v)
    before = rec.slots_kv()[0].clone(), rec.slots_kv()[1].clone()
    plan = rec.recall(wanted)
    assert bool((plan[0] == -1).all())
    src, dst = rec.rows(plan)
    assert bool((src == -1).all()) and torch.equal(dst, rec.trash_rows.expand(1, 2, 3).flatten())
    assert torch.equal(rec.slots_kv()[0], before[0]) and torch.equal(rec.slots_kv()[1], before[1])
    check_recalled(rec, k, v)
