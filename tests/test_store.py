"""The store: page layout, the host pool, the device ledger, page tables and the device pool (CPU)."""

from __future__ import annotations

import random

import pytest
import torch

from kvtier.link import Link
from kvtier.store import DeviceLedger, DevicePool, HostPool, PageTable, from_pages, to_pages


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


# -- PageTable -------------------------------------------------------------------------------------------

def rows(table):
    return table.slot_page.tolist()


def as_wanted(rows_):
    return torch.tensor(rows_, dtype=torch.long)


def test_page_table_starts_empty():
    table = PageTable(2, 3, 5, torch.device("cpu"))
    assert table.slots == 5
    assert table.slot_page.shape == (2, 3, 5)
    assert bool((table.slot_page == -1).all())


def test_page_table_fills_empty_slots_first_in_order():
    table = PageTable(1, 1, 4, torch.device("cpu"))
    seq, head, slot, page = table.plan(as_wanted([[[7, 3]]]))
    assert seq.tolist() == [0, 0] and head.tolist() == [0, 0]
    assert slot.tolist() == [0, 1] and page.tolist() == [7, 3]
    assert rows(table) == [[[7, 3, -1, -1]]]
    # the next miss takes an empty slot even when a resident page scores lowest
    scores = torch.zeros(1, 1, 10)
    scores[..., 7] = -100.0
    _, _, slot, page = table.plan(as_wanted([[[5]]]), scores)
    assert slot.tolist() == [2] and page.tolist() == [5]
    assert rows(table) == [[[7, 3, 5, -1]]]


def test_page_table_resident_pages_are_not_copied_again():
    table = PageTable(2, 2, 3, torch.device("cpu"))
    wanted = as_wanted([[[0, 1, 2], [4, 5, 6]], [[9, 8, 7], [1, 3, 5]]])
    seq, head, slot, page = table.plan(wanted)
    assert len(seq) == 12
    before = table.slot_page.clone()
    for _ in range(2):
        out = table.plan(wanted)
        assert all(len(x) == 0 for x in out)
        assert torch.equal(table.slot_page, before)
    # a subset, in another order, is all resident too
    out = table.plan(as_wanted([[[2, 0], [6, 4]], [[7, 9], [5, 1]]]), torch.randn(2, 2, 10))
    assert all(len(x) == 0 for x in out)
    assert torch.equal(table.slot_page, before)


def test_page_table_evicts_lowest_scoring_unwanted_pages():
    table = PageTable(1, 1, 4, torch.device("cpu"))
    table.plan(as_wanted([[[10, 11, 12, 13]]]))
    scores = torch.zeros(1, 1, 20)
    scores[0, 0, 10] = 5.0
    scores[0, 0, 11] = -1.0  # lowest, but wanted: must stay
    scores[0, 0, 12] = 0.5
    scores[0, 0, 13] = 2.0
    _, _, slot, page = table.plan(as_wanted([[[11, 1, 2]]]), scores)
    # two misses evict the two lowest-scoring pages that are not wanted: 12 (slot 2) then 13 (slot 3)
    assert page.tolist() == [1, 2]
    assert slot.tolist() == [2, 3]
    assert rows(table) == [[[10, 11, 1, 2]]]


def test_page_table_without_scores_evicts_unwanted_pages():
    table = PageTable(1, 2, 3, torch.device("cpu"))
    table.plan(as_wanted([[[0, 1, 2], [3, 4, 5]]]))
    _, head, slot, page = table.plan(as_wanted([[[1, 9], [5, 4]]]))
    assert head.tolist() == [0]  # head 1 already holds 5 and 4
    assert page.tolist() == [9]
    assert slot.tolist()[0] in (0, 2)  # page 0 or page 2: never the wanted page 1
    assert 1 in rows(table)[0][0] and 9 in rows(table)[0][0]
    assert rows(table)[0][1] == [3, 4, 5]


def test_page_table_rows_are_independent():
    table = PageTable(2, 1, 2, torch.device("cpu"))
    table.plan(as_wanted([[[0, 1]], [[0, 1]]]))
    scores = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]])
    seq, _, slot, page = table.plan(as_wanted([[[2]], [[2]]]), scores)
    assert seq.tolist() == [0, 1]
    assert page.tolist() == [2, 2]
    # sequence 0 evicts page 1 (lower score), sequence 1 evicts page 0
    assert rows(table) == [[[0, 2]], [[2, 1]]]


