"""Top-k gather: selected pages (or tokens: pages of one) of each KV head, from a host-pool layer to the device.

The source is a `store.HostPool` layer, [pages, b, h_kv, 2 (key, value), P, d], where one KV head's page is one
contiguous block; on CUDA it may be the pinned host tensor itself, which the kernel reads over the link
(zero-copy: no staging buffer, one launch for every head's pages). Two launchers share one kernel:
`gather_pages` packs the pages named by index [b, h_kv, k] into a contiguous [b, h_kv, k, 2, P, d] buffer
(SpeCache's fetch, with P = 1), and `recall_pages` writes planned pages straight into `DevicePool` slots
(FreeKV's recall; the reference is `DevicePool.recall`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..store import DevicePool


def gather_pages_reference(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """src [n, b, h, 2, P, d], index [b, h, k] -> src[index[s, j, i], s, j] as [b, h, k, 2, P, d]."""
    b, h, _ = index.shape
    seq, head = torch.arange(b, device=src.device), torch.arange(h, device=src.device)
    return src[index.to(src.device), seq.view(b, 1, 1), head.view(1, h, 1)]


recall_pages_reference = DevicePool.recall


@triton.jit
def _copy_pages_kernel(src_ptr, dst_k_ptr, dst_v_ptr, seq_ptr, head_ptr, page_ptr, slot_ptr,
                       ss_page, ss_b, ss_h, ss_kv, sd_b, sd_h, sd_slot, page_elems, BLOCK: tl.constexpr):
    # one program per (copy, block of the page); the int64 indices keep host-pool offsets from overflowing
    i = tl.program_id(0)
    seq = tl.load(seq_ptr + i)
    head = tl.load(head_ptr + i)
    src = src_ptr + tl.load(page_ptr + i) * ss_page + seq * ss_b + head * ss_h
    dst = seq * sd_b + head * sd_h + tl.load(slot_ptr + i) * sd_slot
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = e < page_elems
    tl.store(dst_k_ptr + dst + e, tl.load(src + e, mask=inside), mask=inside)
    tl.store(dst_v_ptr + dst + e, tl.load(src + ss_kv + e, mask=inside), mask=inside)


def _copy(src, dst_k, dst_v, seq, head, page, slot, dst_strides):
    """Copy src[page, seq, head, 0/1] (a contiguous P*d block) to dst_k / dst_v at seq, head, slot."""
    if src.dim() != 6 or src.stride(5) != 1 or src.stride(4) != src.shape[5]:
        raise ValueError(f"source must be [n, b, h, 2, P, d] with each (P, d) block contiguous, got shape "
                         f"{tuple(src.shape)} strides {src.stride()}")
    page_elems = src.shape[4] * src.shape[5]
    index = [x.to(device=dst_k.device, dtype=torch.int64).contiguous() for x in (seq, head, page, slot)]
    if index[0].numel():
        blk = min(4096, triton.next_power_of_2(page_elems))
        grid = (index[0].numel(), triton.cdiv(page_elems, blk))
        _copy_pages_kernel[grid](src, dst_k, dst_v, *index, *src.stride()[:4], *dst_strides, page_elems, BLOCK=blk)


def gather_pages(src: torch.Tensor, index: torch.Tensor, device=None) -> torch.Tensor:
    """The pages index [b, h, k] names for each (sequence, KV head) of src [n, b, h, 2, P, d], contiguous
    [b, h, k, 2, P, d] on `device` (default: index's device). Indices are not bounds-checked (that would sync)."""
    b, h, k = index.shape
    device = index.device if device is None else torch.device(device)
    out = torch.empty((b, h, k, *src.shape[3:]), dtype=src.dtype, device=device)
    grid_index = torch.arange(b * h * k, device=device)
    seq, head, slot = grid_index // (h * k), grid_index // k % h, grid_index % k
    _copy(src, out[:, :, :, 0], out[:, :, :, 1], seq, head, index.reshape(-1), slot, out.stride()[:3])
    return out


def recall_pages(src: torch.Tensor, slot_k: torch.Tensor, slot_v: torch.Tensor, seq, head, slot, page) -> None:
    """FreeKV recall: src[page[i], seq[i], head[i]] into slot slot[i] of slot_k / slot_v [b, h, slots*P, d],
    for the (seq, head, slot, page) plan of `PageTable.plan`. Slot tensors must be contiguous (as DevicePool's)."""
    if not (slot_k.is_contiguous() and slot_v.is_contiguous()):
        raise ValueError("slot tensors must be contiguous")
    p = src.shape[4]
    _copy(src, slot_k, slot_v, seq, head, page, slot, (slot_k.stride(0), slot_k.stride(1), slot_k.stride(2) * p))
