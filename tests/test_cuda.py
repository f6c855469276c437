"""The CUDA paths: pinned host pool, asynchronous copies with events, the offload method, recall on the GPU (the
page table's dense plan and the copy kernel reading the pinned host pool), FreeKV and SpeCache decoding on the GPU.

Skipped without a CUDA device. The bodies take the device as an argument so that the same checks can be
read against the CPU path; the tests themselves always run on "cuda".
"""

from __future__ import annotations

import pytest
import torch
from conftest import slot_positions

import kvtier
from kvtier.link import Link
from kvtier.models import tiny_random_model
from kvtier.retrieval import recall
from kvtier.retrieval.recall import PageTable, SlotRows
from kvtier.store import HostPool, to_pages

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_host_pool_with_cuda_link_is_pinned_and_written_correctly():
    link = Link("cuda")
    assert link.cuda
    batch, heads, d, page_size = 2, 3, 8, 4
    pool = HostPool(2, batch, heads, d, page_size, torch.float16, link)
    assert pool.pin is True
    torch.manual_seed(0)
    blocks = []
    for n in (5, 20, 3):  # the second write grows the buffer
        k = torch.randn(batch, heads, n * page_size, d, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        block = to_pages(k, v, page_size)
        pool.write(0, block)
        blocks.append(block)
        assert pool.pages[0].device.type == "cpu"
        assert pool.pages[0].is_pinned()
    link.synchronize()  # host reads of written-back pages
    assert torch.equal(pool.layer_block(0), torch.cat(blocks).cpu())
    assert link.d2h_copies == 3
    assert link.d2h_bytes == sum(b.numel() for b in blocks) * 2
    assert pool.used_bytes() == 28 * pool.page_bytes
    pool.reserve(1, 10)
    assert pool.pages[1].is_pinned()


@pytest.mark.parametrize("pinned", [True, False])
@pytest.mark.parametrize("lane", [0, 1, 5])
def test_h2d_returns_event_and_copies(pinned, lane):
    link = Link("cuda", lanes=2)
    torch.manual_seed(lane)
    src = torch.randn(64, 33)
    if pinned:
        src = src.pin_memory()
    dst = torch.empty(64, 33, device="cuda")
    event = link.h2d(dst, src, lane=lane)
    assert isinstance(event, torch.cuda.Event)
    link.wait(event)
    torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), src)
    assert link.h2d_bytes == 64 * 33 * 4 and link.h2d_copies == 1


