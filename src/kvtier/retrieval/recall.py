"""Recall: which page sits in which device slot (the page table), the dense plan of what to copy, and the copy.

The plan has one entry per wanted page, `[b, h_kv, k]`: the page to copy and the slot it goes to, page -1
where the wanted page is already resident. Computing it, applying it to the table and copying are tensor ops
of fixed shape, so a decode step never reads a device value on the host. The copy moves rows of one KV head's
page: on CUDA a kernel reads the pinned host pool directly and skips -1 entries; the PyTorch reference sends
them from a null row to a trash page that attention never reads, so both touch only what they must in memory
that matters (the null row and the trash page stay in cache).
"""

from __future__ import annotations

import torch

from .. import kernels
from ..kernels import native


class PageTable:
    """`slot_page[s, h, j]`: the page held by slot j of sequence s, KV head h (-1: empty)."""

    def __init__(self, batch: int, num_kv_heads: int, slots: int, device):
        self.slot_page = torch.full((batch, num_kv_heads, slots), -1, dtype=torch.long, device=device)

    @property
    def slots(self) -> int:
        return self.slot_page.shape[-1]

    def plan(self, wanted: torch.Tensor, page_scores: torch.Tensor | None = None):
        """wanted [b, h, k] distinct page ids per row (k <= slots); page_scores [b, h, pages] in [0, 1] or None.

        Missing pages take, in order, the empty slots, then the resident pages with the lowest score that are
        not wanted; pages already resident stay where they are. Updates the table and returns (pages, slots),
        both [b, h, k]: copy page pages[..., i] into slot slots[..., i], nothing where pages is -1.
        """
        k = wanted.shape[-1]
        if k > self.slots:
            raise ValueError(f"asked for {k} pages but the device pool has {self.slots} slots")
        resident = self.slot_page
        same = wanted.unsqueeze(-1) == resident.unsqueeze(-2)  # [b, h, k, slots]
        if page_scores is None:
            score = torch.zeros(resident.shape, device=resident.device)
        else:  # scores are probabilities: NaN and infinities must not reach the -1 / 2 keys below
            score = page_scores.gather(-1, resident.clamp(min=0)).nan_to_num_(0.0, 1.0, 0.0)
        # eviction order in one key: empty slots (-1) first, then unwanted residents by score, wanted ones (2) never
        score = score.masked_fill_(resident < 0, -1.0).masked_fill_(same.any(-2), 2.0)
        slots = score.sort(dim=-1, stable=True).indices[..., :k]
        hit, order = same.any(-1).sort(dim=-1, stable=True)  # misses first, in wanted order
        pages = torch.where(hit, -1, wanted.gather(-1, order))
        self.slot_page.scatter_(-1, slots, torch.where(hit, resident.gather(-1, slots), pages))
        return pages, slots

    def positions(self, page_size: int) -> torch.Tensor:
        """Token position of every slot token [b, h, slots*P] (-1 where the slot is empty)."""
        pages = self.slot_page.unsqueeze(-1)
        pos = pages * page_size + torch.arange(page_size, device=pages.device)
        return pos.masked_fill_(pages < 0, -1).flatten(-2)

    def resident(self, pages: int) -> torch.Tensor:
        """Bool [b, h, pages + 1]: which pages sit in some slot (the last column takes the empty slots)."""
        b, h, _ = self.slot_page.shape
        out = torch.zeros((b, h, pages + 1), dtype=torch.bool, device=self.slot_page.device)
        return out.scatter_(-1, self.slot_page.where(self.slot_page >= 0, pages), True)


def copy_rows_reference(src: torch.Tensor, dst_k: torch.Tensor, dst_v: torch.Tensor, src_rows: torch.Tensor,
                        dst_rows: torch.Tensor, staging: torch.Tensor | None = None) -> None:
    """src [rows, 2, E] (key row then value row); dst_k, dst_v [rows', E]: dst[dst_rows[i]] = src[src_rows[i]],
    nothing where src_rows[i] is -1 (the reference copies a null row to the trash row dst_rows[i] names).
    staging: a [n, 2, E] buffer for the gathered rows, reused from step to step (fresh memory costs page faults)."""
    rows = src_rows.clamp(min=0)
    if staging is not None and src.device == rows.device:
        picked = torch.index_select(src, 0, rows, out=staging)
    else:
        picked = src.index_select(0, rows.to(src.device)).to(dst_k.device)  # (off CPU: a sync, without kernels)
    dst_k.index_copy_(0, dst_rows, picked[:, 0])
    dst_v.index_copy_(0, dst_rows, picked[:, 1])


def copy_rows(src, dst_k, dst_v, src_rows, dst_rows, staging=None) -> None:
    if kernels.enabled(dst_k):
        kernels.copy_rows(src, dst_k, dst_v, src_rows, dst_rows)
    elif not (native_copies(src, dst_k) and native.copy_rows(src, dst_k, dst_v, src_rows, dst_rows)):
        copy_rows_reference(src, dst_k, dst_v, src_rows, dst_rows, staging)


def native_copies(src: torch.Tensor, dst: torch.Tensor) -> bool:
    """Whether the C kernel copies (both sides in CPU memory): then no staging buffer is needed."""
    return src.device == dst.device and kernels.native_enabled(dst)
