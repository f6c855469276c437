"""Where KV lives: the paged host pool, the device pool of recalled pages, page tables, and the device ledger.

Host layout, per layer: [page, batch, kv_head, 2 (key, value), page_size, head_dim]. One KV head's page of
one sequence is one contiguous block (keys then values), so recalling it is one copy; and the first n pages
of a layer are one contiguous block, so streaming a whole layer (the offload baseline) is one copy too.
The store knows nothing of methods or of transformers; it moves data only through a `Link`.
"""

from __future__ import annotations

import torch

from .link import Link, nbytes


def to_pages(k: torch.Tensor, v: torch.Tensor, page_size: int) -> torch.Tensor:
    """[b, h, t, d] keys and values (t a multiple of page_size) -> contiguous [t/P, b, h, 2, P, d] pages."""
    b, h, t, d = k.shape
    if t % page_size:
        raise ValueError(f"{t} tokens are not a whole number of {page_size}-token pages")
    kv = torch.stack((k, v), dim=2).view(b, h, 2, t // page_size, page_size, d)
    return kv.permute(3, 0, 1, 2, 4, 5).contiguous()


def from_pages(pages: torch.Tensor, tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, b, h, 2, P, d] pages -> keys and values [b, h, n*P, d] (first `tokens` of them)."""
    n, b, h, _, p, d = pages.shape
    kv = pages.permute(1, 2, 3, 0, 4, 5).reshape(b, h, 2, n * p, d)
    if tokens is not None:
        kv = kv[:, :, :, :tokens]
    return kv[:, :, 0], kv[:, :, 1]


class DeviceLedger:
    """Exact bytes of KV-related state held on the device: every buffer a method keeps is registered here."""

    def __init__(self):
        self.held: dict[str, int] = {}
        self.current = 0
        self.peak = 0

    def hold(self, name: str, *tensors: torch.Tensor) -> None:
        self.current -= self.held.get(name, 0)
        self.held[name] = sum(nbytes(t) for t in tensors)
        self.current += self.held[name]
        self.peak = max(self.peak, self.current)

    def release(self, name: str) -> None:
        self.current -= self.held.pop(name, 0)


class HostPool:
    """All full-precision KV of one model in host memory, in pages; pinned when the device is CUDA.

    Pages are written whole (a method keeps a page's tokens on the device until it fills). Capacity grows
    by reallocation with a 25% margin; `reserve` lets a caller that knows the final length avoid that.
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, page_size: int,
                 dtype: torch.dtype, link: Link):
        self.shape_tail = (batch, num_kv_heads, 2, page_size, head_dim)
        self.page_size = page_size
        self.dtype = dtype
        self.link = link
        self.pin = link.cuda
        self.pages: list[torch.Tensor | None] = [None] * num_layers
        self.num_pages = [0] * num_layers

    @property
    def dtype_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of one layer (every sequence, every KV head)."""
        n = 1
        for s in self.shape_tail:
            n *= s
        return n * self.dtype_bytes

    def reserve(self, layer: int, pages: int) -> None:
        buf = self.pages[layer]
        if buf is not None and buf.shape[0] >= pages:
            return
        new = torch.empty((pages, *self.shape_tail), dtype=self.dtype, pin_memory=self.pin)
        if buf is not None and self.num_pages[layer]:
            self.link.synchronize()  # pending write-backs into the old buffer must land before we copy it
            new[: self.num_pages[layer]].copy_(buf[: self.num_pages[layer]])
        self.pages[layer] = new

    def write(self, layer: int, pages: torch.Tensor) -> None:
        """Append whole pages [n, b, h, 2, P, d] (device tensor) to a layer."""
        if tuple(pages.shape[1:]) != self.shape_tail:
            raise ValueError(f"page block {tuple(pages.shape)} does not match the pool's {self.shape_tail}")
        start = self.num_pages[layer]
        end = start + pages.shape[0]
        capacity = 0 if self.pages[layer] is None else self.pages[layer].shape[0]
        if end > capacity:
            self.reserve(layer, max(end, capacity + capacity // 4 + 16))
        self.link.d2h(self.pages[layer][start:end], pages)
        self.num_pages[layer] = end

    def layer_block(self, layer: int) -> torch.Tensor:
        """The layer's written pages as one contiguous host block [n, b, h, 2, P, d]."""
        return self.pages[layer][: self.num_pages[layer]]

    def head_page(self, layer: int, page: int, seq: int, kv_head: int) -> torch.Tensor:
        """One KV head's page of one sequence: a contiguous [2, P, d] block."""
        return self.pages[layer][page, seq, kv_head]

    def tokens(self, layer: int) -> int:
        return self.num_pages[layer] * self.page_size

    def used_bytes(self) -> int:
        return sum(self.num_pages) * self.page_bytes

    def held_bytes(self) -> int:
        return sum(nbytes(p) for p in self.pages if p is not None)


class PageTable:
    """Which host page sits in which device slot, per (sequence, KV head): the bookkeeping of recall.

    `slot_page[s, h, j]` is the page held by slot j (-1 for empty). `plan(wanted, scores)` decides, for each
    wanted page that is not resident, which slot it overwrites: the empty slots first, then the resident
    pages with the lowest score that are not wanted. Pages already resident are never copied again.
    """

    def __init__(self, batch: int, num_kv_heads: int, slots: int, device: torch.device):
        self.slot_page = torch.full((batch, num_kv_heads, slots), -1, dtype=torch.long, device=device)

    @property
    def slots(self) -> int:
        return self.slot_page.shape[-1]

    def plan(self, wanted: torch.Tensor, page_scores: torch.Tensor | None = None):
        """wanted: [b, h, k] page ids (k <= slots, distinct per row). page_scores: [b, h, n_pages] or None.

        Returns (seq, head, slot, page) index tensors of the copies to make, and applies them to the table.
        """
        b, h, k = wanted.shape
        if k > self.slots:
            raise ValueError(f"asked for {k} pages but the device pool has {self.slots} slots")
        resident = self.slot_page
        # wanted_here[s, h, i]: is wanted page i already in some slot?
        hit = (wanted.unsqueeze(-1) == resident.unsqueeze(-2)).any(-1)
        # keep[s, h, j]: slot j holds a wanted page and must not be evicted
        keep = (resident.unsqueeze(-1) == wanted.unsqueeze(-2)).any(-1) & (resident >= 0)
        occupied = resident >= 0
        if page_scores is not None:
            # NaN scores rank lowest; the ordering below never lets a score outrank `keep`
            score = page_scores.float().gather(-1, resident.clamp(min=0)).nan_to_num(nan=float("-inf"))
        else:
            score = torch.zeros(resident.shape, device=resident.device)
        # Victim order, lexicographic: slots not kept before kept ones, empty before occupied, then lowest
        # score first (stable sorts from the least to the most significant key). Missing pages take victims
        # in that order.
        victim_order = score.argsort(dim=-1, stable=True)
        for key in (occupied, keep):
            victim_order = victim_order.gather(
                -1, key.gather(-1, victim_order).to(torch.int8).argsort(dim=-1, stable=True))
        missing_order = (~hit).to(torch.int8).argsort(dim=-1, descending=True, stable=True)
        n_missing = (~hit).sum(-1)  # [b, h]
        rank = torch.arange(k, device=wanted.device).expand(b, h, k)
        take = rank < n_missing.unsqueeze(-1)
        pages = wanted.gather(-1, missing_order)
        slots = victim_order[..., :k]
        seq_idx, head_idx, rank_idx = take.nonzero(as_tuple=True)
        slot_idx = slots[seq_idx, head_idx, rank_idx]
        page_idx = pages[seq_idx, head_idx, rank_idx]
        self.slot_page[seq_idx, head_idx, slot_idx] = page_idx
        return seq_idx, head_idx, slot_idx, page_idx


class DevicePool:
    """Device-resident KV of one layer for the retrieval methods: sink, recalled-page slots, recent window.

    Token-major layout per region, [b, h, tokens, d], the layout decode attention reads best. The slots
    region holds `slots` pages per (sequence, KV head); which page each holds is in `table`.
    """

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, page_size: int, slots: int,
                 dtype: torch.dtype, device: torch.device, staging: "RecallStaging | None" = None):
        self.page_size = page_size
        self.staging = staging or RecallStaging(page_size, head_dim, dtype, device)
        shape = (batch, num_kv_heads, slots * page_size, head_dim)
        self.slot_k = torch.zeros(shape, dtype=dtype, device=device)
        self.slot_v = torch.zeros(shape, dtype=dtype, device=device)
        self.table = PageTable(batch, num_kv_heads, slots, device)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The device tensors this pool holds (slots and page table; staging is counted by its owner)."""
        return self.slot_k, self.slot_v, self.table.slot_page

    def recall(self, host: HostPool, layer: int, link: Link, seq, head, slot, page) -> list:
        """Copy the planned (seq, head, slot, page) head-pages from the host pool into their slots.

        Double-buffered by KV head: head j's pages are gathered on the host into staging buffer j % 2,
        copied in one transfer on lane j % 2, and scattered into their slots on that same lane, so head j's
        copy overlaps head j-1's scatter. Each lane first waits for the compute work already queued (see
        Link.h2d), so a slot that a launched attention still reads is never overwritten under it.
        Returns the events the compute stream must wait on before reading the slots (empty on CPU).
        """
        if len(seq) == 0:
            return []
        batch, heads = host.shape_tail[:2]
        p, d = self.page_size, self.slot_k.shape[-1]
        flat = host.pages[layer].view(-1, 2, p, d)
        seq_h, head_h, page_h = seq.cpu(), head.cpu(), page.cpu()
        host_rows = (page_h * batch + seq_h) * heads + head_h
        events = []
        for j in torch.unique(head_h).tolist():
            lane = j % 2
            on_host = head_h == j
            count = int(on_host.sum())
            src = self.staging.host_buffer(lane, count, flat.dtype, link)
            torch.index_select(flat, 0, host_rows[on_host], out=src)
            dst = self.staging.device_buffer(lane, count)
            self.staging.host_busy[lane] = link.h2d(dst, src, lane=lane)
            on_dev = head == j
            offsets = (slot[on_dev] * p).unsqueeze(-1) + torch.arange(p, device=slot.device)
            rows = seq[on_dev].unsqueeze(-1)
            with link.on_lane(lane):
                self.slot_k[rows, j, offsets] = dst[:, 0]
                self.slot_v[rows, j, offsets] = dst[:, 1]
                events.append(link.record(lane))
        return [e for e in events if e is not None]

    def slot_positions(self) -> torch.Tensor:
        """Token position of every slot token [b, h, slots*P] (-1 where the slot is empty)."""
        pages = self.table.slot_page
        p = self.page_size
        pos = pages.unsqueeze(-1) * p + torch.arange(p, device=pages.device)
        return torch.where(pages.unsqueeze(-1) >= 0, pos, -1).flatten(-2)


class RecallStaging:
    """The two host and two device staging buffers of page recall, one pair per copy lane.

    One instance can serve every layer: work on a lane runs in order, so a buffer is only refilled after
    the scatter that read it; a host buffer is refilled only once its previous copy has completed.
    """

    def __init__(self, page_size: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.page_shape = (2, page_size, head_dim)
        self.dtype, self.device = dtype, device
        self.host_buffers: list[torch.Tensor | None] = [None, None]
        self.device_buffers: list[torch.Tensor | None] = [None, None]
        self.host_busy = [None, None]

    def host_buffer(self, lane: int, count: int, dtype: torch.dtype, link: Link) -> torch.Tensor:
        busy = self.host_busy[lane]
        if busy is not None:
            busy.synchronize()
        buf = self.host_buffers[lane]
        if buf is None or buf.shape[0] < count or buf.dtype != dtype:
            buf = torch.empty((count, *self.page_shape), dtype=dtype, pin_memory=link.cuda)
            self.host_buffers[lane] = buf
        return buf[:count]

    def device_buffer(self, lane: int, count: int) -> torch.Tensor:
        buf = self.device_buffers[lane]
        if buf is None or buf.shape[0] < count:
            buf = torch.empty((count, *self.page_shape), dtype=self.dtype, device=self.device)
            self.device_buffers[lane] = buf
        return buf[:count]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(b for b in self.device_buffers if b is not None)
