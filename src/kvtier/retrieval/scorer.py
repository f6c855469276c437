"""Scorers: what ranks the pages a KV head may recall, kept on the device for every page written.

Both answer `page_probs(q, lo, hi)`: per query row and KV head, the share of attention each page in [lo, hi)
would get, averaged over the head's query group, over a fixed number of pages (the reserved capacity; pages
outside [lo, hi) get 0), so top-k and the recall plan have the same shapes at every step.

- `DigestScorer`: per page and KV head the element-wise max and min of its keys (FreeKV); a page scores the
  upper bound of q.k over it, softmaxed over pages.
- `LowBitScorer`: a low-bit copy of every key (per channel, `quant.LowBitKeys`); a page scores the summed
  softmax of its tokens. Its raw token scores also serve `rest="lowbit"` attention, so the low-bit keys are
  read once per step.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..kernels import native
from ..quant import LowBitKeys, QTensor, as_float32, dequantize_key_range
from ..selection import digest_page_probs, page_digest

NEG = float("-inf")


_OUTSIDE: dict[tuple, torch.Tensor] = {}


def _outside(size: int, lo: int, hi: int, device) -> torch.Tensor:
    """Bool [size]: True outside [lo, hi). Every layer of a step asks for the same few ranges: made once each."""
    key = (size, lo, hi, str(device))
    mask = _OUTSIDE.get(key)
    if mask is None:
        if len(_OUTSIDE) > 64:
            _OUTSIDE.clear()
        idx = torch.arange(size, device=device)
        mask = _OUTSIDE[key] = (idx < lo) | (idx >= hi)
    return mask


class DigestScorer:
    """Min/max key digests of every written page: [b, h_kv, capacity_pages, d] each, sized once."""

    lowbit = False

    def __init__(self, like: torch.Tensor, pages: int, page_size: int):
        b, h, _, d = like.shape
        self.page_size = page_size
        self.max = like.new_zeros((b, h, pages, d))
        self.min = like.new_zeros((b, h, pages, d))

    def grow(self, pages: int) -> None:
        if pages > self.max.shape[2]:
            for name in ("max", "min"):
                old = getattr(self, name)
                new = old.new_zeros((*old.shape[:2], pages, old.shape[3]))
                new[:, :, :old.shape[2]] = old
                setattr(self, name, new)

    def add_pages(self, first_page: int, keys: torch.Tensor) -> None:
        """Digest whole pages of keys [b, h, n*P, d] starting at page `first_page`."""
        end = first_page + keys.shape[2] // self.page_size
        self.max[:, :, first_page:end], self.min[:, :, first_page:end] = page_digest(keys, self.page_size)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.max, self.min

    def token_scores(self, q: torch.Tensor, scaling: float):
        return None

    def page_probs(self, q: torch.Tensor, lo: int, hi: int, scaling: float, raw=None) -> torch.Tensor:
        """q [b, H, t, d] -> [b, h_kv, t, pages]: `selection.digest_page_probs`, in one kernel where one runs."""
        if kernels.enabled(q):
            return kernels.page_probs(q, self.max, self.min, scaling, lo, hi)
        if kernels.native_enabled(q):
            probs = native.digest_probs(q, self.max, self.min, scaling, lo, hi)
            if probs is not None:
                return probs
        return digest_page_probs(q, self.max, self.min, scaling, lo, hi)


class LowBitScorer:
    """Low-bit keys of every written token (per channel, groups of `group` tokens), quantized as groups fill."""

    lowbit = True

    def __init__(self, bits: int, group: int, page_size: int, capacity: int):
        self.keys = LowBitKeys(bits, group)
        self.keys.reserve(capacity)
        self.page_size = page_size
        self.capacity = capacity

    def grow(self, tokens: int) -> None:
        self.capacity = max(self.capacity, tokens)
        self.keys.reserve(tokens)

    def add_tokens(self, keys: torch.Tensor) -> None:
        """Quantize keys [b, h, n*group, d] (whole groups, in order)."""
        self.keys.append(keys)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.keys.tensors()

    def quantized(self) -> QTensor:
        """The keys over the whole capacity (unwritten rows are zero codes, zero scale: they score 0)."""
        k = self.keys
        b, h, _, d = k.pending.shape
        n = k.packed.shape[2]
        return QTensor(k.packed, k.scale, k.zero, k.bits, 2, k.group_size, (b, h, n, d), k.pending.dtype)

    def token_scores(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """Raw q.k_hat * scaling, float32 [b, h_kv, g*t, capacity], rows grouped as `attention.attend` does."""
        keys = self.quantized()
        if kernels.enabled(q):
            return kernels.dequant_scores(q, keys, scaling)
        if kernels.native_enabled(q):
            scores = native.dequant_scores(q, keys.packed, keys.scale, keys.zero, keys.bits, keys.group_size, scaling)
            if scores is not None:
                return scores
        b, num_heads, t, d = q.shape
        num_kv, n = keys.shape[1], keys.shape[2]
        qg = q.reshape(b * num_kv, num_heads // num_kv * t, d)
        k_hat = dequantize_key_range(keys, 0, n)  # [b * h_kv, n, d], one layer at a time (step_workspace)
        return as_float32(torch.bmm(qg, k_hat.transpose(1, 2))).mul_(scaling).view(b, num_kv, -1, n)

    def page_probs(self, q: torch.Tensor, lo: int, hi: int, scaling: float, raw=None) -> torch.Tensor:
        """q [b, H, t, d] -> [b, h_kv, t, pages]: softmax over the tokens of pages [lo, hi), summed per page."""
        raw = self.token_scores(q, scaling) if raw is None else raw
        b, num_heads, t, _ = q.shape
        num_kv, n = raw.shape[1], raw.shape[-1]
        p = self.page_size
        if kernels.native_enabled(raw):
            probs = native.page_probs(raw, num_heads // num_kv, t, n // p, lo * p, hi * p, p)
            if probs is not None:
                return probs
        probs = torch.softmax(raw.masked_fill(_outside(n, lo * p, hi * p, q.device), NEG), dim=-1)
        probs = probs.view(b, num_kv, num_heads // num_kv, t, n // p, p)
        return (probs.sum(-1) if p > 1 else probs.squeeze(-1)).mean(2)  # a page of one token: nothing to sum
