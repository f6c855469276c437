"""Decode attention: a few query tokens per sequence over [sink + recalled pages + window], the decode case of
`attention.attend`.

One program per (sequence, KV head[, split of the keys]) holds the whole query group as rows of one tile, so
each key and value is read once for the group and repeated KV heads are never materialized. Online softmax
in float32; masked keys score float32 min exactly as in `attend` (a fully masked row averages every value,
as the reference does, instead of producing NaN). With several splits (flash-decoding: enough programs to
fill the GPU when b * h_kv is small) each split writes its running max, normalizer and unnormalized output,
and the launcher merges them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention import attend as decode_attention_reference  # noqa: F401  (the function this one equals)
from . import DECODE_MAX_ROWS
from ._common import FLOAT32_MIN, block, decode_program, dot_precision, full_precision_block, rows, store_decode_rows

BLOCK_N = 64
MIN_SPLIT = 256  # keys per split below which splitting costs more than it buys


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, m_ptr, l_ptr, num_kv, group, t, n, d, split_len,
                   scaling, sq_b, sq_h, sq_t, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, sm_h, sm_t,
                   so_b, so_s, so_t, so_h, sl_b, sl_s, sl_t, sl_h,
                   PARTIAL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    b, h, split, q, r, c, row_ok = decode_program(q_ptr, num_kv, group, t, d, sq_b, sq_h, sq_t, BLOCK_M, BLOCK_D)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    mask_base = mask_ptr + b * sm_b + h * sm_h + (r % t)[:, None] * sm_t

    # starting the max at float32 min (not -inf) keeps exp(m - m_new) finite when every score is masked
    m = tl.full([BLOCK_M], FLOAT32_MIN, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    start = split * split_len
    stop = tl.minimum(start + split_len, n)
    for n0 in range(start, stop, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        m, l, acc = full_precision_block(q, k_base, v_base, mask_base, cols, cols < stop, c, c < d, row_ok, sk_n,
                                         sv_n, scaling, m, l, acc, HAS_MASK, PRECISION)

    store_decode_rows(out_ptr, m_ptr, l_ptr, acc, m, l, b, h, split, r, c, row_ok, group, t, d,
                      so_b, so_s, so_t, so_h, sl_b, sl_s, sl_t, sl_h, PARTIAL)


def _splits(n: int, programs: int, device: torch.device) -> int:
    """How many pieces to cut the keys into: enough programs for two waves of the GPU, none below MIN_SPLIT."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(n, MIN_SPLIT), triton.cdiv(2 * sms, programs)))


def split_plan(columns: int, programs: int, device: torch.device, splits: int | None) -> tuple[int, int]:
    """(splits, columns per split, a whole number of blocks): no split is empty."""
    splits = splits or _splits(columns, programs, device)
    split_len = triton.cdiv(triton.cdiv(columns, splits), BLOCK_N) * BLOCK_N
    return triton.cdiv(columns, split_len), split_len


def mask_argument(mask: torch.Tensor | None, q: torch.Tensor, num_kv: int, n: int):
    """The mask as the kernels read it (uint8 [b, h_kv, t, n] with unit-stride columns) and its strides; without a
    mask, any tensor (never read) and zero strides."""
    if mask is None:
        return q, (0, 0, 0)
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    mask = mask.expand(q.shape[0], num_kv, q.shape[2], n)
    if mask.stride(-1) != 1:
        mask = mask.contiguous()
    return mask.view(torch.uint8), mask.stride()[:3]


def split_outputs(q: torch.Tensor, splits: int):
    """out [b, splits, t, H, d] and, with several splits, float32 running max and normalizer [b, splits, t, H]."""
    b, num_heads, t, d = q.shape
    if splits == 1:
        out = torch.empty((b, 1, t, num_heads, d), dtype=q.dtype, device=q.device)
        return out, out, out  # m and l are never written
    out = torch.empty((b, splits, t, num_heads, d), dtype=torch.float32, device=q.device)
    m = torch.empty((b, splits, t, num_heads), dtype=torch.float32, device=q.device)
    return out, m, torch.empty_like(m)


def merge_splits(out: torch.Tensor, m: torch.Tensor, l: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[b, t, H, d]: the splits rescaled to the overall max and normalized once (or the single split as is)."""
    if out.shape[1] == 1:
        return out[:, 0]
    w = torch.exp(m - m.amax(dim=1, keepdim=True))
    return ((out * w.unsqueeze(-1)).sum(1) / (l * w).sum(1).unsqueeze(-1)).to(dtype)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                     mask: torch.Tensor | None = None, splits: int | None = None) -> torch.Tensor:
    """`attend` for few query tokens: q [b, H, t, d]; k, v [b, H_kv, n, d]; mask bool [b or 1, t, n] or
    [b or 1, H_kv, t, n] (True attends) or None. Returns [b, t, H, d] in q's dtype.

    splits: pieces of the key range computed in parallel and merged (default: by GPU occupancy; 1 on CPU).
    """
    q, k, v = rows(q, k, v)
    b, num_heads, t, d = q.shape
    num_kv, n = k.shape[1], k.shape[2]
    group = num_heads // num_kv
    if n == 0 or group * t > DECODE_MAX_ROWS:
        raise ValueError(f"decode_attention needs keys and at most {DECODE_MAX_ROWS} query rows per KV head, got "
                         f"n={n}, {group} heads x {t} tokens")
    splits, split_len = split_plan(n, b * num_kv, q.device, splits)
    mask_arg, mask_strides = mask_argument(mask, q, num_kv, n)
    out, m, l = split_outputs(q, splits)
    partial = splits > 1
    _decode_kernel[(b * num_kv, splits)](
        q, k, v, mask_arg, out, m, l, num_kv, group, t, n, d, split_len, float(scaling),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *mask_strides, *out.stride()[:4],
        *(m.stride() if partial else (0, 0, 0, 0)),
        PARTIAL=partial, HAS_MASK=mask is not None, BLOCK_M=block(group * t), BLOCK_N=BLOCK_N,
        BLOCK_D=block(d), PRECISION=dot_precision(q.dtype))
    return merge_splits(out, m, l, q.dtype)