def test_d2h_into_pinned_memory():
    link = Link("cuda")
    torch.manual_seed(1)
    src = torch.randn(3, 1000, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty(3, 1000, dtype=torch.bfloat16, pin_memory=True)
    event = link.d2h(dst, src)
    assert isinstance(event, torch.cuda.Event)
    link.synchronize()
    assert torch.equal(dst, src.cpu())
    assert link.d2h_bytes == 3000 * 2 and link.d2h_copies == 1


def test_h2d_after_d2h_reads_the_written_data():
    # a page written back and read again at once: the link orders the read after the write, no sync needed
    link = Link("cuda")
    torch.manual_seed(2)
    host = torch.zeros(4, 1 << 18, pin_memory=True)
    src = torch.randn(4, 1 << 18, device="cuda")
    link.d2h(host, src)
    back = torch.empty_like(src)
    event = link.h2d(back, host, lane=1)
    link.wait(event)
    assert torch.equal(back, src)


def test_mismatched_copies_raise_on_cuda():
    link = Link("cuda")
    with pytest.raises(ValueError):
        link.h2d(torch.empty(3, device="cuda"), torch.empty(4))
    with pytest.raises(ValueError):
        link.d2h(torch.empty(3, dtype=torch.float16), torch.empty(3, device="cuda"))


def run_generate(device, method, max_new_tokens=10, length=21, **options):
    model = tiny_random_model("llama", device=device)
    torch.manual_seed(0)
    ids = torch.randint(3, 256, (2, length), device=device)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    cache = kvtier.KVCache(model, method=method, **options)
    out = kvtier.generate(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=-1,
                          cache=cache)
    return out, cache.stats(), cache


def test_offload_generate_matches_full_on_cuda():
    full, full_stats, _ = run_generate("cuda", "full")
    offload, stats, _ = run_generate("cuda", "offload")
    assert full.device.type == "cuda"
    assert full.shape == (2, 31)
    assert torch.equal(offload, full)
    assert full_stats["h2d_bytes"] == 0 and full_stats["d2h_bytes"] == 0
    # every token is written back once; every decode step streams the whole cache in
    assert stats["d2h_bytes"] == stats["host_kv_bytes"] > 0
    assert stats["h2d_bytes"] > stats["d2h_bytes"]
    assert stats["tokens"] == full_stats["tokens"] == 30


def recall_run(device, steps=6):
    """Fill a host pool through a Link on `device`, then recall planned pages as the retrieval engine does: the
    page table's dense plan (counting the pages to copy on the device), and the copy of rows of the host pool's
    layer (pinned on CUDA, read by the kernel in place) into one device buffer per (sequence, KV head) of a sink
    page, `slots` pages and a trash page, with the rows' token positions, on a copy lane.
    Returns (slot keys, slot values, slot positions, table, copied pages, link), on the CPU."""
    batch, heads, d, page_size, n_pages, slots = 2, 3, 16, 4, 12, 5
    link = Link(device)
    pool = HostPool(1, batch, heads, d, page_size, torch.float32, link)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(batch, heads, n_pages * page_size, d, generator=g)
    v = torch.randn(batch, heads, n_pages * page_size, d, generator=g)
    pool.write(0, to_pages(k.to(device), v.to(device), page_size))
    assert pool.pages[0].is_pinned() == (device == "cuda")
    table = PageTable(batch, heads, slots, n_pages, torch.device(device))
    rows = SlotRows(heads=batch * heads, rows_per_head=slots + 2, first_slot=1)
    buf_k = torch.zeros(batch, heads, rows.rows_per_head * page_size, d, device=device)
    buf_v = torch.zeros_like(buf_k)
    buf_pos = torch.full(buf_k.shape[:3], -1, dtype=torch.long, device=device)
    recalled = torch.zeros((), dtype=torch.long, device=device)
    host = pool.pages[0].view(-1, 2, page_size * d)
    copied = 0
    for step in range(steps):
        kk = [5, 3, 5, 1, 4, 5][step]
        wanted = torch.stack([torch.randperm(n_pages, generator=g)[:kk] for _ in range(batch * heads)])
        wanted = wanted.view(batch, heads, kk).to(device)
        scores = torch.rand(batch, heads, n_pages, generator=g).to(device)
        pages, slot = table.plan(wanted, scores, recalled)
        copied += int((pages >= 0).sum())
        event = link.async_rows(recall.recall_pages, host, buf_k.view(-1, page_size * d),
                                buf_v.view(-1, page_size * d), buf_pos.view(-1, page_size), pages, slot, rows,
                                lane=step)
        link.wait(event)
    lo, hi = page_size, (slots + 1) * page_size
    if device == "cuda":
        torch.cuda.synchronize()
    assert int(recalled) == copied
    # every slot holds its page's tokens, at the positions the table gives, which the copy wrote beside them
    pos = slot_positions(table, page_size).cpu()
    present = pos >= 0
    idx = pos.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, d)
    got_k, got_v, got_pos = buf_k[:, :, lo:hi].cpu(), buf_v[:, :, lo:hi].cpu(), buf_pos[:, :, lo:hi].cpu()
    assert torch.equal(got_pos, pos)
    assert torch.equal(got_k[present], k.gather(2, idx)[present])
    assert torch.equal(got_v[present], v.gather(2, idx)[present])
    assert not got_k[~present].any() and not got_v[~present].any()
    assert not buf_k[:, :, :lo].any() and bool((buf_pos[:, :, :lo] == -1).all())  # the sink page is not written
    return got_k, got_v, got_pos, table, copied, link


