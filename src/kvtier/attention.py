"""Attention over whatever KV a method hands over, without materializing repeated KV heads.

Query heads are grouped by the KV head they share ([b, H, t, d] -> [b, H_kv, g*t, d]), so one matmul per
KV head serves its whole group. Softmax runs in float32. Masked entries get the most negative finite
float rather than -inf, so a fully masked row (a left-padding query) stays finite instead of turning the
padded positions' values into NaN for every later layer.
This module is the PyTorch reference; `attend`'s decode case runs `kernels.decode_attention` where kernels are
enabled (on CUDA), which the tests compare with it.

Prefill and other multi-token forwards (`causal_attention`) go through PyTorch's fused
`scaled_dot_product_attention` instead: on CUDA it runs flash or memory-efficient kernels that never hold the
[t, n] score matrix (the matmul path writes and rereads it, in float32, for every head), and on CPU a fused
kernel that is faster than the matmul path too. A plain causal prefill needs no mask at all (`is_causal`);
otherwise the mask is boolean and shared by all heads, built per chunk of queries to bound its size. Grouped
KV heads go in as they are (enable_gqa) wherever the kernel SDPA picks accepts them (`_native_gqa`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from . import kernels
from .kernels import native
from .quant import QTensor, as_float32, dequantize_key_range, dequantize_value_range

# Mask elements per chunk of queries where causal_attention needs an explicit mask: bounds the [b, 1, t_chunk, n]
# mask (SDPA turns a boolean mask into an additive one of the query's dtype: at most 64 MiB in float32).
_PREFILL_CHUNK_ELEMENTS = 1 << 24

# torch >= 2.5: SDPA takes fewer KV heads than query heads (enable_gqa); older versions need them repeated.
_SDPA_HAS_GQA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [b, H, t, d]; k, v [b, H_kv, n, d]; mask bool [b, t, n] or [b, H_kv, t, n] (True attends), or None.

    A row that sees no key (a padding query: nothing reads it) gets a finite output. Returns [b, t, H, d], the
    layout transformers' attention modules expect back.
    """
    if kernels.enabled(q) and kernels.decode_fits(q, k):
        return kernels.decode_attention(q, k, v, scaling, mask)
    b, num_heads, t, d = q.shape
    num_kv = k.shape[1]
    group = num_heads // num_kv
    # a KV head's query heads (and tokens) are rows of one query block, so SDPA needs no repeated KV heads
    qg = q.reshape(b, num_kv, group * t, d)
    if mask is not None:
        if mask.dim() == 3:
            mask = mask.unsqueeze(1)
        if t > 1:  # rows are (head in group, token): the token's mask repeats over the group
            mask = mask.unsqueeze(2).expand(-1, -1, group, -1, -1).flatten(2, 3)
        # additive, at the dtype's minimum: a boolean mask would give a row that sees nothing NaN
        mask = torch.where(mask, 0.0, torch.finfo(q.dtype).min)
        mask = mask if mask.dtype == q.dtype else mask.to(q.dtype)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scaling)  # [b, H_kv, g*t, d]
    return out.reshape(b, num_heads, t, d).transpose(1, 2)  # CUDA's backends may return it in another layout


