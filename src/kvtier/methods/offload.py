"""`offload`: every key and value in host memory; each layer streamed in whole while the previous computes.

The FlexGen / Hugging Face offloading scheme, and the traffic baseline the other methods beat: every
decode step copies the whole cache host->device, one layer at a time, into two staging buffers used in
turn. While layer l attends over buffer A, layer l+1 is copied into buffer B; the last layer starts the
copy of layer 0 for the next step. New tokens are written back to the host pool as they arrive
(one-token pages, so a layer's history is always one contiguous host block). See docs/methods.md.
"""

from __future__ import annotations

import torch

from ..attention import causal_attention
from ..link import StagingPair
from ..store import HostPool, from_pages, to_pages
from .base import Method, register


@register
class Offload(Method):
    """All KV in the (pinned) host pool; device holds two layers' worth of staging. Exact."""

    name = "offload"
    exact = True
    defaults = {}

    def __init__(self, spec, **options):
        super().__init__(spec, **options)
        self.pool: HostPool | None = None
        self.staging = StagingPair(spec.device, spec.dtype, self.ledger)
        self.staged: dict[int, tuple[int, torch.Tensor, int, object]] = {}  # layer -> (buffer, block, tokens, event)
        self.fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reserved = 0

    def reserve(self, tokens: int) -> None:
        self.reserved = max(self.reserved, tokens)

    def _append(self, layer, k, v):
        if self.pool is None:
            s = self.spec
            self.pool = HostPool(s.num_layers, k.shape[0], s.num_kv_heads, s.head_dim, 1, s.dtype, self.link)
        if self.reserved:
            self.pool.reserve(layer, self.reserved)
            self.staging.reserve(self.reserved * self.pool.page_bytes // self.pool.dtype_bytes)
        self.fresh[layer] = (k, v)
        self.pool.write(layer, to_pages(k, v, 1))

    def _attend(self, layer, q, valid, scaling):
        k_new, v_new = self.fresh.pop(layer)
        past = self.lengths[layer] - k_new.shape[2]
        in_use = None
        if past:
            in_use, block = self._take_staged(layer, past)
            k_old, v_old = from_pages(block)
            k, v = torch.cat((k_old, k_new), dim=2), torch.cat((v_old, v_new), dim=2)
        else:
            k, v = k_new, v_new
        # Queue the next layer's copy before this layer's attention, so the two overlap.
        self._prefetch((layer + 1) % self.spec.num_layers, avoid=in_use)
        return causal_attention(q, k, v, scaling, valid, q_offset=past)

    def _prefetch(self, layer: int, avoid: int | None = None) -> None:
        tokens = self.pool.tokens(layer)
        if tokens == 0:
            return
        src = self.pool.layer_block(layer)
        index, flat = self.staging.take(src.numel(), avoid=avoid)
        block = flat.view(src.shape)
        event = self.link.h2d(block, src, lane=index)
        self.staged[layer] = (index, block, tokens, event)

    def _take_staged(self, layer: int, tokens: int) -> tuple[int, torch.Tensor]:
        staged = self.staged.pop(layer, None)
        if staged is None or staged[2] != tokens:
            # Not prefetched (first use, or the sequence changed under us): fetch now, on the critical path.
            self._prefetch(layer)
            staged = self.staged.pop(layer)
        index, block, _, event = staged
        self.link.wait(event)
        return index, block[:tokens]

    def host_bytes(self) -> int:
        return 0 if self.pool is None else self.pool.used_bytes()

    def method_stats(self) -> dict:
        return {"staging_buffers": 2}