def test_recall_cuda_matches_cpu(monkeypatch):
    calls = []
    original = recall.kernels.recall_pages

    def recorded(*args):
        calls.append(args[0].is_pinned())  # the source: the host pool itself
        return original(*args)

    monkeypatch.setattr(recall.kernels, "recall_pages", recorded)
    monkeypatch.setenv("KVTIER_KERNELS", "auto")
    cpu_k, cpu_v, cpu_pos, cpu_table, cpu_copied, cpu_link = recall_run("cpu")
    assert calls == []  # the CPU's C kernel (or reference)
    cuda_k, cuda_v, cuda_pos, cuda_table, cuda_copied, cuda_link = recall_run("cuda")
    assert calls == [True] * 6  # the kernel, reading the pinned host pool in place
    assert torch.equal(cuda_table.slot_page.cpu(), cpu_table.slot_page)
    assert torch.equal(cuda_table.page_slot.cpu(), cpu_table.page_slot)
    assert torch.equal(cuda_k, cpu_k)
    assert torch.equal(cuda_v, cpu_v)
    assert torch.equal(cuda_pos, cpu_pos)
    assert cuda_copied == cpu_copied > 0
    assert cuda_link.counters() == cpu_link.counters()


RETRIEVAL = [
    ("freekv", dict(budget=32, page_size=4, sink=8, window=8)),
    ("freekv", dict(budget=32, page_size=4, sink=8, window=8, speculative=False)),
    ("freekv", dict(budget=32, page_size=4, sink=8, window=8, scorer="lowbit", score_group=8, rest="lowbit")),
    ("specache", dict(group_size=8, residual=8, topk=4)),
    ("specache", dict(group_size=8, residual=8, topk=4, speculative=False)),
]


@pytest.mark.parametrize("method, options", RETRIEVAL)
def test_retrieval_decode_on_cuda_through_the_kernels_matches_torch(monkeypatch, method, options):
    """A whole batched, left-padded decode on the GPU: kernels (the default there) give the PyTorch path's tokens;
    pages are recalled from the pinned host pool into device buffers."""
    monkeypatch.setenv("KVTIER_KERNELS", "torch")
    expected, _, _ = run_generate("cuda", method, max_new_tokens=16, length=45, **options)
    monkeypatch.setenv("KVTIER_KERNELS", "auto")
    out, stats, cache = run_generate("cuda", method, max_new_tokens=16, length=45, **options)
    assert out.device.type == "cuda" and out.shape == (2, 61)
    assert torch.equal(out, expected)
    assert stats["recalled_pages"] > 0 and stats["h2d_bytes"] > 0
    engine = cache.method
    layers = [st for st in engine.layers if st is not None]
    assert layers and all(st.k.is_cuda and st.table.slot_page.is_cuda for st in layers)
    assert all(p.is_pinned() for p in engine.pool.pages if p is not None)


@pytest.mark.parametrize("method, options", [
    ("freekv", dict(budget=256, page_size=4, sink=8, window=8)),
    ("freekv", dict(budget=256, page_size=4, sink=8, window=8, scorer="lowbit", score_group=8, rest="lowbit")),
    ("specache", dict(group_size=8, residual=8, topk=512)),
])
def test_retrieval_covering_the_context_is_identical_to_full_on_cuda(method, options):
    full, _, _ = run_generate("cuda", "full", max_new_tokens=16, length=45)
    out, stats, _ = run_generate("cuda", method, max_new_tokens=16, length=45, **options)
    assert torch.equal(out, full)
    assert stats["recalled_pages"] > 0, "pages left the window and had to be recalled"
