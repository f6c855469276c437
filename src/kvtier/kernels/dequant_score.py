"""SpeCache scoring: queries against low-bit keys, dequantized in registers (the full-precision keys are never
written out).

Keys are a `quant.quantize_keys` QTensor: codes packed along channels ([b, h_kv, n, ceil(d*bits/8)] uint8, code
c of a token in byte c // (8/bits) at bit (c % (8/bits)) * bits), one scale and zero per (group of `group_size`
tokens, channel). The result equals matmul(q grouped by KV head, qk.dequantize()^T) in float32, times scaling:
the [b, h_kv, g*t, n] scores `attend` and SpeCache's top-k compute from dequantized keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant import QTensor
from ._common import block, dot_precision, load_query_rows, rows


def dequant_scores_reference(q: torch.Tensor, qk: QTensor, scaling: float = 1.0) -> torch.Tensor:
    b, num_heads, t, d = q.shape
    num_kv = qk.shape[1]
    qg = q.reshape(b, num_kv, num_heads // num_kv * t, d)
    return torch.matmul(qg, qk.dequantize().transpose(-1, -2)).float() * scaling


@triton.jit
def _dequant_scores_kernel(q_ptr, packed_ptr, scale_ptr, zero_ptr, out_ptr, num_kv, group, t, n, d, group_size,
                           scaling, sq_b, sq_h, sq_t, sp_b, sp_h, sp_n, sz_b, sz_h, sz_g, so_b, so_h, so_m,
                           BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0) // num_kv
    h = tl.program_id(0) % num_kv
    q = load_query_rows(q_ptr, b, h, group, t, d, sq_b, sq_h, sq_t, BLOCK_M, BLOCK_D)
    tok = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_D)
    ok = (tok[:, None] < n) & (c[None, :] < d)
    per_byte = 8 // BITS
    byte = tl.load(packed_ptr + b.to(tl.int64) * sp_b + h * sp_h + tok[:, None] * sp_n + (c // per_byte)[None, :],
                   mask=ok, other=0).to(tl.int32)
    code = (byte >> ((c % per_byte) * BITS)[None, :]) & ((1 << BITS) - 1)
    params = b.to(tl.int64) * sz_b + h * sz_h + (tok // group_size)[:, None] * sz_g + c[None, :]
    scale = tl.load(scale_ptr + params, mask=ok, other=0.0)
    zero = tl.load(zero_ptr + params, mask=ok, other=0.0)
    # float32 dequantization rounded once to the key dtype, as QTensor.dequantize
    k = (code.to(tl.float32) * scale.to(tl.float32) + zero.to(tl.float32)).to(scale.dtype).to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling
    m = tl.arange(0, BLOCK_M)
    tl.store(out_ptr + b * so_b + h * so_h + m[:, None] * so_m + tok[None, :], s,
             mask=(m[:, None] < group * t) & (tok[None, :] < n))


def dequant_scores(q: torch.Tensor, qk: QTensor, scaling: float = 1.0) -> torch.Tensor:
    """q [b, H, t, d] against quantized keys of [b, H_kv, n, d] -> float32 scores [b, H_kv, g*t, n]."""
    if qk.dim != 2 or len(qk.shape) != 4:
        raise ValueError(f"expected keys quantized per channel over tokens (quantize_keys), got dim {qk.dim} of "
                         f"shape {qk.shape}")
    q, packed, scale, zero = rows(q, qk.packed, qk.scale, qk.zero)
    if zero.stride() != scale.stride():
        scale, zero = scale.contiguous(), zero.contiguous()
    b, num_heads, t, d = q.shape
    num_kv, n = qk.shape[1], qk.shape[2]
    group = num_heads // num_kv
    out = torch.empty((b, num_kv, group * t, n), dtype=torch.float32, device=q.device)
    if out.numel():
        block_n = 32
        grid = (b * num_kv, triton.cdiv(n, block_n))
        _dequant_scores_kernel[grid](
            q, packed, scale, zero, out, num_kv, group, t, n, d, qk.group_size, float(scaling),
            q.stride(0), q.stride(1), q.stride(2), *packed.stride()[:3], *scale.stride()[:3], *out.stride()[:3],
            BITS=qk.bits, BLOCK_M=block(group * t), BLOCK_N=block_n, BLOCK_D=block(d),
            PRECISION=dot_precision(q.dtype))
    return out
