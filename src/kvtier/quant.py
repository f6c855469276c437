"""Low-bit quantization of KV (KIVI-style): quantize, pack, dequantize, and growing per-layer low-bit stores
of keys and of values.

Asymmetric min/max quantization in groups. Keys are quantized per channel (a group is `group_size` tokens of
one channel: key outliers live in a few channels, so a channel must not share a scale with the others);
values per token (a group is `group_size` channels of one token). At 1 bit the two levels sit at a quarter
and three quarters of the group's range, not at its min and max (min/max levels inflate magnitudes; see the
SpeCache spec). Codes are stored packed, several to a byte, so the bytes counted are the bytes held.
This module knows nothing of storage, links or models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .link import nbytes
from .sizes import grown

BITS = (1, 2, 4)


def as_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32; x itself when it already is (`.float()` would still dispatch an op, a step's op count)."""
    return x if x.dtype == torch.float32 else x.float()


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")


def packed_size(n: int, bits: int) -> int:
    """Bytes holding n codes of `bits` bits: ceil(n * bits / 8)."""
    _check_bits(bits)
    return -(-n * bits // 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] (each < 2**bits) -> packed uint8 [..., ceil(n*bits/8)], along the last dim.

    Code i of a row goes to byte i // (8/bits), at bit offset (i % (8/bits)) * bits (lowest bits first).
    Bits of a code above `bits` are dropped rather than checked: checking would cost a device sync.
    """
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    per = 8 // bits
    n = codes.shape[-1]
    m = packed_size(n, bits)
    if m * per != n:
        codes = torch.nn.functional.pad(codes, (0, m * per - n))
    c = codes.reshape(*codes.shape[:-1], m, per) & ((1 << bits) - 1)
    out = c[..., 0].clone()
    for i in range(1, per):
        out |= c[..., i] << (i * bits)
    return out


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: packed uint8 [..., ceil(n*bits/8)] -> codes uint8 [..., n]."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_size(n, bits):
        raise ValueError(f"{packed.shape[-1]} bytes cannot hold exactly {n} codes of {bits} bits "
                         f"(expected {packed_size(n, bits)})")
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.flatten(-2)[..., :n]


@dataclass
class QTensor:
    """A quantized tensor: packed codes plus one scale and one zero per group.

    `packed` holds the codes in x's own layout, packed along the last dim ([..., ceil(last*bits/8)]), so a
    token's codes stay a row that can be indexed. `scale` and `zero` have x's shape with `dim` replaced by the
    number of groups, and x's dtype (at float16 that is 2 + 2 bytes per group; they are computed in float32
    and rounded once, and the codes are computed against the rounded values so they agree with dequantize).
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    dim: int
    group_size: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    def dequantize(self) -> torch.Tensor:
        """codes * scale + zero, in float32 (one rounding to `dtype`), original shape and dtype."""
        work = torch.promote_types(self.dtype, torch.float32)
        codes = unpack(self.packed, self.bits, self.shape[-1]).to(work)
        groups = self.shape[self.dim] // self.group_size
        codes = codes.unflatten(self.dim, (groups, self.group_size))
        scale = self.scale.to(work).unsqueeze(self.dim + 1)
        zero = self.zero.to(work).unsqueeze(self.dim + 1)
        return torch.addcmul(zero, codes, scale).flatten(self.dim, self.dim + 1).to(self.dtype)

    @property
    def nbytes(self) -> int:
        """Exact bytes held: packed codes + scales + zeros."""
        return sum(nbytes(t) for t in self.tensors())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.packed, self.scale, self.zero


