"""The C kernels of `kvtier.kernels.native` against their PyTorch references, and the engine on either path."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import batch_prompt

import kvtier
from kvtier.attention import attend_mixed, RestRange
from kvtier.kernels import native
from kvtier.kernels.dequant_score import dequant_scores_reference
from kvtier.quant import dequantize_value_range, quantize_keys, quantize_values
from kvtier.retrieval.recall import copy_rows_reference

pytestmark = pytest.mark.skipif(native.library() is None and shutil.which("cc") is None,
                                reason=f"no native kernels: {native.status()}")


def test_the_kernels_build_where_there_is_a_compiler():
    assert native.library() is not None, native.status()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_copy_rows_skips_minus_one_and_equals_the_reference():
    gen = _gen(0)
    src = torch.randn(40, 2, 96, generator=gen)
    dst_k, dst_v = torch.randn(30, 96, generator=gen), torch.randn(30, 96, generator=gen)
    src_rows = torch.tensor([5, -1, 39, 0, -1, 17])
    dst_rows = torch.tensor([0, 29, 7, 28, 29, 3])  # skipped entries name the trash row 29
    ref_k, ref_v = dst_k.clone(), dst_v.clone()
    copy_rows_reference(src, ref_k, ref_v, src_rows, dst_rows)
    before_k, before_v = dst_k[29].clone(), dst_v[29].clone()
    assert native.copy_rows(src, dst_k, dst_v, src_rows, dst_rows)
    keep = torch.arange(30) != 29
    assert torch.equal(dst_k[keep], ref_k[keep]) and torch.equal(dst_v[keep], ref_v[keep])
    # the kernel does not touch a skipped entry's row at all (the reference writes a null row there)
    assert torch.equal(dst_k[29], before_k) and torch.equal(dst_v[29], before_v)


def test_copy_rows_declines_layouts_it_does_not_handle():
    src = torch.randn(8, 2, 16)
    dst = torch.zeros(16, 32)[:, ::2]  # not contiguous
    assert not native.copy_rows(src, dst, dst, torch.tensor([0]), torch.tensor([0]))
    assert not native.copy_rows(src, torch.zeros(8, 16, dtype=torch.float64), torch.zeros(8, 16), torch.tensor([0]),
                                torch.tensor([0]))


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("group,d,tokens", [(64, 64, 1), (32, 64, 2), (16, 96, 1), (128, 128, 2), (12, 64, 2), (8, 32, 7)])
def test_dequant_scores_equal_the_reference(bits, group, d, tokens):
    gen = _gen(bits * 100 + d)
    b, h, n, capacity = 2, 3, group * 5, group * 8
    keys = torch.randn(b, h, n, d, generator=gen) * 2 + 0.5
    qk = quantize_keys(keys, bits, group)
    # as the engine holds them: views of the first n tokens of buffers sized for `capacity`
    packed = torch.zeros(b, h, capacity, qk.packed.shape[-1], dtype=torch.uint8)
    scale, zero = torch.zeros(b, h, capacity // group, d), torch.zeros(b, h, capacity // group, d)
    packed[:, :, :n], scale[:, :, :n // group], zero[:, :, :n // group] = qk.packed, qk.scale, qk.zero
    q = torch.randn(b, h * 3, tokens, d, generator=gen)
    out = native.dequant_scores(q, packed[:, :, :n], scale[:, :, :n // group], zero[:, :, :n // group], bits,
                                group, 0.125)
    expected = dequant_scores_reference(q, qk, 0.125)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


def test_kernels_decline_what_they_do_not_serve():
    qk = quantize_keys(torch.randn(1, 2, 64, 32, dtype=torch.bfloat16), 2, 32)
    q = torch.randn(1, 4, 1, 32, dtype=torch.bfloat16)
    assert native.dequant_scores(q, qk.packed, qk.scale, qk.zero, 2, 32, 1.0) is None
    too_many_rows = torch.randn(1, 2 * (native.MAX_ROWS + 1), 1, 32)
    qk = quantize_keys(torch.randn(1, 2, 64, 32), 2, 32)
    assert native.dequant_scores(too_many_rows, qk.packed, qk.scale, qk.zero, 2, 32, 1.0) is None


def test_attend_mixed_is_the_same_on_either_path(monkeypatch):
    gen = _gen(7)
    b, h, g, d, n_full, n_low, page = 1, 2, 3, 32, 24, 96, 8
    q = torch.randn(b, h * g, 1, d, generator=gen)
    k, v = torch.randn(b, h, n_full, d, generator=gen), torch.randn(b, h, n_full, d, generator=gen)
    low_k, low_v = torch.randn(b, h, n_low, d, generator=gen), torch.randn(b, h, n_low, d, generator=gen)
    keys, values = quantize_keys(low_k, 2, 16), quantize_values(low_v, 2, 32)
    resident = torch.zeros(b, h, n_low // page + 1, dtype=torch.bool)
    resident[:, 0, 3] = resident[:, 1, 5] = True
    rest = RestRange(16, 80, resident, page)
    native_out = attend_mixed(q, k, v, None, keys, values, rest, 0.2)
    monkeypatch.setenv("KVTIER_KERNELS", "torch")
    torch.testing.assert_close(native_out, attend_mixed(q, k, v, None, keys, values, rest, 0.2), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("method,options", [
    ("freekv", dict(budget=48, page_size=4, sink=4, window=8)),
    ("freekv", dict(budget=48, page_size=4, sink=4, window=8, scorer="lowbit", rest="lowbit", score_group=8)),
    ("specache", dict(group_size=8, residual=8, topk=6)),
])
def test_decoding_is_the_same_with_and_without_the_native_kernels(tiny, monkeypatch, method, options):
    model = tiny("llama")
    ids, mask = batch_prompt(2, length=60, pad=5)
    out = kvtier.generate(model, ids, attention_mask=mask, method=method, max_new_tokens=16, eos_token_id=-1,
                          **options)
    monkeypatch.setenv("KVTIER_KERNELS", "torch")
    assert torch.equal(out, kvtier.generate(model, ids, attention_mask=mask, method=method, max_new_tokens=16,
                                            eos_token_id=-1, **options))


def test_a_failed_build_falls_back_to_the_references_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("KVTIER_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
    native.library.cache_clear()
    try:
        assert native.library() is None
        assert "could not build the CPU kernels" in native.status()
        assert not kvtier.kernels.native_enabled(torch.zeros(1))
    finally:
        monkeypatch.undo()
        native.library.cache_clear()
    assert native.library() is not None



@pytest.mark.parametrize("t,padded", [(1, False), (2, True)])
def test_fused_mixed_attention_equals_the_reference(monkeypatch, t, padded):
    """attend_mixed with the scorer's raw scores: the C kernel (one softmax, values dequantized in registers)
    against the PyTorch path, with resident pages, a masked buffer row and left padding."""
    from kvtier.kernels.dequant_score import dequant_scores_reference

    gen = _gen(11 + t)
    b, h, g, d, length, n_low, page = 2, 2, 3, 32, 40, 128, 8
    q = torch.randn(b, h * g, t, d, generator=gen)
    k, v = torch.randn(b, h, length, d, generator=gen), torch.randn(b, h, length, d, generator=gen)
    keys = quantize_keys(torch.randn(b, h, n_low, d, generator=gen), 2, 16)
    values = quantize_values(torch.randn(b, h, n_low, d, generator=gen), 2, 16)
    mask = torch.rand(b, h, t, length, generator=gen) > 0.2
    resident = torch.zeros(b, h, n_low // page + 1, dtype=torch.bool)
    resident[0, 1, 2] = resident[1, 0, 7] = resident[1, 1, 3] = True
    valid = None
    if padded:
        valid = torch.ones(b, n_low, dtype=torch.bool)
        valid[1, :20] = False
    rest = RestRange(8, 112, resident, page, valid=valid)
    raw = dequant_scores_reference(q, keys, 0.2)
    fused = attend_mixed(q, k, v, mask, keys, values, rest, 0.2, scores=raw)
    monkeypatch.setenv("KVTIER_KERNELS", "torch")
    expected = attend_mixed(q, k, v, mask, keys, values, rest, 0.2, scores=raw)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("page,tokens,group", [(1, 2, 3), (4, 1, 2), (32, 2, 4), (3, 1, 1)])
def test_page_probs_equal_the_scorer_reference(monkeypatch, page, tokens, group):
    from kvtier.retrieval.scorer import LowBitScorer

    gen = _gen(page)
    b, h, n = 2, 3, page * 40
    raw = torch.randn(b, h, group * tokens, n, generator=gen) * 3
    q = torch.zeros(b, h * group, tokens, 8)  # shapes only: page_probs reads raw
    scorer = LowBitScorer(2, page, page, n)
    out = scorer.page_probs(q, 3, 37, 1.0, raw)
    monkeypatch.setenv("KVTIER_KERNELS", "torch")
    expected = scorer.page_probs(q, 3, 37, 1.0, raw)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)


def test_a_kernel_call_counts_as_one_op():
    from kvtier.stepcheck import StepCounter

    src, dst_k, dst_v = torch.randn(4, 2, 8), torch.zeros(4, 8), torch.zeros(4, 8)
    rows = torch.tensor([0, 1])
    with StepCounter() as counter:
        native.copy_rows(src, dst_k, dst_v, rows, rows)
    assert counter.ops == 1
