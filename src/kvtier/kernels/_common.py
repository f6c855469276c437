"""What the kernel modules share: block sizes, layout checks, and loading a KV head's group of query rows."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# what `attend` gives masked scores (not -inf: see attention.py); constexpr, as kernels may only read such globals
FLOAT32_MIN = tl.constexpr(torch.finfo(torch.float32).min)


def block(n: int, least: int = 16) -> int:
    """A power-of-two tile covering n; at least 16 because tl.dot on the GPU wants every dim >= 16."""
    return max(least, triton.next_power_of_2(n))


def rows(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors with a unit-stride last dim (kernels index channels as ptr + c); others pass untouched."""
    return tuple(x if x.stride(-1) == 1 else x.contiguous() for x in xs)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs need full-precision products to equal the reference; bf16/fp16 values are exact in tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def load_query_rows(q_ptr, b, h, group, t, d, s_b, s_h, s_t, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """KV head h's queries as [BLOCK_M, BLOCK_D] float32 rows r = (head within the group) * t + token, the
    [b, H_kv, g*t, d] grouping of `attend`; rows past g*t and channels past d are zero."""
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_D)
    head = h * group + r // t
    ptrs = q_ptr + b * s_b + head[:, None] * s_h + (r % t)[:, None] * s_t + c[None, :]
    return tl.load(ptrs, mask=(r[:, None] < group * t) & (c[None, :] < d), other=0.0).to(tl.float32)


@triton.jit
def softmax_step(m, l, acc, s, v, PRECISION: tl.constexpr):
    """One block of online softmax: scores s [M, N] and values v [N, D] into the running max m, normalizer l
    and unnormalized output acc."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    return m_new, l * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)


@triton.jit
def full_precision_block(q, k_base, v_base, mask_base, cols, col_ok, c, c_ok, row_ok, sk_n, sv_n, scaling, m, l,
                         acc, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """Columns `cols` of full-precision keys and values: scored (masked entries at float32 min, as `attend`;
    columns past the range at -inf) and folded into the online softmax."""
    kv_ok = col_ok[:, None] & c_ok[None, :]
    k = tl.load(k_base + cols[:, None] * sk_n + c[None, :], mask=kv_ok, other=0.0).to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling
    if HAS_MASK:
        keep = tl.load(mask_base + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0)
        s = tl.where(keep != 0, s, FLOAT32_MIN)
    s = tl.where(col_ok[None, :], s, float("-inf"))  # past the range: no weight at all
    v = tl.load(v_base + cols[:, None] * sv_n + c[None, :], mask=kv_ok, other=0.0).to(tl.float32)
    return softmax_step(m, l, acc, s, v, PRECISION)


@triton.jit
def decode_program(q_ptr, num_kv, group, t, d, sq_b, sq_h, sq_t, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """What one split-K decode program serves: its sequence b (int64) and KV head h, its split of the keys, the
    KV head's query rows q, the row and channel indices r and c, and which rows are real."""
    b = tl.program_id(0) // num_kv
    h = tl.program_id(0) % num_kv
    split = tl.program_id(1)
    q = load_query_rows(q_ptr, b, h, group, t, d, sq_b, sq_h, sq_t, BLOCK_M, BLOCK_D)
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_D)
    return b.to(tl.int64), h, split, q, r, c, r < group * t


@triton.jit
def store_decode_rows(out_ptr, m_ptr, l_ptr, acc, m, l, b, h, split, r, c, row_ok, group, t, d,
                      so_b, so_s, so_t, so_h, sl_b, sl_s, sl_t, sl_h, PARTIAL: tl.constexpr):
    """A split-K decode program's result, rows back to (query token, query head): out [b, splits, t, H, d] and
    m, l [b, splits, t, H] (PARTIAL: unnormalized, merged later by `merge_splits`), else out normalized."""
    head = h * group + r // t
    row = b * sl_b + split * sl_s + (r % t) * sl_t + head * sl_h
    out = out_ptr + b * so_b + split * so_s + (r % t)[:, None] * so_t + head[:, None] * so_h + c[None, :]
    out_ok = row_ok[:, None] & (c[None, :] < d)
    if PARTIAL:
        tl.store(out, acc, mask=out_ok)
        tl.store(m_ptr + row, m, mask=row_ok)
        tl.store(l_ptr + row, l, mask=row_ok)
    else:
        tl.store(out, (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=out_ok)
