"""Mixed-precision decode attention, the kernel of `attention.attend_mixed`: one softmax over full-precision
keys/values and over the low-bit tokens of a `RestRange`, dequantized in registers.

Reading the rest through its low-bit copy is the point of keeping one: dequantizing it to a full-precision
tensor first would write and reread, every step, the very bytes the low-bit copy saves. So each program
(sequence, KV head[, split]) runs the online softmax of `decode` over its full-precision keys, then over the
rest tokens [lo, hi) in tiles: the packed key codes (per channel, a scale and zero per (token group, channel))
and value codes (per token, a scale and zero per (token, channel group)) are unpacked and scaled as
QTensor.dequantize does (float32, one rounding to the KV dtype). Tokens on resident pages score -inf: their
full-precision copy is among k/v already. Splits (flash-decoding) cut the concatenated range [full precision,
rest] and are merged by the launcher as in `decode`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention import RestRange
from ..attention import attend_mixed as decode_attention_mixed_reference  # noqa: F401  (the function this equals)
from ..quant import QTensor
from . import DECODE_MAX_ROWS
from ._common import (FLOAT32_MIN, block, decode_program, dot_precision, full_precision_block, rows, softmax_step,
                      store_decode_rows)
from .decode import BLOCK_N, mask_argument, merge_splits, split_outputs, split_plan


@triton.jit
def _codes(base, tok, stride_n, c, ok, BITS: tl.constexpr):
    """Codes [tokens, channels] as float32 from rows packed as quant.pack lays them out."""
    per_byte: tl.constexpr = 8 // BITS
    byte = tl.load(base + tok[:, None] * stride_n + (c // per_byte)[None, :], mask=ok, other=0).to(tl.int32)
    return ((byte >> ((c % per_byte) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)


@triton.jit
def _mixed_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, kp_ptr, ks_ptr, kz_ptr, vp_ptr, vs_ptr, vz_ptr, res_ptr,
                  valid_ptr, out_ptr, m_ptr, l_ptr, num_kv, group, t, n, d, lo, rest_len, key_group, value_group, page_size,
                  split_len, scaling, sq_b, sq_h, sq_t, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, sm_h, sm_t,
                  skp_b, skp_h, skp_n, sks_b, sks_h, sks_g, svp_b, svp_h, svp_n, svs_b, svs_h, svs_n,
                  sr_b, sr_h, sr_p, sva_b, sva_n, so_b, so_s, so_t, so_h, sl_b, sl_s, sl_t, sl_h,
                  PARTIAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_VALID: tl.constexpr, KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    b64, h, split, q, r, c, row_ok = decode_program(q_ptr, num_kv, group, t, d, sq_b, sq_h, sq_t, BLOCK_M, BLOCK_D)
    c_ok = c < d
    k_base = k_ptr + b64 * sk_b + h * sk_h
    v_base = v_ptr + b64 * sv_b + h * sv_h
    mask_base = mask_ptr + b64 * sm_b + h * sm_h + (r % t)[:, None] * sm_t
    kp_base = kp_ptr + b64 * skp_b + h * skp_h
    ks_base = b64 * sks_b + h * sks_h
    vp_base = vp_ptr + b64 * svp_b + h * svp_h
    vs_base = b64 * svs_b + h * svs_h
    res_base = res_ptr + b64 * sr_b + h * sr_h

    # starting the max at float32 min (not -inf) keeps exp(m - m_new) finite when every score is masked
    m = tl.full([BLOCK_M], FLOAT32_MIN, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # this split's columns of [full precision keys 0..n-1, rest tokens lo..lo+rest_len-1]
    start = split * split_len
    stop = tl.minimum(start + split_len, n + rest_len)
    fp_stop = tl.minimum(stop, n)
    for n0 in range(start, fp_stop, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        m, l, acc = full_precision_block(q, k_base, v_base, mask_base, cols, cols < fp_stop, c, c_ok, row_ok,
                                         sk_n, sv_n, scaling, m, l, acc, HAS_MASK, PRECISION)
    for j0 in range(tl.maximum(start, n), stop, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        tok = lo + (j - n)
        in_split = j < stop
        held = tl.load(res_base + (tok // page_size) * sr_p, mask=in_split, other=1)
        take = in_split & (held == 0)  # a resident page counts through its full-precision copy only
        if HAS_VALID:  # a sequence's left padding gets no weight
            take = take & (tl.load(valid_ptr + b64 * sva_b + tok * sva_n, mask=in_split, other=0) != 0)
        ok = take[:, None] & c_ok[None, :]
        key_params = ks_base + (tok // key_group)[:, None] * sks_g + c[None, :]
        scale = tl.load(ks_ptr + key_params, mask=ok, other=0.0)
        zero = tl.load(kz_ptr + key_params, mask=ok, other=0.0)
        codes = _codes(kp_base, tok, skp_n, c, ok, KEY_BITS)
        # float32 dequantization rounded once to the KV dtype, as QTensor.dequantize
        k = (codes * scale.to(tl.float32) + zero.to(tl.float32)).to(scale.dtype).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling
        s = tl.where(take[None, :], s, float("-inf"))
        value_params = vs_base + tok[:, None] * svs_n + (c // value_group)[None, :]
        scale = tl.load(vs_ptr + value_params, mask=ok, other=0.0)
        zero = tl.load(vz_ptr + value_params, mask=ok, other=0.0)
        codes = _codes(vp_base, tok, svp_n, c, ok, VALUE_BITS)
        v = (codes * scale.to(tl.float32) + zero.to(tl.float32)).to(scale.dtype).to(tl.float32)
        m, l, acc = softmax_step(m, l, acc, s, v, PRECISION)

    store_decode_rows(out_ptr, m_ptr, l_ptr, acc, m, l, b64, h, split, r, c, row_ok, group, t, d,
                      so_b, so_s, so_t, so_h, sl_b, sl_s, sl_t, sl_h, PARTIAL)


def _params(qt: QTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """packed, scale, zero with unit-stride rows, scale and zero sharing strides (the kernel passes one set)."""
    packed, scale, zero = rows(qt.packed, qt.scale, qt.zero)
    if scale.stride() != zero.stride():
        scale, zero = scale.contiguous(), zero.contiguous()
    return packed, scale, zero


def decode_attention_mixed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                           keys: QTensor, values: QTensor, rest: RestRange, scaling: float,
                           splits: int | None = None) -> torch.Tensor:
    """`attend_mixed` (without `scores`: the kernel scores the low-bit keys as it reads them).

    q [b, H, t, d]; k, v [b, H_kv, L, d]; mask bool [b, t, L] or broadcastable to [b, H_kv, t, L], or None;
    keys / values: `quantize_keys` / `quantize_values` QTensors of [b, H_kv, N, d] (views of larger buffers
    are fine); rest: the low-bit tokens that take part. Returns [b, t, H, d] in q's dtype.

    splits: pieces of [full precision keys, rest tokens] computed in parallel and merged (default: by GPU
    occupancy; 1 on CPU).
    """
    if keys.dim != 2 or values.dim != 3:
        raise ValueError(f"keys must be quantized per channel (dim 2) and values per token (dim 3), got dims "
                         f"{keys.dim} and {values.dim}")
    q, k, v = rows(q, k, v)
    b, num_heads, t, d = q.shape
    num_kv, n = k.shape[1], k.shape[2]
    group = num_heads // num_kv
    if group * t > DECODE_MAX_ROWS:
        raise ValueError(f"decode_attention_mixed holds at most {DECODE_MAX_ROWS} query rows per KV head, got "
                         f"{group} heads x {t} tokens")
    lo, rest_len = rest.lo, max(0, rest.hi - rest.lo)
    total = max(1, n + rest_len)
    splits, split_len = split_plan(total, b * num_kv, q.device, splits)
    mask_arg, mask_strides = mask_argument(mask, q, num_kv, n)
    key_packed, key_scale, key_zero = _params(keys)
    value_packed, value_scale, value_zero = _params(values)
    resident = rest.resident.view(torch.uint8)
    valid = rest.valid.view(torch.uint8) if rest.valid is not None else resident  # never read without a mask
    valid_strides = rest.valid.stride() if rest.valid is not None else (0, 0)
    out, m, l = split_outputs(q, splits)
    partial = splits > 1
    _mixed_kernel[(b * num_kv, splits)](
        q, k, v, mask_arg, key_packed, key_scale, key_zero, value_packed, value_scale, value_zero, resident,
        valid, out, m, l, num_kv, group, t, n, d, lo, rest_len, keys.group_size, values.group_size, rest.page_size,
        split_len, float(scaling), *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mask_strides,
        *key_packed.stride()[:3], *key_scale.stride()[:3], *value_packed.stride()[:3], *value_scale.stride()[:3],
        *resident.stride(), *valid_strides, *out.stride()[:4], *(m.stride() if partial else (0, 0, 0, 0)),
        PARTIAL=partial, HAS_MASK=mask is not None, HAS_VALID=rest.valid is not None, KEY_BITS=keys.bits, VALUE_BITS=values.bits,
        BLOCK_M=block(group * t), BLOCK_N=BLOCK_N, BLOCK_D=block(d), PRECISION=dot_precision(q.dtype))
    return merge_splits(out, m, l, q.dtype)
