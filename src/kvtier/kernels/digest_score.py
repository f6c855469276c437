"""FreeKV page scoring: q against each page's min/max key digest, optionally fused with the grouped softmax.

score[b, kv, g, p] = sum_d max(q_d * max_pd, q_d * min_pd) for the query heads g of KV head kv, as
`selection.page_scores`; `page_probs` is `selection.digest_page_probs` (softmax over a range of pages per query
row, mean over the group) without writing the scores out. One program per (sequence, KV head[, query token])
reads each digest once for the whole group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..selection import digest_page_probs as page_probs_reference  # noqa: F401  (what page_probs equals)
from ..selection import page_scores as page_scores_reference
from ._common import block, load_query_rows, rows


@triton.jit
def _block_scores(q, dmax_ptr, dmin_ptr, s_p, p0, pages, d, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Scores [G, BLOCK_P] of the group's queries q [G, BLOCK_D] for pages p0..p0+BLOCK_P (0 past the end)."""
    p = p0 + tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_D)
    ok = (p[:, None] < pages) & (c[None, :] < d)
    hi = tl.load(dmax_ptr + p[:, None] * s_p + c[None, :], mask=ok, other=0.0).to(tl.float32)
    lo = tl.load(dmin_ptr + p[:, None] * s_p + c[None, :], mask=ok, other=0.0).to(tl.float32)
    qe = q[:, None, :]
    return tl.sum(tl.maximum(qe * hi[None, :, :], qe * lo[None, :, :]), axis=2)


@triton.jit
def _scores_kernel(q_ptr, dmax_ptr, dmin_ptr, out_ptr, num_kv, group, pages, d,
                   sq_b, sq_h, sd_b, sd_h, sd_p, so_b, so_h, so_g,
                   BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0) // num_kv
    h = tl.program_id(0) % num_kv
    p0 = tl.program_id(1) * BLOCK_P
    q = load_query_rows(q_ptr, b, h, group, 1, d, sq_b, sq_h, 0, BLOCK_G, BLOCK_D)
    base = b.to(tl.int64) * sd_b + h * sd_h
    s = _block_scores(q, dmax_ptr + base, dmin_ptr + base, sd_p, p0, pages, d, BLOCK_P, BLOCK_D)
    g = tl.arange(0, BLOCK_G)
    p = p0 + tl.arange(0, BLOCK_P)
    tl.store(out_ptr + b * so_b + h * so_h + g[:, None] * so_g + p[None, :], s,
             mask=(g[:, None] < group) & (p[None, :] < pages))


@triton.jit
def _probs_kernel(q_ptr, dmax_ptr, dmin_ptr, out_ptr, num_kv, group, pages, d, lo, hi, scaling,
                  sq_b, sq_h, sq_t, sd_b, sd_h, sd_p, so_b, so_h, so_t,
                  BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0) // num_kv
    h = tl.program_id(0) % num_kv
    tok = tl.program_id(1)
    q = load_query_rows(q_ptr + tok * sq_t, b, h, group, 1, d, sq_b, sq_h, 0, BLOCK_G, BLOCK_D)
    base = b.to(tl.int64) * sd_b + h * sd_h
    # Pass 1: each query head's softmax max and normalizer over pages [lo, hi) (online, block by block).
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    for p0 in range(lo, hi, BLOCK_P):
        s = _block_scores(q, dmax_ptr + base, dmin_ptr + base, sd_p, p0, hi, d, BLOCK_P, BLOCK_D) * scaling
        s = tl.where((p0 + tl.arange(0, BLOCK_P))[None, :] < hi, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m = m_new
    # Pass 2: recompute the scores (cheaper than a round trip through memory) and write the group mean; then 0
    # for the pages outside [lo, hi).
    real = tl.arange(0, BLOCK_G) < group
    out = out_ptr + b * so_b + h * so_h + tok * so_t
    for p0 in range(lo, hi, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        s = _block_scores(q, dmax_ptr + base, dmin_ptr + base, sd_p, p0, hi, d, BLOCK_P, BLOCK_D) * scaling
        probs = tl.where(real[:, None], tl.exp(s - m[:, None]) / l[:, None], 0.0)
        tl.store(out + p, tl.sum(probs, axis=0) / group, mask=p < hi)
    for p0 in range(0, pages, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        tl.store(out + p, tl.zeros([BLOCK_P], tl.float32), mask=(p < pages) & ((p < lo) | (p >= hi)))


def _prepare(q, digest_max, digest_min):
    q, digest_max, digest_min = rows(q, digest_max, digest_min)
    if digest_min.stride() != digest_max.stride():
        digest_max, digest_min = digest_max.contiguous(), digest_min.contiguous()
    b, num_heads, d = q.shape
    num_kv, pages = digest_max.shape[1], digest_max.shape[2]
    group = num_heads // num_kv
    tiles = dict(BLOCK_G=block(group, 1), BLOCK_D=block(d))
    # keep the [G, P, D] product tile around 8K elements: it lives in registers
    tiles["BLOCK_P"] = max(1, min(64, 8192 // (tiles["BLOCK_G"] * tiles["BLOCK_D"])))
    return q, digest_max, digest_min, (b, num_kv, group, pages, d), tiles


def page_scores(q: torch.Tensor, digest_max: torch.Tensor, digest_min: torch.Tensor) -> torch.Tensor:
    """q [b, H, d]; digests [b, H_kv, pages, d] -> float32 [b, H_kv, g, pages], as `selection.page_scores`."""
    q, dmax, dmin, (b, num_kv, group, pages, d), tiles = _prepare(q, digest_max, digest_min)
    out = torch.empty((b, num_kv, group, pages), dtype=torch.float32, device=q.device)
    if out.numel():
        grid = (b * num_kv, triton.cdiv(pages, tiles["BLOCK_P"]))
        _scores_kernel[grid](q, dmax, dmin, out, num_kv, group, pages, d, q.stride(0), q.stride(1),
                             dmax.stride(0), dmax.stride(1), dmax.stride(2), *out.stride()[:3], **tiles)
    return out


def page_probs(q: torch.Tensor, digest_max: torch.Tensor, digest_min: torch.Tensor, scaling: float, lo: int,
               hi: int) -> torch.Tensor:
    """q [b, H, t, d] -> float32 [b, H_kv, t, pages], as `selection.digest_page_probs`."""
    b, num_heads, t, d = q.shape
    q3, dmax, dmin, (_, num_kv, group, pages, _), tiles = _prepare(q[:, :, 0], digest_max, digest_min)
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty((b, num_kv, t, pages), dtype=torch.float32, device=q.device)
    if out.numel():
        _probs_kernel[(b * num_kv, t)](q, dmax, dmin, out, num_kv, group, pages, d, lo, hi, float(scaling),
                                       q.stride(0), q.stride(1), q.stride(2), dmax.stride(0), dmax.stride(1),
                                       dmax.stride(2), out.stride(0), out.stride(1), out.stride(2), **tiles)
    return out
