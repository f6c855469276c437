"""Low-bit quantization (kvtier.quant): packing, the 1/2/4-bit rules, KIVI grouping, the low-bit key and value
stores (CPU)."""

from __future__ import annotations

import pytest
import torch

from kvtier.quant import (LowBitKeys, LowBitValues, QTensor, pack, packed_size, quantize, quantize_keys, quantize_values,
                          unpack)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def group_range(x, dim, group_size):
    """Per-element (max - min) of the element's group along dim, broadcast back to x's shape."""
    g = x.float().unflatten(dim, (x.shape[dim] // group_size, group_size))
    r = g.amax(dim + 1, keepdim=True) - g.amin(dim + 1, keepdim=True)
    return r.expand_as(g).flatten(dim, dim + 1)


LEVELS = {1: 2, 2: 3, 4: 15}  # scale = range / LEVELS[bits]


def codes_of(q: QTensor) -> torch.Tensor:
    return unpack(q.packed, q.bits, q.shape[-1])


# -- pack / unpack ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("n", [0, 1, 3, 7, 8, 9, 17, 64, 130])
def test_pack_round_trip(bits, n):
    g = torch.Generator().manual_seed(n * 10 + bits)
    codes = torch.randint(0, 2 ** bits, (2, 3, n), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (2, 3, -(-n * bits // 8)) == (2, 3, packed_size(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)


def test_pack_layout_is_dense():
    # every code value at every position survives, and the bytes are fully used (no byte per code)
    codes = torch.tensor([3, 0, 1, 2, 2, 1, 0, 3], dtype=torch.uint8)
    assert pack(codes, 2).tolist() == [3 | 0 << 2 | 1 << 4 | 2 << 6, 2 | 1 << 2 | 0 << 4 | 3 << 6]
    assert pack(torch.ones(16, dtype=torch.uint8), 1).tolist() == [255, 255]


# -- quantize: the per-bit rules ---------------------------------------------------------------------------

def test_two_bit_error_bound_range_and_levels():
    x = randn(4, 6, 256, seed=1)
    q = quantize(x, 2, dim=-1, group_size=64)
    xh = q.dequantize()
    assert xh.shape == x.shape and xh.dtype == x.dtype
    g = x.unflatten(-1, (4, 64))
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    gh = xh.unflatten(-1, (4, 64))
    eps = 1e-5
    assert (gh >= lo - eps).all() and (gh <= hi + eps).all()
    scale = q.scale.unsqueeze(-1)
    assert torch.allclose(scale, (hi - lo) / 3) and torch.equal(q.zero.unsqueeze(-1), lo)
    assert ((gh - g).abs() <= scale / 2 + eps).all()
    assert codes_of(q).max() == 3


def test_two_bit_ramp_hits_all_four_levels():
    x = torch.linspace(-1.0, 2.0, 64).repeat(3, 1)
    q = quantize(x, 2, dim=1, group_size=64)
    codes = codes_of(q)
    for row in codes:
        assert sorted(set(row.tolist())) == [0, 1, 2, 3]
    # the ramp's ends are reproduced exactly-ish: min -> code 0, max -> code 3
    assert codes[:, 0].eq(0).all() and codes[:, -1].eq(3).all()


def test_four_bit_rule():
    x = randn(3, 128, seed=2)
    q = quantize(x, 4, dim=1, group_size=32)
    g = x.unflatten(1, (4, 32))
    lo, hi = g.amin(-1), g.amax(-1)
    assert torch.allclose(q.scale, (hi - lo) / 15) and torch.equal(q.zero, lo)
    assert ((q.dequantize() - x).abs() <= group_range(x, 1, 32) / 30 + 1e-5).all()
    assert codes_of(q).max() == 15


def naive_one_bit(x, dim, group_size):
    """Plain min/max 1-bit: levels min and max (what the shifted rule is meant to beat)."""
    g = x.unflatten(dim, (x.shape[dim] // group_size, group_size))
    lo, hi = g.amin(dim + 1, keepdim=True), g.amax(dim + 1, keepdim=True)
    return torch.where(g - lo >= (hi - lo) / 2, hi, lo).flatten(dim, dim + 1)


def test_one_bit_shifted_levels():
    x = randn(8, 4, 64, seed=3)
    q = quantize(x, 1, dim=2, group_size=32)
    xh = q.dequantize()
    g, gh = x.unflatten(2, (2, 32)), xh.unflatten(2, (2, 32))
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    low, high = (3 * lo + hi) / 4, (lo + 3 * hi) / 4
    assert torch.allclose(q.zero.unsqueeze(-1), low) and torch.allclose(q.scale.unsqueeze(-1), (hi - lo) / 2)
    at_low, at_high = torch.isclose(gh, low.expand_as(gh)), torch.isclose(gh, high.expand_as(gh))
    assert (at_low | at_high).all() and at_low.any() and at_high.any()
    # the threshold is the group midpoint
    assert torch.equal(at_high, g > (lo + hi) / 2)
    assert ((gh - g).abs() <= (hi - lo) / 4 + 1e-5).all()


def test_one_bit_shift_beats_naive_min_max():
    x = randn(16, 8, 1024, seed=4)
    shifted = quantize(x, 1, dim=2, group_size=64).dequantize()
    naive = naive_one_bit(x, 2, 64)
    mse_shifted, mse_naive = (shifted - x).pow(2).mean(), (naive - x).pow(2).mean()
    assert mse_shifted < 0.5 * mse_naive
    # min/max levels inflate magnitudes; the shifted levels do not (much)
    mag, mag_shifted, mag_naive = x.abs().mean(), shifted.abs().mean(), naive.abs().mean()
    assert mag_naive > 1.5 * mag
    assert abs(mag_shifted - mag) < abs(mag_naive - mag) / 3


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_constant_groups_are_exact(bits, dtype):
    x = randn(2, 3, 128, 8, seed=5, dtype=dtype)
    x[:, :, :64] = 1.375  # the first group of tokens of every channel is constant
    x[0, 1] = -7.25       # a whole (sequence, head) constant
    x[1, 2] = 0.0
    q = quantize_keys(x, bits, 64)
    xh = q.dequantize()
    assert not xh.isnan().any() and not q.scale.isnan().any()
    assert torch.equal(xh[:, :, :64], x[:, :, :64])
    assert torch.equal(xh[0, 1], x[0, 1]) and torch.equal(xh[1, 2], x[1, 2])
    assert codes_of(q)[:, :, :64].eq(0).all()  # scale 0 is guarded: no 0/0 cast to a code
    assert not torch.equal(xh, x)  # the random groups are not exact, so the equalities above are earned


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtype_kept(dtype):
    x = randn(1, 2, 64, 16, seed=6, dtype=dtype)
    q = quantize_values(x, 2, 16)
    assert q.scale.dtype == q.zero.dtype == dtype
    assert q.dequantize().dtype == dtype and q.dequantize().shape == x.shape
    # codes were computed against the rounded scale/zero: the error bound holds in the stored precision
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}[dtype]
    err = (q.dequantize().float() - x.float()).abs()
    assert (err <= group_range(x, 3, 16) / 6 + tol * (1 + x.float().abs())).all()


# -- KIVI grouping -----------------------------------------------------------------------------------------

def test_keys_per_channel_isolate_an_outlier_channel():
    k = randn(1, 2, 128, 16, seed=7)
    spiked = k.clone()
    spiked[..., 5] *= 100.0
    err = (quantize_keys(k, 2, 64).dequantize() - k).abs()
    err_spiked = (quantize_keys(spiked, 2, 64).dequantize() - spiked).abs()
    others = [c for c in range(16) if c != 5]
    assert torch.equal(err_spiked[..., others], err[..., others])
    # the same outlier under per-token grouping ruins every channel: the test above can fail
    err_token = (quantize_values(spiked, 2, 16).dequantize() - spiked).abs()
    assert err_token[..., others].mean() > 3 * err[..., others].mean()


def test_values_per_token_isolate_an_outlier_token():
    v = randn(1, 2, 128, 16, seed=8)
    spiked = v.clone()
    spiked[:, :, 37] *= 100.0
    err = (quantize_values(v, 2, 16).dequantize() - v).abs()
    err_spiked = (quantize_values(spiked, 2, 16).dequantize() - spiked).abs()
    others = [t for t in range(128) if t != 37]
    assert torch.equal(err_spiked[:, :, others], err[:, :, others])
    err_channel = (quantize_keys(spiked, 2, 64).dequantize() - spiked).abs()
    assert err_channel[:, :, others].mean() > 3 * err[:, :, others].mean()


def test_key_and_value_group_shapes():
    x = randn(2, 3, 128, 64, seed=9)
    qk, qv = quantize_keys(x, 2, 32), quantize_values(x, 2, 16)
    assert qk.scale.shape == qk.zero.shape == (2, 3, 4, 64)   # (token group, channel)
    assert qv.scale.shape == qv.zero.shape == (2, 3, 128, 4)  # (token, channel group)
    assert qk.packed.shape == qv.packed.shape == (2, 3, 128, 16)


# -- footprint ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 4])
def test_nbytes_is_the_packed_size(bits):
    b, h, n, d, group = 2, 4, 256, 128, 64
    x = randn(b, h, n, d, seed=10, dtype=torch.float16)
    fp16 = x.numel() * 2
    # bits per element: the code, plus a float16 scale and zero shared by `group` elements
    ratio = (bits + 2 * 16 / group) / 16
    for q in (quantize_keys(x, bits, group), quantize_values(x, bits, group)):
        assert q.nbytes == sum(t.numel() * t.element_size() for t in q.tensors())
        assert q.packed.numel() == x.numel() * bits // 8
        assert abs(q.nbytes / fp16 - ratio) < 1e-3
    if bits == 1:
        assert abs(ratio - 0.094) < 1e-3  # 1 bit + a float16 scale and zero per 64 elements: 1.5 bits, ~0.094 of fp16
    if bits == 2:
        assert ratio == 2.5 / 16


def test_odd_last_dim_packs_per_row():
    x = randn(3, 5, 10, seed=11)  # 10 codes of 1 bit per row -> 2 bytes per row
    q = quantize(x, 1, dim=1, group_size=5)
    assert q.packed.shape == (3, 5, 2)
    assert q.nbytes == 3 * 5 * 2 + 2 * (3 * 1 * 10 * 4)
    assert ((q.dequantize() - x).abs() <= group_range(x, 1, 5) / 4 + 1e-5).all()


# -- bad inputs --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [0, 3, 8, 16])
def test_bad_bits(bits):
    x = randn(1, 1, 64, 8)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize(x, bits, 2, 64)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack(torch.zeros(8, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="bits must be one of"):
        LowBitKeys(bits, 64)
    with pytest.raises(ValueError, match="bits must be one of"):
        LowBitValues(bits, 64)


def test_bad_groups_and_inputs():
    x = randn(1, 1, 96, 24)
    with pytest.raises(ValueError, match="does not divide dim 2 of size 96"):
        quantize_keys(x, 2, 64)
    with pytest.raises(ValueError, match="does not divide dim 3 of size 24"):
        quantize_values(x, 2, 16)
    with pytest.raises(ValueError, match="does not divide"):
        quantize(x, 2, 2, 0)
    with pytest.raises(ValueError, match="floating point"):
        quantize(torch.ones(4, 8, dtype=torch.int32), 2, 1, 4)
    with pytest.raises(ValueError, match="out of range"):
        quantize(x, 2, 4, 8)
    with pytest.raises(ValueError, match=r"\[b, h, n, d\]"):
        quantize_keys(x[0], 2, 8)
    with pytest.raises(ValueError, match="cannot hold exactly"):
        unpack(torch.zeros(3, dtype=torch.uint8), 2, 8)
    with pytest.raises(ValueError, match="value group_size 64 does not divide head_dim 24"):
        LowBitValues(2, 64).append(x)
    for store in (LowBitKeys, LowBitValues):
        with pytest.raises(ValueError, match="group_size must be a positive int"):
            store(2, 0)


# -- LowBitKeys / LowBitValues -----------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 4])
def test_lowbit_stores_do_not_depend_on_how_tokens_were_split(bits):
    b, h, n, d, group = 2, 3, 150, 32, 16
    k, v = randn(b, h, n, d, seed=12), randn(b, h, n, d, seed=13)
    outs = []
    for sizes in ([n], [37, 1, 0, 50, 62], [1] * n):
        keys, values = LowBitKeys(bits, group), LowBitValues(bits, group)
        start = 0
        for size in sizes:
            keys.append(k[:, :, start:start + size])
            values.append(v[:, :, start:start + size])
            start += size
        assert keys.tokens == values.tokens == n
        assert keys.quantized_tokens == n // group * group
        assert torch.equal(keys.pending, k[:, :, keys.quantized_tokens:])
        outs.append((keys.quantized(), values.quantized()))
    for qk, qv in outs[1:]:
        for a, c in ((qk, outs[0][0]), (qv, outs[0][1])):
            assert torch.equal(a.packed, c.packed) and torch.equal(a.scale, c.scale)
            assert torch.equal(a.zero, c.zero)
    # the error bound of the group's scale, per channel for keys and per token for values
    qk, qv = outs[0]
    nq = qk.shape[2]
    k_bound = group_range(k[:, :, :nq], 2, group) / (2 * LEVELS[bits]) + 1e-5
    v_bound = group_range(v, 3, group) / (2 * LEVELS[bits]) + 1e-5
    assert ((qk.dequantize() - k[:, :, :nq]).abs() <= k_bound).all()
    assert ((qv.dequantize() - v).abs() <= v_bound).all()
    assert (qk.dequantize() != k[:, :, :nq]).any()
