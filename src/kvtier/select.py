"""The math of choosing what a step needs: page digests, page scores with grouped-query aggregation, query drift.

Knows nothing of where the data lives. Shapes: q [b, H, d] (one decode query), digests [b, H_kv, pages, d].
The scorers that keep digests or low-bit keys per layer and rank pages with them are in `retrieval.scorer`.
"""

from __future__ import annotations

import torch

from . import kernels


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


def query_similarity(q: torch.Tensor, previous: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Cosine similarity of consecutive queries per query head, averaged over each KV head's group -> [b, H_kv]."""
    b, num_heads, _ = q.shape
    cos = torch.nn.functional.cosine_similarity(q.float(), previous.float(), dim=-1)
    return cos.view(b, num_kv_heads, num_heads // num_kv_heads).mean(-1)
