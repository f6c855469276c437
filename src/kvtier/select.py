"""Choosing what a step needs: page digests, page scores with grouped-query aggregation, top-k.

Knows nothing of where the data lives. Shapes: q [b, H, d] (one decode query), digests [b, H_kv, pages, d].
Two ways to score pages: min/max digests (an upper bound of q.k per page, FreeKV's), or low-bit keys (every
token's approximate attention probability, summed per page), which rank pages closer to their true attention
mass at a few bits per key element.
"""

from __future__ import annotations

import torch

from . import kernels
from .quant import QTensor


def page_digest(keys: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise max and min of each page's keys: keys [b, h, pages*P, d] -> two [b, h, pages, d]."""
    b, h, t, d = keys.shape
    if t % page_size:
        raise ValueError(f"{t} keys are not a whole number of {page_size}-token pages")
    pages = keys.view(b, h, t // page_size, page_size, d)
    return pages.amax(dim=3), pages.amin(dim=3)


def page_scores(q: torch.Tensor, digest_max: torch.Tensor, digest_min: torch.Tensor) -> torch.Tensor:
    """Upper bound of q.k over each page, per query head: sum_d max(q_d max_d, q_d min_d) -> [b, H_kv, g, pages]."""
    if kernels.enabled(q):
        return kernels.page_scores(q, digest_max, digest_min)
    b, num_heads, d = q.shape
    num_kv = digest_max.shape[1]
    qg = q.view(b, num_kv, num_heads // num_kv, 1, d)
    upper = torch.maximum(qg * digest_max.unsqueeze(2), qg * digest_min.unsqueeze(2))
    return upper.sum(-1, dtype=torch.float32)


def group_page_probs(scores: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax over pages per query head, averaged over each KV head's group -> [b, H_kv, pages]."""
    return torch.softmax(scores * scaling, dim=-1).mean(dim=2)


def select_pages(q: torch.Tensor, digest_max: torch.Tensor, digest_min: torch.Tensor, k: int,
                 scaling: float, first_page: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each KV head's top-k pages among the digests given (page ids offset by `first_page`).

    Returns (page ids [b, H_kv, k'] with k' = min(k, pages), probabilities [b, H_kv, pages]).
    """
    if kernels.enabled(q):  # fused: the per-head scores never leave the kernel
        probs = kernels.page_probs(q, digest_max, digest_min, scaling)
    else:
        probs = group_page_probs(page_scores(q, digest_max, digest_min), scaling)
    return top_pages(probs, k, first_page), probs


def top_pages(probs: torch.Tensor, k: int, first_page: int = 0) -> torch.Tensor:
    """Each KV head's k' = min(k, pages) most probable pages [b, H_kv, k'], ids offset by `first_page`."""
    return probs.topk(min(k, probs.shape[-1]), dim=-1).indices + first_page


def lowbit_page_probs(q: torch.Tensor, keys: QTensor | None, pending: torch.Tensor, page_size: int,
                      first_page: int, last_page: int, scaling: float) -> torch.Tensor:
    """Attention mass of pages [first_page, last_page) from low-bit keys -> [b, H_kv, pages].

    keys: the quantized prefix of the layer's keys (per channel, `quant.quantize_keys`; None if empty), and
    pending: the full-precision keys after it; together they cover at least last_page * page_size tokens.
    Per query head a softmax over the pages' tokens, summed per page, then averaged over each KV head's group.
    """
    b, num_heads, d = q.shape
    num_kv = pending.shape[1]
    qg = q.view(b, num_kv, num_heads // num_kv, d)
    parts = []
    if keys is not None:
        if kernels.enabled(q):  # dequantized in registers, never written out
            parts.append(kernels.dequant_scores(q.unsqueeze(2), keys, scaling))
        else:
            parts.append(torch.matmul(qg, keys.dequantize().transpose(-1, -2)).float() * scaling)
    parts.append(torch.matmul(qg, pending.transpose(-1, -2)).float() * scaling)
    scores = torch.cat(parts, dim=-1)[..., first_page * page_size:last_page * page_size]
    if scores.shape[-1] != (last_page - first_page) * page_size:
        raise ValueError(f"low-bit keys cover {sum(p.shape[-1] for p in parts)} tokens; pages up to {last_page} "
                         f"of {page_size} tokens need {last_page * page_size}")
    probs = torch.softmax(scores, dim=-1)
    return probs.unflatten(-1, (last_page - first_page, page_size)).sum(-1).mean(dim=2)


def query_similarity(q: torch.Tensor, previous: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Cosine similarity of consecutive queries per query head, averaged over each KV head's group -> [b, H_kv]."""
    b, num_heads, _ = q.shape
    cos = torch.nn.functional.cosine_similarity(q.float(), previous.float(), dim=-1)
    return cos.view(b, num_kv_heads, num_heads // num_kv_heads).mean(-1)