def test_page_table_too_many_pages_raises():
    table = PageTable(1, 1, 3, torch.device("cpu"))
    with pytest.raises(ValueError, match="slots"):
        table.plan(as_wanted([[[0, 1, 2, 3]]]))
    assert bool((table.slot_page == -1).all())


def test_page_table_empty_request_copies_nothing():
    table = PageTable(2, 2, 3, torch.device("cpu"))
    out = table.plan(torch.empty(2, 2, 0, dtype=torch.long))
    assert all(len(x) == 0 for x in out)
    assert bool((table.slot_page == -1).all())


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_page_table_never_evicts_a_wanted_page_even_with_infinite_scores(bad):
    table = PageTable(1, 1, 3, torch.device("cpu"))
    table.plan(as_wanted([[[0, 1, 2]]]))
    scores = torch.zeros(1, 1, 10)
    scores[..., 1] = bad
    scores[..., 2] = bad
    table.plan(as_wanted([[[5, 0]]]), scores)
    resident = set(rows(table)[0][0])
    assert {0, 5} <= resident


def check_plan(prev, new, wanted, scores, out):
    """The invariants of one plan, per (sequence, head) row."""
    seq, head, slot, page = (x.tolist() for x in out)
    b, h, slots = prev.shape
    copies = {}
    for s, hh, j, p in zip(seq, head, slot, page):
        assert (s, hh, j) not in copies, "a slot was written twice in one plan"
        copies[(s, hh, j)] = p
    for s in range(b):
        for hh in range(h):
            before = prev[s, hh].tolist()
            after = new[s, hh].tolist()
            want = wanted[s, hh].tolist()
            # the copies applied to the old row give the new row
            expect = list(before)
            for j in range(slots):
                if (s, hh, j) in copies:
                    expect[j] = copies[(s, hh, j)]
            assert after == expect
            resident_before = {p for p in before if p >= 0}
            resident_after = [p for p in after if p >= 0]
            assert len(resident_after) == len(set(resident_after)), "duplicate page in a row"
            assert set(want) <= set(resident_after), "a wanted page is not resident"
            row_copies = [p for (ss, h2, _), p in copies.items() if (ss, h2) == (s, hh)]
            missing = set(want) - resident_before
            assert sorted(row_copies) == sorted(missing), "copies != wanted pages not previously resident"
            # evictions: only empty slots or unwanted pages; empty slots before any resident page
            evicted = [before[j] for j in range(slots) if (s, hh, j) in copies and before[j] >= 0]
            assert not set(evicted) & set(want)
            empty_left = sum(p < 0 for p in after)
            if evicted:
                assert empty_left == 0, "a resident page was evicted while an empty slot remained"
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
    slots = rng.choice([1, 3, 6])
    n_pages = rng.choice([slots, slots + 2, 20])
    table = PageTable(b, h, slots, torch.device("cpu"))
    total_copies = 0
    for _ in range(60):
        k = rng.randint(0, slots)
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
        scores = torch.randn(b, h, n_pages) if rng.random() < 0.7 else None
        prev = table.slot_page.clone()
        out = table.plan(wanted, scores)
        check_plan(prev, table.slot_page, wanted, scores, out)
        total_copies += len(out[0])
        # planning the same pages again copies nothing
        again = table.plan(wanted, scores)
        assert len(again[0]) == 0
    assert total_copies > 0


# -- DevicePool ------------------------------------------------------------------------------------------

def filled_pool(batch, heads, d, page_size, n_pages, dtype=torch.float32, seed=0):
    link = Link("cpu")
    pool = HostPool(2, batch, heads, d, page_size, dtype, link)
    k, v = kv(batch, heads, n_pages * page_size, d, seed=seed, dtype=dtype)
    junk_k, junk_v = kv(batch, heads, n_pages * page_size, d, seed=seed + 1, dtype=dtype)
    pool.write(0, to_pages(junk_k, junk_v, page_size))  # layer 0 holds other data: recall must read layer 1
    pool.write(1, to_pages(k, v, page_size))
    return pool, link, k, v


def check_device_pool(dev, pool, layer, k, v):
    p = dev.page_size
    table = dev.table.slot_page
    b, h, slots = table.shape
    for s in range(b):
        for hh in range(h):
            for j in range(slots):
                pg = int(table[s, hh, j])
                got_k = dev.slot_k[s, hh, j * p:(j + 1) * p]
                got_v = dev.slot_v[s, hh, j * p:(j + 1) * p]
                if pg < 0:
                    assert bool((got_k == 0).all()) and bool((got_v == 0).all())
                    continue
                host = pool.head_page(layer, pg, s, hh)
                assert torch.equal(got_k, host[0]) and torch.equal(got_v, host[1])
    # and, through the token positions, against the original keys and values
    pos = dev.slot_positions()
    assert pos.shape == (b, h, slots * p)
    present = pos >= 0
    idx = pos.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
    assert torch.equal(dev.slot_k[present], k.gather(2, idx)[present])
    assert torch.equal(dev.slot_v[present], v.gather(2, idx)[present])


