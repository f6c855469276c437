"""attend_mixed (one softmax over full-precision KV and low-bit rest tokens) against a naive reference, and its
Triton kernel (kernels.decode_attention_mixed) against attend_mixed.

The naive reference dequantizes everything with QTensor.dequantize, decides which low-bit tokens take part with
plain Python loops, and runs `attend` over the concatenated KV with a joint mask. It gives a row in which
nothing at all may be attended a uniform average over every key (attend_mixed averages the full-precision keys
only: excluded low-bit tokens get no weight), so the cases that compare with it keep one rest token per KV
head; rows with nothing to attend are checked against `attend` itself. Kernel shapes are small (the CPU runs
triton's interpreter) with odd lengths and unaligned ranges, so partial tiles are exercised.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import KERNEL_DEVICE, KERNEL_TOL, assert_close, randn
from torch.utils._python_dispatch import TorchDispatchMode

from kvtier import kernels
from kvtier.attention import RestRange, attend, attend_mixed
from kvtier.quant import LowBitKeys, LowBitValues, QTensor, quantize_keys, quantize_values

DEVICE = KERNEL_DEVICE
TOL = KERNEL_TOL


@pytest.fixture(autouse=True)
def _torch_references(torch_references):
    pass



def naive(q, k, v, mask, keys, values, rest, scaling):
    b, _, t, _ = q.shape
    num_kv, n = k.shape[1], k.shape[2]
    k_hat, v_hat = keys.dequantize(), values.dequantize()
    tokens = k_hat.shape[2]
    resident = rest.resident.tolist()
    take = torch.zeros(b, num_kv, tokens, dtype=torch.bool)
    for i in range(b):
        for h in range(num_kv):
            for x in range(rest.lo, rest.hi):
                take[i, h, x] = not resident[i][h][x // rest.page_size] and \
                    (rest.valid is None or bool(rest.valid[i, x]))
    if mask is None:
        mask = torch.ones(b, num_kv, t, n, dtype=torch.bool)
    elif mask.dim() == 3:
        mask = mask.unsqueeze(1)
    joint = torch.cat((mask.cpu().expand(b, num_kv, t, n), take[:, :, None].expand(b, num_kv, t, tokens)), dim=-1)
    return attend(q, torch.cat((k, k_hat), 2), torch.cat((v, v_hat), 2), scaling, joint.to(q.device))


def make_mask(kind, b, kv, t, n, seed):
    gen = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "rows":  # [b, t, n], with one fully masked row (a left-padding query)
        mask = torch.rand(b, t, n, generator=gen) > 0.3
        mask[-1, 0] = False
    elif kind == "batch":  # [b, 1, t, n], shared by the KV heads, with one fully masked row
        mask = torch.rand(b, 1, t, n, generator=gen) > 0.3
        mask[0, 0, -1] = False
    else:  # [1, kv, t, n], broadcast over the batch
        mask = torch.rand(1, kv, t, n, generator=gen) > 0.5
    return mask.to(DEVICE)


def lowbit(x, bits, group_size, per_channel, sliced):
    """quantize_keys / quantize_values of x; sliced: as views of the first tokens of a larger quantized buffer."""
    quantize = quantize_keys if per_channel else quantize_values
    if not sliced:
        return quantize(x, bits, group_size)
    b, h, n, d = x.shape
    extra = randn(b, h, 2 * group_size if per_channel else 5, d, dtype=x.dtype, seed=99)
    big = quantize(torch.cat((x, extra), dim=2), bits, group_size)
    rows = n // group_size if per_channel else n
    return QTensor(big.packed[:, :, :n], big.scale[:, :, :rows], big.zero[:, :, :rows], bits, big.dim,
                   group_size, tuple(x.shape), x.dtype)


def make_case(b, kv, group, t, n, d, tokens, bits, key_group, value_group, dtype, lo, hi, page, mask,
              sliced=False, seed=0, padded=False):
    q = randn(b, kv * group, t, d, dtype=dtype, seed=seed + 1)
    k, v = randn(b, kv, n, d, dtype=dtype, seed=seed + 2), randn(b, kv, n, d, dtype=dtype, seed=seed + 3)
    keys = lowbit(randn(b, kv, tokens, d, dtype=dtype, seed=seed + 4), bits, key_group, True, sliced)
    values = lowbit(randn(b, kv, tokens, d, dtype=dtype, seed=seed + 5), bits, value_group, False, sliced)
    pages = -(-hi // page) + 2  # more pages than the range covers, as a caller's table may hold
    resident = torch.rand(b, kv, pages, generator=torch.Generator().manual_seed(seed + 6)) > 0.5
    resident[:, :, lo // page] = False  # every KV head keeps a rest token: see the module docstring
    valid = None
    if padded:  # the last sequence is left-padded over a third of the range: its padding gets no weight
        valid = torch.ones(b, tokens + 3, dtype=torch.bool)
        valid[-1, :lo + (hi - lo) // 3] = False
        valid = valid.to(DEVICE)
    rest = RestRange(lo, hi, resident.to(DEVICE), page, valid)
    return q, k, v, make_mask(mask, b, kv, t, n, seed + 7), keys, values, rest


# -- the PyTorch reference -------------------------------------------------------------------------------------
REFERENCE_CASES = [  # batch, kv heads, group, query tokens, keys, head dim, low-bit tokens, bits, key group,
    # value group, dtype, lo, hi, page size, mask
    (2, 2, 1, 1, 9, 32, 128, 2, 32, 32, torch.float32, 0, 128, 16, None),
    (1, 2, 3, 2, 17, 64, 192, 1, 64, 16, torch.float32, 24, 150, 8, "rows"),
    (2, 1, 4, 1, 33, 64, 96, 4, 8, 64, torch.float16, 5, 91, 4, "heads"),
    (2, 2, 3, 1, 1, 32, 64, 2, 8, 8, torch.float16, 16, 48, 16, "batch"),
    (1, 3, 4, 2, 12, 64, 256, 4, 64, 32, torch.float32, 64, 256, 32, "rows"),
    (2, 2, 4, 2, 5, 32, 72, 1, 8, 32, torch.float16, 3, 70, 5, "batch"),
]


@pytest.mark.parametrize("sliced", [False, True])
@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_reference_matches_naive(case, sliced):
    q, k, v, mask, keys, values, rest = make_case(*case, sliced=sliced)
    scaling = q.shape[-1] ** -0.5
    out = attend_mixed(q, k, v, mask, keys, values, rest, scaling)
    assert out.shape == (q.shape[0], q.shape[2], q.shape[1], q.shape[3]) and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    assert_close(out, naive(q, k, v, mask, keys, values, rest, scaling))


@pytest.mark.parametrize("case", REFERENCE_CASES[:3])
def test_left_padding_of_the_rest_gets_no_weight(case):
    q, k, v, mask, keys, values, rest = make_case(*case, padded=True)
    scaling = q.shape[-1] ** -0.5
    assert_close(attend_mixed(q, k, v, mask, keys, values, rest, scaling),
                 naive(q, k, v, mask, keys, values, rest, scaling))


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_precomputed_scores_give_the_same_attention(case):
    q, k, v, mask, keys, values, rest = make_case(*case, sliced=True)
    b, num_heads, t, d = q.shape
    num_kv = k.shape[1]
    scaling = d ** -0.5
    qg = q.reshape(b, num_kv, num_heads // num_kv * t, d)
    scores = torch.matmul(qg, keys.dequantize().transpose(-1, -2)).float() * scaling  # all N >= hi tokens
    kept = scores.clone()
    out = attend_mixed(q, k, v, mask, keys, values, rest, scaling, scores=scores)
    assert torch.equal(scores, kept), "the caller's scores must not be written"
    assert_close(out, attend_mixed(q, k, v, mask, keys, values, rest, scaling))


def test_rows_with_no_rest_token_equal_attend():
    # lo == hi (no rest range) and every page resident: the low-bit tokens get no weight, even in a row whose
    # full-precision keys are all masked (it averages those values, as attend does)
    q, k, v, mask, keys, values, rest = make_case(2, 2, 3, 2, 11, 32, 64, 2, 16, 16, torch.float32, 8, 60, 4,
                                                  "rows")
    expected = attend(q, k, v, 0.2, mask)
    for empty in (RestRange(20, 20, rest.resident, 4), RestRange(8, 60, torch.ones_like(rest.resident), 4)):
        out = attend_mixed(q, k, v, mask, keys, values, empty, 0.2)
        assert torch.isfinite(out).all()
        assert_close(out, expected)


def test_lowbit_stores_as_the_caller_holds_them():
    # LowBitKeys / LowBitValues: QTensors of views into reserved buffers that grow by blocks
    b, kv, d, page = 1, 2, 64, 8
    keys, values = LowBitKeys(bits=2, group_size=16), LowBitValues(bits=2, group_size=32)
    keys.reserve(200)
    values.reserve(200)
    for i, block in enumerate((40, 24, 57)):
        x = randn(b, kv, block, d, seed=40 + i)
        keys.append(x)
        values.append(x * 0.5)
    qk, qv = keys.quantized(), values.quantized()
    assert qk.packed.shape[2] < keys.packed.shape[2], "the keys are views into a larger buffer"
    q, k, v = randn(b, kv * 3, 1, d, seed=50), randn(b, kv, 13, d, seed=51), randn(b, kv, 13, d, seed=52)
    resident = torch.zeros(b, kv, 20, dtype=torch.bool, device=DEVICE)
    resident[0, 0, [2, 5]] = resident[0, 1, [3, 4, 9]] = True
    rest = RestRange(8, qk.shape[2], resident, page)
    n = qk.shape[2]  # the values' store runs ahead of the keys' whole groups
    qv = QTensor(qv.packed[:, :, :n], qv.scale[:, :, :n], qv.zero[:, :, :n], qv.bits, 3, qv.group_size, qk.shape,
                 qv.dtype)
    out = attend_mixed(q, k, v, None, qk, qv, rest, 0.125)
    assert_close(out, naive(q, k, v, None, qk, qv, rest, 0.125))


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if name.startswith("index.") and any(i is not None and i.dtype == torch.bool for i in args[1]):
            name = "boolean_index"  # sizes its result from the data: a sync
        self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("page_aligned", [False, True])
def test_reference_never_waits_for_the_device(page_aligned):
    # every decode step runs it: a host sync (item, nonzero, boolean indexing) would stall the stream
    lo, hi = (16, 48) if page_aligned else (13, 50)
    q, k, v, mask, keys, values, rest = make_case(1, 2, 4, 1, 9, 32, 64, 2, 16, 16, torch.float32, lo, hi, 8,
                                                  "batch")
    scores = torch.zeros(1, 2, 4, 64, device=DEVICE)
    attend_mixed(q, k, v, mask, keys, values, rest, 0.125)  # builds the code table once
    for kwargs in ({}, {"scores": scores}):
        with _Ops() as seen:
            attend_mixed(q, k, v, mask, keys, values, rest, 0.125, **kwargs)
        syncing = [op for op in seen.ops if op.split(".")[0] in ("_local_scalar_dense", "nonzero", "masked_select",
                                                                 "is_nonzero", "boolean_index")]
        assert not syncing, syncing


# -- the kernel --------------------------------------------------------------------------------------------------
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

KERNEL_CASES = [  # as REFERENCE_CASES, then sliced buffers and splits
    (2, 2, 1, 1, 9, 32, 64, 2, 32, 32, torch.float32, 3, 61, 4, None, True, 1),
    (1, 2, 3, 2, 21, 64, 96, 1, 8, 16, torch.float32, 10, 77, 8, "rows", False, 2),
    (2, 1, 4, 1, 45, 64, 128, 4, 64, 32, torch.float16, 0, 128, 16, "heads", True, 1),
    (1, 2, 4, 2, 7, 32, 64, 2, 16, 8, torch.float16, 16, 48, 16, "batch", True, 3),
    (1, 1, 3, 1, 13, 64, 64, 2, 32, 64, torch.bfloat16, 8, 59, 4, "rows", False, 1),
]


@needs_triton
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernel_matches_reference(case):
    from kvtier.kernels import mixed_decode

    *shape, sliced, splits = case
    q, k, v, mask, keys, values, rest = make_case(*shape, sliced=sliced, seed=10)
    scaling = q.shape[-1] ** -0.5
    out = mixed_decode.decode_attention_mixed(q, k, v, mask, keys, values, rest, scaling, splits=splits)
    expected = attend_mixed(q, k, v, mask, keys, values, rest, scaling)
    assert out.shape == expected.shape and out.dtype == q.dtype
    assert_close(out, expected)


@needs_triton
@pytest.mark.parametrize("case", KERNEL_CASES[:2])
def test_kernel_with_left_padding_matches_reference(case):
    from kvtier.kernels import mixed_decode

    *shape, sliced, splits = case
    q, k, v, mask, keys, values, rest = make_case(*shape, sliced=sliced, seed=11, padded=True)
    scaling = q.shape[-1] ** -0.5
    out = mixed_decode.decode_attention_mixed(q, k, v, mask, keys, values, rest, scaling, splits=splits)
    assert_close(out, attend_mixed(q, k, v, mask, keys, values, rest, scaling))


@needs_triton
def test_kernel_without_rest_tokens_equals_attend():
    from kvtier.kernels import mixed_decode

    q, k, v, mask, keys, values, rest = make_case(2, 2, 3, 2, 11, 32, 64, 2, 16, 16, torch.float32, 8, 60, 4,
                                                  "rows", seed=20)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # queries as a model hands them over: [b, t, H, d] memory
    expected = attend(q, k, v, 0.2, mask)
    for empty, splits in ((RestRange(20, 20, rest.resident, 4), 1),
                          (RestRange(8, 60, torch.ones_like(rest.resident), 4), 2)):
        out = mixed_decode.decode_attention_mixed(q, k, v, mask, keys, values, empty, 0.2, splits=splits)
        assert torch.isfinite(out).all()
        assert_close(out, expected)


@needs_triton
def test_attend_mixed_dispatches_to_the_kernel(monkeypatch):
    from kvtier.kernels import mixed_decode

    q, k, v, mask, keys, values, rest = make_case(1, 2, 3, 1, 19, 32, 64, 4, 16, 32, torch.float32, 4, 57, 8,
                                                  "batch", sliced=True, seed=30)
    expected = attend_mixed(q, k, v, mask, keys, values, rest, 0.125)
    monkeypatch.setenv("KVTIER_KERNELS", "triton")
    assert kernels.enabled(q) and kernels.mixed_fits(q, k)
    calls = []
    original = mixed_decode.decode_attention_mixed

    def recorded(*args, **kwargs):
        calls.append("decode_attention_mixed")
        return original(*args, **kwargs)

    monkeypatch.setattr(mixed_decode, "decode_attention_mixed", recorded)
    assert_close(attend_mixed(q, k, v, mask, keys, values, rest, 0.125), expected)
    assert calls == ["decode_attention_mixed"]