# (bits, device) -> float32 [256, 8 // bits]: the codes of every byte value, for `unpack_float`
_CODE_TABLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def unpack_float(packed: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """packed uint8 [..., ceil(d*bits/8)] -> float32 codes [..., d], as `unpack` lays them out.

    One table lookup per byte: fewer torch ops than shifting, masking and converting (this runs every decode
    step), and the codes come out as floats, ready to be scaled.
    """
    table = _CODE_TABLES.get((bits, packed.device))
    if table is None:
        shifts = torch.arange(0, 8, bits)
        table = ((torch.arange(256)[:, None] >> shifts) & ((1 << bits) - 1)).float().to(packed.device)
        _CODE_TABLES[bits, packed.device] = table
    codes = torch.nn.functional.embedding(packed.int(), table).flatten(-2)
    return codes if codes.shape[-1] == d else codes[..., :d]


def dequantize_key_range(keys: QTensor, lo: int, hi: int) -> torch.Tensor:
    """Tokens [lo, hi) of per-channel keys [b, h, N, d] as [b * h, hi - lo, d], rounded once as
    QTensor.dequantize does.

    Whole key groups are dequantized (their scale then broadcasts over the group's tokens without a copy) and
    the result is cut to [lo, hi): at most two partial groups of extra work.
    """
    size, d = keys.group_size, keys.shape[-1]
    first, last = lo // size, -(-hi // size)
    codes = unpack_float(keys.packed[:, :, first * size:last * size], keys.bits, d)
    k_hat = torch.addcmul(keys.zero[:, :, first:last, None], codes.unflatten(2, (last - first, size)),
                          keys.scale[:, :, first:last, None]).view(-1, (last - first) * size, d)
    if lo > first * size or hi < last * size:
        k_hat = k_hat[:, lo - first * size:hi - first * size]
    return k_hat.to(keys.dtype)


def dequantize_value_range(values: QTensor, lo: int, hi: int) -> torch.Tensor:
    """Tokens [lo, hi) of per-token values [b, h, N, d] as [b * h, hi - lo, d], rounded once as
    QTensor.dequantize does."""
    d = values.shape[-1]
    codes = unpack_float(values.packed[:, :, lo:hi], values.bits, d)
    v_hat = torch.addcmul(values.zero[:, :, lo:hi, :, None], codes.unflatten(3, (-1, values.group_size)),
                          values.scale[:, :, lo:hi, :, None])
    return v_hat.view(-1, hi - lo, d).to(values.dtype)


def quantize(x: torch.Tensor, bits: int, dim: int, group_size: int) -> QTensor:
    """Quantize x to `bits` bits in groups of `group_size` consecutive elements along `dim`.

    Per group, with lo/hi its min/max: 2 and 4 bits use zero = lo, scale = (hi - lo) / (2**bits - 1);
    1 bit uses zero = (3 lo + hi) / 4, scale = (hi - lo) / 2, i.e. levels (3lo+hi)/4 and (lo+3hi)/4.
    codes = clamp(round((x - zero) / scale), 0, 2**bits - 1). A constant group has scale 0 and codes 0, so
    it dequantizes to exactly its constant (at 1 bit (3c + c)/4 == c exactly in float32).
    """
    _check_bits(bits)
    if not x.is_floating_point():
        raise ValueError(f"can only quantize floating point tensors, got {x.dtype}")
    if x.dim() == 0 or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for a tensor of shape {tuple(x.shape)}")
    dim %= x.dim()
    size = x.shape[dim]
    if not isinstance(group_size, int) or group_size < 1 or size % group_size:
        raise ValueError(f"group_size {group_size!r} does not divide dim {dim} of size {size} "
                         f"(shape {tuple(x.shape)})")
    work = torch.promote_types(x.dtype, torch.float32)
    grouped = x.to(work).unflatten(dim, (size // group_size, group_size))
    lo = grouped.amin(dim + 1, keepdim=True)
    hi = grouped.amax(dim + 1, keepdim=True)
    if bits == 1:
        zero, scale = (3 * lo + hi) / 4, (hi - lo) / 2
    else:
        zero, scale = lo, (hi - lo) / (2 ** bits - 1)
    zero, scale = zero.to(x.dtype), scale.to(x.dtype)
    z, s = zero.to(work), scale.to(work)
    # scale 0 (constant group, or a range below x.dtype's resolution): any code dequantizes to `zero`
    s = torch.where(s > 0, s, torch.ones_like(s))
    codes = ((grouped - z) / s).round_().clamp_(0, 2 ** bits - 1).to(torch.uint8)
    return QTensor(pack(codes.flatten(dim, dim + 1), bits), scale.squeeze(dim + 1), zero.squeeze(dim + 1),
                   bits, dim, group_size, tuple(x.shape), x.dtype)


def quantize_keys(k: torch.Tensor, bits: int, group_size: int) -> QTensor:
    """Keys [b, h, n, d], per channel: groups of `group_size` tokens along n, one scale/zero per (group, channel)."""
    if k.dim() != 4:
        raise ValueError(f"keys must be [b, h, n, d], got shape {tuple(k.shape)}")
    return quantize(k, bits, 2, group_size)


def quantize_values(v: torch.Tensor, bits: int, group_size: int) -> QTensor:
    """Values [b, h, n, d], per token: groups of `group_size` channels along d (must divide d; callers
    with a small head pass min(group_size, d), or a divisor of d)."""
    if v.dim() != 4:
        raise ValueError(f"values must be [b, h, n, d], got shape {tuple(v.shape)}")
    return quantize(v, bits, 3, group_size)


class _Reserved:
    """A store whose buffers grow to the length given by `reserve` in one step, and past it with a margin."""

    reserved = 0

    def reserve(self, tokens: int) -> None:
        """Size the buffers for `tokens` once, instead of growing them with a margin (which is held memory)."""
        self.reserved = max(self.reserved, tokens)


class LowBitKeys(_Reserved):
    """One layer's growing low-bit copy of keys alone, for scoring (the retrieval engine's `scorer="lowbit"`).

    Keys arrive in blocks; every whole group of `group_size` tokens is quantized per channel (as
    `quantize_keys`) into buffers that grow with a margin, and the remainder waits in full precision until
    its group fills. `quantized()` is a QTensor view of the quantized prefix, so a scoring kernel reads one
    tensor however many groups were added. Quantization never depends on how keys were split into appends.
    """

    def __init__(self, bits: int = 2, group_size: int = 64):
        _check_bits(bits)
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        self.bits, self.group_size = bits, group_size
        self.quantized_tokens = 0
        self.pending: torch.Tensor | None = None  # [b, h, < group_size, d] full precision
        self.packed: torch.Tensor | None = None  # [b, h, capacity, ceil(d*bits/8)]
        self.scale: torch.Tensor | None = None  # [b, h, capacity / group_size, d]
        self.zero: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return self.quantized_tokens + (0 if self.pending is None else self.pending.shape[2])

    def append(self, k: torch.Tensor) -> None:
        """Append keys [b, h, t, d]."""
        if k.dim() != 4 or not k.is_floating_point():
            raise ValueError(f"keys must be floating point [b, h, t, d], got {k.dtype} {tuple(k.shape)}")
        if self.pending is None:
            self.pending = k.new_empty((*k.shape[:2], 0, k.shape[3]))
        elif (k.shape[:2], k.shape[3], k.dtype) != (self.pending.shape[:2], self.pending.shape[3], self.pending.dtype):
            raise ValueError(f"appended keys {tuple(k.shape)} {k.dtype} do not match the layer's "
                             f"{tuple(self.pending.shape)} {self.pending.dtype} (b, h, d and dtype must agree)")
        keys = torch.cat((self.pending, k), dim=2)
        flush = keys.shape[2] // self.group_size * self.group_size
        if flush:
            q = quantize_keys(keys[:, :, :flush], self.bits, self.group_size)
            self._grow(self.quantized_tokens + flush, q)
            n, g = self.quantized_tokens, self.quantized_tokens // self.group_size
            self.packed[:, :, n:n + flush] = q.packed
            self.scale[:, :, g:g + flush // self.group_size] = q.scale
            self.zero[:, :, g:g + flush // self.group_size] = q.zero
            self.quantized_tokens += flush
        self.pending = keys[:, :, flush:].clone()  # not a view: it would keep the whole block alive

    def _grow(self, tokens: int, like: QTensor) -> None:
        capacity = 0 if self.packed is None else self.packed.shape[2]
        if tokens <= capacity:
            return
        groups = grown(tokens, self.reserved, self.group_size) // self.group_size
        n, g = self.quantized_tokens, self.quantized_tokens // self.group_size
        self.packed = _regrown(self.packed, like.packed, n, groups * self.group_size)
        self.scale = _regrown(self.scale, like.scale, g, groups)
        self.zero = _regrown(self.zero, like.zero, g, groups)

    def quantized(self) -> QTensor | None:
        """The quantized prefix [b, h, quantized_tokens, d] as a QTensor of views (None before the first group)."""
        if not self.quantized_tokens:
            return None
        n, g = self.quantized_tokens, self.quantized_tokens // self.group_size
        b, h, _, d = self.pending.shape
        return QTensor(self.packed[:, :, :n], self.scale[:, :, :g], self.zero[:, :, :g], self.bits, 2,
                       self.group_size, (b, h, n, d), self.pending.dtype)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Everything held (buffers at their allocated capacity, and the full-precision remainder)."""
        return tuple(t for t in (self.packed, self.scale, self.zero, self.pending) if t is not None)

    def nbytes(self) -> int:
        return sum(nbytes(t) for t in self.tensors())


class LowBitValues(_Reserved):
    """One layer's growing low-bit copy of values alone (the retrieval engine's `rest="lowbit"`, beside
    `LowBitKeys`).

    Values are quantized per token (as `quantize_values`, groups of `group_size` channels), so every appended
    block is quantized at once, with no full-precision remainder, into buffers that grow with a margin.
    """

    def __init__(self, bits: int = 2, group_size: int = 64):
        _check_bits(bits)
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        self.bits, self.group_size = bits, group_size
        self.tokens = 0
        self.packed: torch.Tensor | None = None  # [b, h, capacity, ceil(d*bits/8)]
        self.scale: torch.Tensor | None = None  # [b, h, capacity, d / group_size]
        self.zero: torch.Tensor | None = None
        self.shape: tuple[int, int, int] | None = None  # b, h, d
        self.dtype: torch.dtype | None = None

    def append(self, v: torch.Tensor) -> None:
        """Append values [b, h, t, d]."""
        if v.dim() != 4 or not v.is_floating_point():
            raise ValueError(f"values must be floating point [b, h, t, d], got {v.dtype} {tuple(v.shape)}")
        if self.shape is None:
            if v.shape[3] % self.group_size:
                raise ValueError(f"value group_size {self.group_size} does not divide head_dim {v.shape[3]}")
            self.shape, self.dtype = (v.shape[0], v.shape[1], v.shape[3]), v.dtype
        elif (v.shape[0], v.shape[1], v.shape[3]) != self.shape or v.dtype != self.dtype:
            raise ValueError(f"appended values {tuple(v.shape)} {v.dtype} do not match the layer's "
                             f"[b, h, d] {self.shape} {self.dtype}")
        t = v.shape[2]
        if not t:
            return
        q = quantize_values(v, self.bits, self.group_size)
        n = self.tokens
        capacity = 0 if self.packed is None else self.packed.shape[2]
        if n + t > capacity:
            capacity = grown(n + t, self.reserved)
            self.packed = _regrown(self.packed, q.packed, n, capacity)
            self.scale = _regrown(self.scale, q.scale, n, capacity)
            self.zero = _regrown(self.zero, q.zero, n, capacity)
        self.packed[:, :, n:n + t], self.scale[:, :, n:n + t], self.zero[:, :, n:n + t] = q.packed, q.scale, q.zero
        self.tokens = n + t

    def quantized(self) -> QTensor | None:
        """All values appended so far [b, h, tokens, d] as a QTensor of views (None before the first)."""
        if not self.tokens:
            return None
        n = self.tokens
        b, h, d = self.shape
        return QTensor(self.packed[:, :, :n], self.scale[:, :, :n], self.zero[:, :, :n], self.bits, 3,
                       self.group_size, (b, h, n, d), self.dtype)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Everything held (buffers at their allocated capacity)."""
        return tuple(t for t in (self.packed, self.scale, self.zero) if t is not None)

    def nbytes(self) -> int:
        return sum(nbytes(t) for t in self.tensors())


def _regrown(old: torch.Tensor | None, like: torch.Tensor, used: int, rows: int) -> torch.Tensor:
    """A zeroed buffer shaped as `like` but with `rows` rows along dim 2, holding old's first `used` rows."""
    grown = like.new_zeros((*like.shape[:2], rows, *like.shape[3:]))
    if used:
        grown[:, :, :used] = old[:, :, :used]
    return grown
