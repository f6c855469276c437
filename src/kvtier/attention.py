"""Attention over whatever KV a method hands over, without materializing repeated KV heads.

Query heads are grouped by the KV head they share ([b, H, t, d] -> [b, H_kv, g*t, d]), so one matmul per
KV head serves its whole group. Softmax runs in float32. Masked entries get the most negative finite
float rather than -inf, so a fully masked row (a left-padding query) stays finite instead of turning the
padded positions' values into NaN for every later layer.
This module is the PyTorch reference; `attend`'s decode case runs `kernels.decode_attention` where kernels are
enabled (on CUDA), which the tests compare with it.
"""

from __future__ import annotations

import torch

from . import kernels

# Score elements per chunk of queries in prefill: bounds the transient [b, H, t_chunk, n] buffer.
_PREFILL_CHUNK_ELEMENTS = 1 << 26


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [b, H, t, d]; k, v [b, H_kv, n, d]; mask bool [b, t, n] or [b, H_kv, t, n] (True attends), or None.

    Returns [b, t, H, d], the layout transformers' attention modules expect back.
    """
    if kernels.enabled(q) and kernels.decode_fits(q, k):
        return kernels.decode_attention(q, k, v, scaling, mask)
    b, num_heads, t, d = q.shape
    num_kv = k.shape[1]
    group = num_heads // num_kv
    n = k.shape[2]
    qg = q.reshape(b, num_kv, group * t, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float().mul_(scaling)
    if mask is not None:
        if mask.dim() == 3:
            mask = mask.unsqueeze(1)
        scores = scores.view(b, num_kv, group, t, n)
        scores = scores.masked_fill(~mask.unsqueeze(2), torch.finfo(torch.float32).min)
        scores = scores.view(b, num_kv, group * t, n)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)  # [b, H_kv, g*t, d]
    return out.view(b, num_heads, t, d).transpose(1, 2)


def causal_mask(valid: torch.Tensor | None, t: int, n: int, q_offset: int, device) -> torch.Tensor | None:
    """Mask [b or 1, t, n] for queries at cache positions q_offset..q_offset+t-1 over keys 0..n-1.

    valid: [b, n] bool (False for padding), or None. Returns None when nothing is masked.
    """
    needs_causal = q_offset < n - 1  # some query cannot see every key
    if not needs_causal and valid is None:
        return None
    mask = None
    if needs_causal:
        q_pos = torch.arange(q_offset, q_offset + t, device=device)
        mask = (torch.arange(n, device=device).unsqueeze(0) <= q_pos.unsqueeze(1)).unsqueeze(0)
    if valid is not None:
        pad = valid[:, None, :n]
        mask = pad if mask is None else mask & pad
    return mask


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                     valid: torch.Tensor | None, q_offset: int) -> torch.Tensor:
    """Causal attention of t queries (at positions q_offset..) over n cached keys, chunked over queries."""
    b, num_heads, t, _ = q.shape
    n = k.shape[2]
    chunk = max(1, _PREFILL_CHUNK_ELEMENTS // max(1, b * num_heads * n))
    if chunk >= t:
        return attend(q, k, v, scaling, causal_mask(valid, t, n, q_offset, q.device))
    outs = []
    for start in range(0, t, chunk):
        stop = min(t, start + chunk)
        # keys past the chunk's last query are masked anyway; drop them from the matmul
        kv_end = min(n, q_offset + stop)
        mask = causal_mask(None if valid is None else valid[:, :kv_end], stop - start, kv_end,
                           q_offset + start, q.device)
        outs.append(attend(q[:, :, start:stop], k[:, :, :kv_end], v[:, :, :kv_end], scaling, mask))
    return torch.cat(outs, dim=1)
