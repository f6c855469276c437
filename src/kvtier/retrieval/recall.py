"""Recall: which page sits in which device slot (the page table), the dense plan of what to copy, and the copy.

The plan has one entry per wanted page, `[b, h_kv, k]`: the page to copy and the slot it goes to, both -1
where the wanted page is already resident. Computing it, applying it to the table and copying are each one
kernel of fixed shape on a GPU (Triton) and on a CPU (C), so a decode step never reads a device value on the
host; the PyTorch references below define what the kernels do.

The table keeps both directions, `slot_page` and its inverse `page_slot`, so finding which wanted pages are
resident costs one lookup per page rather than a comparison with every slot. The copy moves rows of one KV
head's page from the host pool and writes the rows' token positions beside them: on CUDA the kernel reads the
pinned host pool directly and skips -1 entries; the reference sends them from a null row to a trash page that
attention never reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from ..kernels import native


class PageTable:
    """`slot_page[s, h, j]`: the page held by slot j of sequence s, KV head h (-1: empty); `page_slot[s, h, p]`:
    the slot holding page p (-1: none), for `pages` pages and one more column that absorbs -1 entries. The map
    has an entry per page of the reserved length (per token where pages are single tokens), so it is int32."""

    def __init__(self, batch: int, num_kv_heads: int, slots: int, pages: int, device):
        self.slot_page = torch.full((batch, num_kv_heads, slots), -1, dtype=torch.long, device=device)
        self.page_slot = torch.full((batch, num_kv_heads, pages + 1), -1, dtype=torch.int32, device=device)

    @property
    def slots(self) -> int:
        return self.slot_page.shape[-1]

    @property
    def pages(self) -> int:
        return self.page_slot.shape[-1] - 1

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.slot_page, self.page_slot

    def widen(self, slots: int) -> None:
        """`slots` slots per (sequence, KV head), the new ones empty (the layer's buffer grew with them)."""
        if slots > self.slots:
            new = self.slot_page.new_full((*self.slot_page.shape[:2], slots), -1)
            new[..., :self.slots] = self.slot_page
            self.slot_page = new

    def grow(self, pages: int) -> None:
        """Room for page ids below `pages` (the capacity grew)."""
        if pages > self.pages:
            new = self.page_slot.new_full((*self.page_slot.shape[:2], pages + 1), -1)
            new[..., :self.pages] = self.page_slot[..., :self.pages]
            self.page_slot = new

    def plan(self, wanted: torch.Tensor, page_scores: torch.Tensor | None = None,
             recalled: torch.Tensor | None = None):
        """wanted [b, h, k] distinct page ids per row (k <= slots); page_scores [b, h, >= pages] in [0, 1] or None;
        recalled: a device counter the number of pages to copy is added to, or None.

        Missing pages take, in order, the empty slots, then the resident pages with the lowest score that are
        not wanted; pages already resident stay where they are. Updates the table and returns (pages, slots),
        both [b, h, k]: copy page pages[..., i] into slot slots[..., i]; the misses come first, in wanted order,
        and both are -1 from the first hit on.
        """
        k = wanted.shape[-1]
        if k > self.slots:
            raise ValueError(f"asked for {k} pages but the device pool has {self.slots} slots")
        if wanted.shape[:2] != self.slot_page.shape[:2]:
            raise ValueError(f"wanted pages {tuple(wanted.shape)} do not match the table {tuple(self.slot_page.shape)}")
        if kernels.enabled(wanted):
            return kernels.plan_pages(self.slot_page, self.page_slot, wanted, page_scores, recalled)
        if kernels.native_enabled(wanted):
            out = native.plan_pages(self.slot_page, self.page_slot, wanted, page_scores, recalled)
            if out is not None:
                return out
        return plan_pages_reference(self.slot_page, self.page_slot, wanted, page_scores, recalled)


def plan_workspace_bytes(batch: int, kv_heads: int, slots: int) -> int:
    """Device bytes one plan makes: its pages and slots (int64), and the GPU kernel's float32 eviction keys, a
    power of two of them per (sequence, KV head) row."""
    return batch * kv_heads * (2 * 8 * slots + 4 * max(2, 1 << (slots - 1).bit_length()))


def plan_pages_reference(slot_page: torch.Tensor, page_slot: torch.Tensor, wanted: torch.Tensor,
                         page_scores: torch.Tensor | None, recalled: torch.Tensor | None = None):
    """`PageTable.plan` on the table's two tensors, updated in place (see there)."""
    resident = slot_page
    k, n_slots, dump = wanted.shape[-1], resident.shape[-1], page_slot.shape[-1] - 1
    held = page_slot.gather(-1, wanted).long()  # the slot of each wanted page, -1 where it is missing
    hit = held >= 0
    if page_scores is None:
        score = torch.zeros(resident.shape, device=resident.device)
    else:  # scores are probabilities: NaN and infinities must not reach the -1 / 2 keys below
        score = page_scores.gather(-1, resident.clamp(min=0)).float().nan_to_num_(0.0, 1.0, 0.0)
    wanted_slot = torch.zeros((*resident.shape[:2], n_slots + 1), dtype=torch.bool, device=resident.device)
    wanted_slot.scatter_(-1, torch.where(hit, held, n_slots), True)
    # eviction order in one key: empty slots (-1) first, then unwanted residents by score, wanted ones (2) never
    score = score.masked_fill_(resident < 0, -1.0).masked_fill_(wanted_slot[..., :n_slots], 2.0)
    cheapest = score.sort(dim=-1, stable=True).indices[..., :k]
    hit_sorted, order = hit.sort(dim=-1, stable=True)  # misses first, in wanted order
    copy = ~hit_sorted
    pages = torch.where(copy, wanted.gather(-1, order), -1)
    old = resident.gather(-1, cheapest)
    page_slot.scatter_(-1, torch.where(copy & (old >= 0), old, dump), -1)
    page_slot.scatter_(-1, torch.where(copy, pages, dump), torch.where(copy, cheapest, -1).to(page_slot.dtype))
    slot_page.scatter_(-1, cheapest, torch.where(copy, pages, old))
    if recalled is not None:
        recalled.add_(copy.sum())
    return pages, torch.where(copy, cheapest, -1)


@dataclass(frozen=True)
class SlotRows:
    """The device buffer of a retrieval layer as rows of one page (keys, values and token positions alike):
    `heads` (sequence, KV head) pairs of `rows_per_head` rows each, slot j at row `first_slot + j` of its pair's,
    the last row of each pair a trash page (the reference copies skipped entries there). The host pool's row
    of page p of pair r is p * heads + r (`store.HostPool`'s layout)."""

    heads: int
    rows_per_head: int
    first_slot: int


def recall_pages(host: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                 pages: torch.Tensor, slots: torch.Tensor, rows: SlotRows, heads: torch.Tensor | None = None,
                 staging: torch.Tensor | None = None) -> None:
    """Copy a plan's pages from the host pool into their slots, and write their tokens' positions.

    host [pool rows, 2, P*d] (a page's keys then values); keys, values [buffer rows, P*d] and positions
    [buffer rows, P] (int64), in `rows`' layout; pages, slots [b, h, k] (a plan); heads [b, h] bool or None:
    copy only the entries of these (sequence, KV head) pairs. Entries with page -1 copy nothing.
    staging: the reference's [b*h*k, 2, P*d] buffer for gathered rows, reused from step to step (fresh memory
    costs page faults); None where a kernel copies (`staging_needed`)."""
    if kernels.enabled(keys):
        kernels.recall_pages(host, keys, values, positions, pages, slots, rows, heads)
    elif not (native_copies(host, keys) and native.recall_pages(host, keys, values, positions, pages, slots, rows,
                                                                heads)):
        recall_pages_reference(host, keys, values, positions, pages, slots, rows, heads, staging)


def recall_pages_reference(host, keys, values, positions, pages, slots, rows: SlotRows, heads=None,
                           staging=None) -> None:
    if heads is not None:
        pages = torch.where(heads.unsqueeze(-1), pages, -1)
    n, page_size = rows.heads, positions.shape[-1]
    pages, slots = pages.reshape(n, -1), slots.reshape(n, -1)
    pair = torch.arange(n, device=pages.device).unsqueeze(1)
    copy = pages >= 0
    src = torch.where(copy, pages * n + pair, 0).view(-1)
    first_row = pair * rows.rows_per_head
    dst = torch.where(copy, first_row + rows.first_slot + slots, first_row + rows.rows_per_head - 1).view(-1)
    tokens = pages.unsqueeze(-1) * page_size + torch.arange(page_size, device=pages.device)
    positions.index_copy_(0, dst, tokens.masked_fill_(~copy.unsqueeze(-1), -1).view(-1, page_size))
    if staging is not None and host.device == src.device:
        picked = torch.index_select(host, 0, src, out=staging)
    else:
        picked = host.index_select(0, src.to(host.device)).to(keys.device)  # (off CPU: a sync, without kernels)
    keys.index_copy_(0, dst, picked[:, 0])
    values.index_copy_(0, dst, picked[:, 1])


def staging_needed(host: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether `recall_pages` runs the reference with a staging buffer (no kernel copies, host and buffer in one
    memory)."""
    return not (kernels.enabled(keys) or host.device != keys.device or native_copies(host, keys))


def native_copies(src: torch.Tensor, dst: torch.Tensor) -> bool:
    """Whether the C kernel copies (both sides in CPU memory): then no staging buffer is needed."""
    return src.device == dst.device and kernels.native_enabled(dst)
