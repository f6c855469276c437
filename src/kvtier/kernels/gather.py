"""Recall copy: rows of one KV head's page (keys then values) from the host pool into device buffers.

The source is a `store.HostPool` layer viewed as rows `[rows, 2, P*d]`; on CUDA it is the pinned host tensor
itself, which the kernel reads over the link (zero-copy: no staging buffer, one launch for every head's pages).
The grid is fixed by the plan's size; an entry whose source row is -1 copies nothing, so a plan padded with -1
needs no host-side compaction. The reference is `retrieval.recall.copy_rows_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..retrieval.recall import copy_rows_reference  # noqa: F401  (the function this one equals)


@triton.jit
def _copy_rows_kernel(src_ptr, dst_k_ptr, dst_v_ptr, src_rows_ptr, dst_rows_ptr, row_elems, s_row, s_kv,
                      sd_k, sd_v, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    src_row = tl.load(src_rows_ptr + i)
    dst_row = tl.load(dst_rows_ptr + i)
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = e < tl.where(src_row >= 0, row_elems, 0)  # a skipped entry (row -1) masks every element
    src = src_ptr + src_row * s_row + e
    tl.store(dst_k_ptr + dst_row * sd_k + e, tl.load(src, mask=ok), mask=ok)
    tl.store(dst_v_ptr + dst_row * sd_v + e, tl.load(src + s_kv, mask=ok), mask=ok)


def copy_rows(src: torch.Tensor, dst_k: torch.Tensor, dst_v: torch.Tensor, src_rows: torch.Tensor,
              dst_rows: torch.Tensor) -> None:
    """src [rows, 2, E] (each E-row contiguous); dst_k, dst_v [rows', E] contiguous rows; src_rows, dst_rows
    int64 [n] on dst's device: dst[dst_rows[i]] = src[src_rows[i]], skipped where src_rows[i] < 0. Rows are not
    bounds-checked (that would sync)."""
    if src.dim() != 3 or src.shape[1] != 2 or src.stride(2) != 1:
        raise ValueError(f"source must be [rows, 2, E] with contiguous rows, got {tuple(src.shape)} {src.stride()}")
    if dst_k.stride(1) != 1 or dst_v.stride(1) != 1:
        raise ValueError("destination rows must be contiguous")
    n, elems = src_rows.numel(), src.shape[2]
    if n == 0:
        return
    blk = min(4096, triton.next_power_of_2(elems))
    grid = (n, triton.cdiv(elems, blk))
    _copy_rows_kernel[grid](src, dst_k, dst_v, src_rows.to(torch.int64).contiguous(),
                            dst_rows.to(torch.int64).contiguous(), elems, src.stride(0), src.stride(1),
                            dst_k.stride(0), dst_v.stride(0), BLOCK=blk)