@pytest.mark.parametrize("dtype,elem", [(torch.float32, 4), (torch.float16, 2)])
@pytest.mark.parametrize("page_size", [1, 4])
def test_device_pool_recall(dtype, elem, page_size):
    batch, heads, d, n_pages, slots = 2, 3, 5, 9, 4
    pool, link, k, v = filled_pool(batch, heads, d, page_size, n_pages, dtype)
    dev = DevicePool(batch, heads, d, page_size, slots, dtype, torch.device("cpu"))
    assert bool((dev.slot_positions() == -1).all())
    torch.manual_seed(3)
    h2d_bytes = 0
    for step in range(8):
        kk = [1, 4, 3, 4, 2, 4, 0, 4][step]
        wanted = torch.stack([torch.randperm(n_pages)[:kk] for _ in range(batch * heads)]).view(batch, heads, kk)
        scores = torch.randn(batch, heads, n_pages)
        prev_k = dev.slot_k.clone()
        plan = dev.table.plan(wanted, scores)
        dev.recall(pool, 1, link, *plan)
        copies = len(plan[0])
        h2d_bytes += copies * 2 * page_size * d * elem
        assert link.h2d_bytes == h2d_bytes
        check_device_pool(dev, pool, 1, k, v)
        # slots that were not copied into are untouched
        written = torch.zeros(batch, heads, slots, dtype=torch.bool)
        written[plan[0], plan[1], plan[2]] = True
        untouched = ~written.repeat_interleave(page_size, dim=-1)
        assert torch.equal(dev.slot_k[untouched], prev_k[untouched])
        # every wanted page's tokens are at their positions
        pos = dev.slot_positions()
        for s in range(batch):
            for hh in range(heads):
                have = set(pos[s, hh].tolist())
                for pg in wanted[s, hh].tolist():
                    assert set(range(pg * page_size, (pg + 1) * page_size)) <= have
    assert link.h2d_copies <= sum(1 for _ in range(8)) * heads  # one transfer per KV head per recall


def test_device_pool_recall_of_the_same_pages_copies_nothing():
    pool, link, k, v = filled_pool(1, 2, 4, 2, 6)
    dev = DevicePool(1, 2, 4, 2, 3, torch.float32, torch.device("cpu"))
    wanted = torch.tensor([[[5, 0, 2], [1, 3, 4]]])
    dev.recall(pool, 1, link, *dev.table.plan(wanted))
    assert link.h2d_copies == 2  # one transfer per KV head
    assert link.h2d_bytes == 6 * 2 * 2 * 4 * 4
    before = (dev.slot_k.clone(), dev.slot_v.clone())
    plan = dev.table.plan(wanted)
    assert len(plan[0]) == 0
    dev.recall(pool, 1, link, *plan)
    assert link.h2d_copies == 2 and link.h2d_bytes == 6 * 2 * 2 * 4 * 4
    assert torch.equal(dev.slot_k, before[0]) and torch.equal(dev.slot_v, before[1])
    check_device_pool(dev, pool, 1, k, v)


def test_slot_positions_values():
    dev = DevicePool(1, 2, 4, 3, 3, torch.float32, torch.device("cpu"))
    dev.table.slot_page[0, 0] = torch.tensor([2, -1, 0])
    dev.table.slot_page[0, 1] = torch.tensor([-1, 5, -1])
    pos = dev.slot_positions()
    assert pos.tolist() == [[[6, 7, 8, -1, -1, -1, 0, 1, 2], [-1, -1, -1, 15, 16, 17, -1, -1, -1]]]


def test_device_pool_tensors_and_dtype_mismatch():
    pool, link, _, _ = filled_pool(1, 2, 4, 2, 4, dtype=torch.float32)
    dev = DevicePool(1, 2, 4, 2, 2, torch.float16, torch.device("cpu"))
    slot_k, slot_v, table = dev.tensors()[:3]
    assert slot_k.shape == slot_v.shape == (1, 2, 4, 4)
    assert table is dev.table.slot_page
    plan = dev.table.plan(torch.tensor([[[0], [1]]]))
    with pytest.raises(ValueError):
        dev.recall(pool, 1, link, *plan)  # the link refuses a float32 -> float16 copy
