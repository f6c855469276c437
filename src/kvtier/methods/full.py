"""`full`: every key and value on the device. The reference every other method is measured against."""

from __future__ import annotations

import torch

from ..attention import causal_attention
from ..sizes import grown
from .base import Method, register


@register
class Full(Method):
    """All KV on the device, token-major [b, h_kv, tokens, d] per layer; nothing crosses the link.

    Exact. Buffers are sized once to the length given by `reserve`, else grow by `store.grown`.
    """

    name = "full"
    exact = True
    defaults = {}

    def __init__(self, spec, **options):
        super().__init__(spec, **options)
        self.keys: list[torch.Tensor | None] = [None] * spec.num_layers
        self.values: list[torch.Tensor | None] = [None] * spec.num_layers
        self.reserved = 0

    def reserve(self, tokens: int) -> None:
        self.reserved = max(self.reserved, tokens)

    def _append(self, layer, k, v):
        n, t = self.lengths[layer], k.shape[2]
        buf = self.keys[layer]
        capacity = 0 if buf is None else buf.shape[2]
        if n + t > capacity:
            new_capacity = grown(n + t, self.reserved)
            new_k = k.new_empty((*k.shape[:2], new_capacity, k.shape[3]))
            new_v = v.new_empty(new_k.shape)
            if n:
                new_k[:, :, :n] = buf[:, :, :n]
                new_v[:, :, :n] = self.values[layer][:, :, :n]
            self.keys[layer], self.values[layer] = new_k, new_v
            self.ledger.hold(f"kv{layer}", new_k, new_v)
        self.keys[layer][:, :, n:n + t] = k
        self.values[layer][:, :, n:n + t] = v

    def _attend(self, layer, q, valid, scaling):
        n = self.lengths[layer]
        return causal_attention(q, self.keys[layer][:, :, :n], self.values[layer][:, :, :n], scaling,
                                valid, q_offset=n - q.shape[2])
