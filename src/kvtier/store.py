"""Where KV lives: the paged host pool, and the device ledger.

Host layout, per layer: [page, batch, kv_head, 2 (key, value), page_size, head_dim]. One KV head's page of
one sequence is one contiguous block (keys then values), so recalling it is one copy; and the first n pages
of a layer are one contiguous block, so streaming a whole layer (the offload baseline) is one copy too.
The store knows nothing of methods or of transformers; it moves data only through a `Link`. The device side of
retrieval (page table, recall plan, slots) is in `kvtier.retrieval`.
"""

from __future__ import annotations

import copy
import weakref

import torch

from .link import Link, nbytes
from .sizes import grown

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

    def hold_bytes(self, name: str, size: int) -> None:
        """Count `size` bytes under `name`: for transient buffers a step allocates and frees, held at their most."""
        self.current += size - self.held.get(name, 0)
        self.held[name] = size
        self.peak = max(self.peak, self.current)

    def release(self, name: str) -> None:
        self.current -= self.held.pop(name, 0)


class ForkShare:
    """The readers of one host buffer that forks share instead of copying (a `HostPool` layer, KVPR's inputs).

    A reader holds the buffer's first `held_rows(layer)` rows. Rows that some other reader holds are frozen:
    a reader appends in place only from a row no other reader holds, so the parent and its forks never see each
    other's new rows. A reader that would write over another's rows copies the buffer first (copy-on-write):
    when several live forks all go on, all but one copy. Readers that are gone (garbage) no longer count.
    """

    def __init__(self, *readers):
        self.readers = weakref.WeakSet(readers)

    def may_append(self, reader, layer: int, start: int) -> bool:
        return all(other.held_rows(layer) <= start for other in self.readers if other is not reader)

    @staticmethod
    def join(parent, parent_shares: list, child, child_shares: list, layer: int) -> None:
        """Make `child` a reader of `parent`'s buffer of `layer`; the lists are each reader's shares per layer."""
        share = parent_shares[layer] if parent_shares[layer] is not None else ForkShare(parent)
        share.readers.add(child)
        parent_shares[layer] = child_shares[layer] = share


class HostPool:
    """All full-precision KV of one model in host memory, in pages; pinned when the device is CUDA.

    Pages are written whole (a method keeps a page's tokens on the device until it fills). Capacity grows
    by reallocation with a 25% margin; `reserve` lets a caller that knows the final length avoid that.
    `fork()` makes a pool that reads the same pages without copying them (see `ForkShare`).
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
        self.shares: list[ForkShare | None] = [None] * num_layers  # per layer: who else reads its buffer

    def held_rows(self, layer: int) -> int:
        return self.num_pages[layer]

    def fork(self, link: Link) -> "HostPool":
        """A pool holding the same pages, sharing their memory, that appends on its own through `link`."""
        self.link.synchronize()  # write-backs in flight must land before another pool reads the pages
        twin = copy.copy(self)
        twin.link, twin.pin = link, link.cuda
        twin.pages, twin.num_pages = list(self.pages), list(self.num_pages)
        twin.shares = [None] * len(self.pages)
        for layer, buf in enumerate(self.pages):
            if buf is not None:
                ForkShare.join(self, self.shares, twin, twin.shares, layer)
        return twin

    @property
    def dtype_bytes(self) -> int:
        return self.dtype.itemsize

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
        self._reallocate(layer, pages)

    def _reallocate(self, layer: int, pages: int) -> None:
        buf = self.pages[layer]
        new = torch.empty((pages, *self.shape_tail), dtype=self.dtype, pin_memory=self.pin)
        if buf is not None and self.num_pages[layer]:
            self.link.synchronize()  # pending write-backs into the old buffer must land before we copy it
            new[: self.num_pages[layer]].copy_(buf[: self.num_pages[layer]])
        self.pages[layer] = new
        if self.shares[layer] is not None:  # the buffer is this pool's own now
            self.shares[layer].readers.discard(self)
            self.shares[layer] = None

    def write(self, layer: int, pages: torch.Tensor) -> None:
        """Append whole pages [n, b, h, 2, P, d] (device tensor) to a layer."""
        if tuple(pages.shape[1:]) != self.shape_tail:
            raise ValueError(f"page block {tuple(pages.shape)} does not match the pool's {self.shape_tail}")
        start = self.num_pages[layer]
        end = start + pages.shape[0]
        capacity = 0 if self.pages[layer] is None else self.pages[layer].shape[0]
        if end > capacity:
            self.reserve(layer, grown(end * self.page_size, unit=self.page_size) // self.page_size)
        elif self.shares[layer] is not None and not self.shares[layer].may_append(self, layer, start):
            self._reallocate(layer, capacity)  # a fork (or the parent) holds these rows: copy on write
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
