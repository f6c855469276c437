"""The math of choosing what a step needs: page digests, page scores with grouped-query aggregation, query drift.

Knows nothing of where the data lives. Shapes: q [b, H, d] (one decode query), digests [b, H_kv, pages, d].
The scorers that keep digests or low-bit keys per layer and rank pages with them are in `retrieval.scorer`.
"""

from __future__ import annotations

import torch

from . import kernels
from .kernels import native
from .quant import as_float32


def page_digest(keys: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise max and min of each page's keys: keys [b, h, pages*P, d] -> two [b, h, pages, d]."""
    b, h, t, d = keys.shape
    if t % page_size:
        raise ValueError(f"{t} keys are not a whole number of {page_size}-token pages")
    pages = keys.view(b, h, t // page_size, page_size, d)
    return pages.amax(dim=3), pages.amin(dim=3)


def page_scores(q: torch.Tensor, digest_max: torch.Tensor, digest_min: torch.Tensor) -> torch.Tensor:
    """Upper bound of q.k over each page, per query head: sum_d max(q_d max_d, q_d min_d) -> [b, H_kv, g, pages].

    max(q_d max_d, q_d min_d) is q_d max_d where q_d >= 0 and q_d min_d where not, so the bound is two matrix
    products, q+ . max + q- . min: no [g, pages, d] product is made (float32, as the kernel accumulates)."""
    if kernels.enabled(q):
        return kernels.page_scores(q, digest_max, digest_min)
    b, num_heads, d = q.shape
    num_kv, pages = digest_max.shape[1], digest_max.shape[2]
    qg = as_float32(q.reshape(b * num_kv, num_heads // num_kv, d))
    upper = torch.bmm(qg.clamp(min=0), as_float32(digest_max.reshape(b * num_kv, pages, d)).transpose(1, 2))
    upper.baddbmm_(qg.clamp(max=0), as_float32(digest_min.reshape(b * num_kv, pages, d)).transpose(1, 2))
    return upper.view(b, num_kv, num_heads // num_kv, pages)


def digest_page_probs(q: torch.Tensor, digest_max: torch.Tensor, digest_min: torch.Tensor, scaling: float,
                      lo: int, hi: int) -> torch.Tensor:
    """q [b, H, t, d] -> [b, H_kv, t, pages]: per query row, the softmax over pages [lo, hi) of its page scores
    times `scaling`, averaged over each KV head's group; pages outside [lo, hi) get 0."""
    b, num_heads, t, d = q.shape
    num_kv, pages = digest_max.shape[1], digest_max.shape[2]
    # a query token is one more query head of its group: rows (head in group, token), as attend groups them
    upper = page_scores(q.reshape(b, num_heads * t, d), digest_max, digest_min)
    outside = torch.arange(pages, device=q.device)
    upper = upper.masked_fill_((outside < lo) | (outside >= hi), float("-inf"))
    probs = torch.softmax(upper.mul_(scaling), dim=-1)
    return probs.view(b, num_kv, num_heads // num_kv, t, pages).mean(2)


def query_similarity(q: torch.Tensor, previous: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Cosine similarity of consecutive queries per query head, averaged over each KV head's group -> [b, H_kv]."""
    b, num_heads, _ = q.shape
    cos = torch.nn.functional.cosine_similarity(as_float32(q), as_float32(previous), dim=-1)
    return cos.view(b, num_kv_heads, num_heads // num_kv_heads).mean(-1)


def query_drift(q: torch.Tensor, previous: torch.Tensor, num_kv_heads: int, tau: float) -> torch.Tensor:
    """Which KV heads' queries drifted since the previous step: `query_similarity` below tau -> bool [b, H_kv]
    (one C kernel on CPU)."""
    if kernels.native_enabled(q):
        drift = native.query_drift(q, previous, num_kv_heads, tau)
        if drift is not None:
            return drift
    return query_similarity(q, previous, num_kv_heads) < tau