@dataclass
class RestRange:
    """Which low-bit tokens join a decode step's softmax: n in [lo, hi) whose page is not resident.

    A page that is resident (held at full precision and attended through k/v) must not count a second time
    through its low-bit copy, and which pages are resident differs per KV head, hence `resident`, bool
    [b, H_kv, P] with P >= ceil(hi / page_size); page i holds tokens [i * page_size, (i + 1) * page_size).
    For `attend_buffer`, `resident` may be None and `slots` the buffer rows of its recalled pages (one page per
    `page_size` rows): a page is resident where a slot's first row holds its first token.
    """

    lo: int
    hi: int
    resident: torch.Tensor | None
    page_size: int
    valid: torch.Tensor | None = None  # [b, >= hi] bool: False for a sequence's padding (left padding)
    slots: slice | None = None

    def with_resident(self, positions: torch.Tensor) -> "RestRange":
        """This range with `resident` read from the slots' positions [b, H_kv, L] (where it is None)."""
        if self.resident is not None:
            return self
        size = self.page_size
        pages = -(-self.hi // size)
        first = positions[:, :, self.slots.start:self.slots.stop:size]  # a slot's first position, -1 if empty
        held = torch.where(first >= 0, first // size, pages).clamp_(max=pages)
        resident = torch.zeros((*held.shape[:2], pages + 1), dtype=torch.bool, device=held.device)
        return replace(self, resident=resident.scatter_(-1, held, True))


def _drop_resident(s_rest: torch.Tensor, rest: RestRange, b: int, num_kv: int) -> torch.Tensor:
    """Scores [b * H_kv, rows, hi - lo] of tokens [lo, hi) with those on resident pages at -inf (no weight).

    Each page's flag broadcasts over its tokens: through a [pages, page_size] view of the scores when the
    range is whole pages, else through an expanded [pages, page_size] mask cut to the range.
    """
    lo, hi, size = rest.lo, rest.hi, rest.page_size
    first, last = lo // size, -(-hi // size)
    held = rest.resident[:, :, first:last]
    if lo % size == 0 and hi % size == 0:
        pages = s_rest.view(b * num_kv, s_rest.shape[1], last - first, size)
        return pages.masked_fill(held.reshape(b * num_kv, 1, -1, 1), float("-inf")).flatten(2)
    held = held.unsqueeze(-1).expand(-1, -1, -1, size).flatten(2)[:, :, lo - first * size:hi - first * size]
    return s_rest.masked_fill(held.reshape(b * num_kv, 1, -1), float("-inf"))


def attend_mixed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, keys: QTensor,
                 values: QTensor, rest: RestRange, scaling: float, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention whose one softmax spans the full-precision k/v and the low-bit tokens `rest` selects.

    Pages that are not resident still get their share of attention, read from their low-bit copy, instead of
    none; one softmax (not two merged) keeps the weights of both parts comparable.

    q [b, H, t, d]; k, v [b, H_kv, L, d]; mask bool [b, t, L] or broadcastable to [b, H_kv, t, L] (True
    attends) or None: masked entries score float32 min as in `attend`, so a row with no visible key stays
    finite. keys: `quantize_keys` QTensor of [b, H_kv, N, d]; values: `quantize_values` QTensor of the same
    shape (their tensors may be views into larger buffers). Tokens of [rest.lo, rest.hi) whose page is not
    resident score q . k_hat * scaling; every other low-bit token gets no weight at all.
    scores: optional float32 [b, H_kv, g*t, >= hi], those raw low-bit scores with query rows grouped as in
    `attend`, from a caller that already computed them (to select pages); used instead of dequantizing the
    keys. Kernels ignore it. Returns [b, t, H, d] in q's dtype.
    """
    if keys.dim != 2 or values.dim != 3:
        raise ValueError(f"keys must be quantized per channel (dim 2) and values per token (dim 3), got dims "
                         f"{keys.dim} and {values.dim}")
    if kernels.enabled(q) and kernels.mixed_fits(q, k):
        return kernels.decode_attention_mixed(q, k, v, mask, keys, values, rest, scaling)
    lo, hi = rest.lo, rest.hi
    if hi <= lo:
        return attend(q, k, v, scaling, mask)
    b, num_heads, t, d = q.shape
    if kernels.native_enabled(q):  # the C kernels: scores of the packed keys, then one fused pass
        out = _native_mixed(q, k, v, scaling, keys, values, rest, scores, mask=mask)
        if out is not None:
            return out
    num_kv, n = k.shape[1], k.shape[2]
    rows, heads = num_heads // num_kv * t, b * num_kv
    # bmm over [b * H_kv, ...] views: torch.matmul of 4-d tensors adds an expand and a view per operand
    qg = q.reshape(heads, rows, d)
    s = as_float32(torch.bmm(qg, k.reshape(heads, n, d).transpose(1, 2))).mul_(scaling)
    if mask is not None:
        if mask.dim() == 3:
            mask = mask.unsqueeze(1)
        s = s.view(b, num_kv, -1, t, n).masked_fill(~mask.unsqueeze(2), torch.finfo(torch.float32).min)
        s = s.view(heads, rows, n)
    if scores is None:
        s_rest = as_float32(torch.bmm(qg, dequantize_key_range(keys, lo, hi).transpose(1, 2))).mul_(scaling)
    else:
        s_rest = scores[..., lo:hi].reshape(heads, rows, hi - lo)
    s_rest = _drop_resident(s_rest, rest, b, num_kv)
    if rest.valid is not None:  # a sequence's left padding gets no weight
        pad = ~rest.valid[:, lo:hi].view(b, 1, 1, hi - lo)
        s_rest = s_rest.view(b, num_kv, rows, hi - lo).masked_fill(pad, float("-inf")).view(heads, rows, hi - lo)
    probs = torch.cat((s, s_rest), dim=-1).softmax(dim=-1).to(v.dtype)
    out = torch.baddbmm(torch.bmm(probs[:, :, :n], v.reshape(heads, n, d)), probs[:, :, n:],
                        dequantize_value_range(values, lo, hi))
    return out.view(b, num_heads, t, d).transpose(1, 2)


def _native_mixed(q, k, v, scaling, keys, values, rest, scores, **visible) -> torch.Tensor | None:
    """attend_mixed / attend_buffer through the C kernels: the packed keys' scores (unless given), then one call."""
    if scores is None:
        scores = native.dequant_scores(q, keys.packed[:, :, :rest.hi], keys.scale, keys.zero, keys.bits,
                                       keys.group_size, scaling)
    out = None if scores is None else native.attention(q, k, v, scaling, valid=rest.valid, rest=rest, raw=scores,
                                                       values=values, **visible)
    return None if out is None else out.view(q.shape).transpose(1, 2)


def buffer_mask(positions: torch.Tensor, past: int, t: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Which rows of a buffer [b, h, L] with token positions (-1: empty) query token i, at position past + i,
    sees: bool [b, h, t, L]."""
    b, h, length = positions.shape
    pos = positions.unsqueeze(2)
    if t == 1:  # every stored position is at most the query's
        mask = pos >= 0
    else:  # the real token must not see the speculative one after it
        q_pos = torch.arange(past, past + t, device=positions.device).view(1, 1, t, 1)
        mask = (pos >= 0) & (pos <= q_pos)
    if valid is not None:
        mask = mask & valid.gather(1, positions.clamp(min=0).view(b, -1)).view(b, h, 1, length)
    return mask


def attend_buffer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, past: int,
                  scaling: float, valid: torch.Tensor | None = None, rest: RestRange | None = None,
                  keys: QTensor | None = None, values: QTensor | None = None,
                  scores: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention over a buffer whose rows carry their token positions (the retrieval engine's): `attend`
    under `buffer_mask(positions, past, t, valid)`, or with a `rest` (and its keys, values, scores) `attend_mixed`.
    On CPU one C kernel reads the positions itself; elsewhere the mask is built and the kernels above run."""
    t = q.shape[2]
    if kernels.native_enabled(q):
        if rest is None:
            out = native.attention(q, k, v, scaling, positions=positions, past=past, valid=valid)
            out = None if out is None else out.view(q.shape).transpose(1, 2)
        else:
            out = _native_mixed(q, k, v, scaling, keys, values, rest, scores, positions=positions, past=past)
        if out is not None:
            return out
    mask = buffer_mask(positions, past, t, valid)
    if rest is None:
        return attend(q, k, v, scaling, mask)
    return attend_mixed(q, k, v, mask, keys, values, rest.with_resident(positions), scaling, scores=scores)


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


def _native_gqa(q: torch.Tensor, masked: bool) -> bool:
    """Whether SDPA should get the KV heads as they are (enable_gqa) rather than repeated per query head.

    On CPU the fused kernel handles grouped heads with or without a mask. On CUDA only the flash kernel does
    (half precision, no mask); the memory-efficient kernel, which masked or float32 attention needs, rejects
    enable_gqa, and the math fallback it would get instead materializes [b, H, t, n] float scores (and repeats
    the heads itself).
    """
    if not _SDPA_HAS_GQA:
        return False
    if q.device.type != "cuda":
        return True
    return not masked and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


def _sdpa_mask(valid: torch.Tensor | None, t: int, n: int, q_offset: int, device) -> torch.Tensor | None:
    """`causal_mask` as SDPA's boolean attn_mask [b or 1, 1, t, n], with no row fully masked.

    A query that sees no key (a left-padding position at the start of the prompt) would have an all-False row,
    for which SDPA returns NaN or 0 depending on the backend and torch version. Such rows see the keys up to their
    own position instead (finite; their output is padding that no real query attends to), which is what they see
    however the prompt is cut into chunks: later layers' keys and values at padding positions, which page digests
    and low-bit groups take in, are then the same for a chunked prefill and a whole one. Every row with at least
    one visible key is unchanged, so real positions are exact.
    """
    mask = causal_mask(valid, t, n, q_offset, device)
    if mask is None:
        return None
    if valid is not None:
        blind = ~mask.any(dim=-1, keepdim=True)
        causal = causal_mask(None, t, n, q_offset, device)
        mask = mask | (blind if causal is None else blind & causal)
    return mask.unsqueeze(1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                     valid: torch.Tensor | None, q_offset: int) -> torch.Tensor:
    """Causal attention of t queries (at cache positions q_offset..q_offset+t-1) over n cached keys.

    q [b, H, t, d]; k, v [b, H_kv, n, d] with H a multiple of H_kv; valid [b, n] bool (False for padding) or
    None. Returns [b, t, H, d] like `attend`.

    Runs torch's scaled_dot_product_attention, so CUDA gets its fused flash / memory-efficient kernels (no [t, n]
    score matrix in memory) and CPU its fused kernel. A prefill from position 0 without padding uses
    `is_causal` and no mask; anything else (a later prefill chunk, padding) gets an explicit boolean mask, built
    for chunks of queries so that it stays within _PREFILL_CHUNK_ELEMENTS; each chunk drops the keys past its
    last query, which it cannot see.
    """
    b, num_heads, t, _ = q.shape
    n = k.shape[2]
    group = num_heads // k.shape[1]
    is_causal = valid is None and q_offset == 0 and t == n and t > 1
    masked = not is_causal and (valid is not None or q_offset < n - 1)
    gqa = {}
    if group > 1:
        if _native_gqa(q, masked):
            gqa["enable_gqa"] = True
        else:  # repeat KV heads once, for every chunk below
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)

    def sdpa(q_part, k_part, v_part, mask, causal=False):
        out = F.scaled_dot_product_attention(q_part, k_part, v_part, attn_mask=mask, is_causal=causal,
                                             scale=scaling, **gqa)
        return out.transpose(1, 2)

    if not masked:
        return sdpa(q, k, v, None, is_causal)
    chunk = max(1, _PREFILL_CHUNK_ELEMENTS // max(1, b * n))
    if chunk >= t:
        return sdpa(q, k, v, _sdpa_mask(valid, t, n, q_offset, q.device))
    outs = []
    for start in range(0, t, chunk):
        stop = min(t, start + chunk)
        kv_end = min(n, q_offset + stop)
        mask = _sdpa_mask(None if valid is None else valid[:, :kv_end], stop - start, kv_end, q_offset + start,
                          q.device)
        outs.append(sdpa(q[:, :, start:stop], k[:, :, :kv_end], v[:, :, :kv_end], mask))
    return torch.cat(outs, dim=1)
