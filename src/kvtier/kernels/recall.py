"""Recall on the GPU: the page table's dense plan, and the copy of the planned pages from the host pool.

`plan_pages` runs one program per (sequence, KV head) row: which wanted pages are resident (one lookup each in
the table's inverse map), which slots the misses take (a bitonic sort of the slots' eviction keys), and the
table update, all on the device. `recall_pages` copies rows of one KV head's page (keys then values) from a
`store.HostPool` layer viewed as `[rows, 2, P*d]` (the pinned host tensor itself, read over the link: zero-copy,
no staging buffer) into the slots, and writes the rows' token positions. Grids are fixed by the plan's size;
entries of -1 do nothing, so a plan needs no host-side compaction. The references are in `retrieval.recall`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..retrieval.recall import plan_pages_reference, recall_pages_reference  # noqa: F401  (what these equal)


@triton.jit
def _plan_kernel(slot_page_ptr, page_slot_ptr, wanted_ptr, scores_ptr, pages_ptr, slots_ptr, scratch_ptr,
                 recalled_ptr, n_slots, k, map_width, ss_r,
                 HAS_SCORES: tl.constexpr, HAS_COUNTER: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_S)
    i = tl.arange(0, BLOCK_K)
    in_table = j < n_slots
    in_plan = i < k
    resident = tl.load(slot_page_ptr + r * n_slots + j, mask=in_table, other=-1)
    want = tl.load(wanted_ptr + r * k + i, mask=in_plan, other=0)
    held = tl.load(page_slot_ptr + r * map_width + want, mask=in_plan, other=-1).to(tl.int64)
    hit = held >= 0
    # eviction keys: empty slots -1, unwanted residents their score (NaN, inf cleaned), wanted ones 2 (never)
    if HAS_SCORES:
        s = tl.load(scores_ptr + r * ss_r + resident, mask=resident >= 0, other=0.0).to(tl.float32)
        s = tl.where(s != s, 0.0, s)
        s = tl.where(s == float("inf"), 1.0, tl.where(s == float("-inf"), 0.0, s))
    else:
        s = tl.zeros([BLOCK_S], tl.float32)
    s = tl.where(resident < 0, -1.0, s) + 0.0  # + 0.0: -0.0 keys as 0.0, as the reference's sort compares them
    scratch = scratch_ptr + r * BLOCK_S
    tl.store(scratch + j, s)
    tl.debug_barrier()
    tl.store(scratch + held, 2.0, mask=hit)  # a wanted page's slot, found through the inverse map
    tl.debug_barrier()
    s = tl.load(scratch + j)
    # one int64 key per slot, (score, slot) in lexicographic order: the float's bits made order-preserving as a
    # signed int32 in the high word, the slot in the low word, so ties go to the lower slot as a stable sort
    bits = s.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
    ordered = tl.where(in_table, ordered, 0x7FFFFFFF)
    order = tl.sort(ordered * 4294967296 + j)
    cheapest = order & 0xFFFFFFFF
    miss = in_plan & ~hit
    kept = in_plan & hit
    misses = tl.sum(miss.to(tl.int32), axis=0)
    # the misses first, in wanted order; then -1 for each hit
    tl.store(pages_ptr + r * k + tl.cumsum(miss.to(tl.int32), axis=0) - 1, want, mask=miss)
    tl.store(pages_ptr + r * k + misses + tl.cumsum(kept.to(tl.int32), axis=0) - 1, -1, mask=kept)
    takes = j < misses
    tl.store(slots_ptr + r * k + j, tl.where(takes, cheapest, -1), mask=j < k)
    tl.debug_barrier()
    new_page = tl.load(pages_ptr + r * k + j, mask=takes, other=-1)
    old = tl.load(slot_page_ptr + r * n_slots + cheapest, mask=takes, other=-1)
    tl.store(page_slot_ptr + r * map_width + old, -1, mask=takes & (old >= 0))  # evicted pages and new ones differ
    tl.store(page_slot_ptr + r * map_width + new_page, cheapest.to(tl.int32), mask=takes)
    tl.store(slot_page_ptr + r * n_slots + cheapest, new_page, mask=takes)
    if HAS_COUNTER:
        tl.atomic_add(recalled_ptr, misses.to(tl.int64))


def plan_pages(slot_page: torch.Tensor, page_slot: torch.Tensor, wanted: torch.Tensor,
               page_scores: torch.Tensor | None, recalled: torch.Tensor | None):
    """`retrieval.recall.plan_pages_reference` in one launch: the table (slot_page [b, h, slots] int64, page_slot
    [b, h, pages + 1] int32, contiguous) updated in place, (pages, slots) [b, h, k] returned."""
    b, h, k = wanted.shape
    n_slots, width = slot_page.shape[-1], page_slot.shape[-1]
    if not (slot_page.is_contiguous() and page_slot.is_contiguous()):
        raise ValueError("the page table's tensors must be contiguous")
    wanted = wanted.to(torch.int64).contiguous()
    pages, slots = torch.empty((2, b, h, k), dtype=torch.long, device=wanted.device).unbind()
    if k == 0 or b * h == 0:
        return pages, slots
    if page_scores is not None and (page_scores.stride(-1) != 1 or page_scores.stride(0) !=
                                    page_scores.shape[1] * page_scores.stride(1)):
        page_scores = page_scores.contiguous()
    block_s = max(2, triton.next_power_of_2(n_slots))
    scratch = torch.empty((b * h, block_s), dtype=torch.float32, device=wanted.device)
    _plan_kernel[(b * h,)](slot_page, page_slot, wanted, page_scores if page_scores is not None else scratch,
                           pages, slots, scratch, recalled if recalled is not None else pages, n_slots, k, width,
                           page_scores.stride(1) if page_scores is not None else 0,
                           HAS_SCORES=page_scores is not None, HAS_COUNTER=recalled is not None,
                           BLOCK_S=block_s, BLOCK_K=max(2, triton.next_power_of_2(k)))
    return pages, slots


@triton.jit
def _recall_kernel(host_ptr, keys_ptr, values_ptr, positions_ptr, pages_ptr, slots_ptr, heads_ptr, pairs, k,
                   rows_per_pair, first_slot, page_size, row_elems, s_row, s_kv, sk_row, sv_row,
                   HAS_HEADS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    entry = tl.program_id(0)
    pair = entry // k
    page = tl.load(pages_ptr + entry)
    if HAS_HEADS:
        page = tl.where(tl.load(heads_ptr + pair) != 0, page, -1)
    slot = tl.load(slots_ptr + entry)
    dst = pair.to(tl.int64) * rows_per_pair + first_slot + slot
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = e < tl.where(page >= 0, row_elems, 0)  # a skipped entry masks every element
    src = host_ptr + (page * pairs + pair) * s_row + e
    tl.store(keys_ptr + dst * sk_row + e, tl.load(src, mask=ok), mask=ok)
    tl.store(values_ptr + dst * sv_row + e, tl.load(src + s_kv, mask=ok), mask=ok)
    t = tl.arange(0, BLOCK_P)
    written = tl.where((page >= 0) & (tl.program_id(1) == 0), page_size, 0)  # the first column block writes them
    tl.store(positions_ptr + dst * page_size + t, page * page_size + t, mask=t < written)


def recall_pages(host: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                 pages: torch.Tensor, slots: torch.Tensor, rows, heads: torch.Tensor | None) -> None:
    """`retrieval.recall.recall_pages_reference` in one launch, reading host (the pinned pool on CUDA) in place.
    Rows are not bounds-checked (that would sync)."""
    if host.dim() != 3 or host.shape[1] != 2 or host.stride(2) != 1:
        raise ValueError(f"source must be [rows, 2, E] with contiguous rows, got {tuple(host.shape)} {host.stride()}")
    if keys.stride(1) != 1 or values.stride(1) != 1 or not positions.is_contiguous():
        raise ValueError("destination rows must be contiguous")
    n, elems = pages.numel(), host.shape[2]
    if n == 0:
        return
    blk = min(4096, triton.next_power_of_2(elems))
    page_size = positions.shape[-1]
    held = None if heads is None else heads.contiguous().view(torch.uint8)
    _recall_kernel[(n, triton.cdiv(elems, blk))](
        host, keys, values, positions, pages.to(torch.int64).contiguous(), slots.to(torch.int64).contiguous(),
        held if held is not None else pages, rows.heads, pages.shape[-1], rows.rows_per_head, rows.first_slot,
        page_size, elems, host.stride(0), host.stride(1), keys.stride(0), values.stride(0),
        HAS_HEADS=held is not None, BLOCK=blk, BLOCK_P=max(2, triton.next_power_of_2(page_size)))
