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
