"""Triton kernels (kvtier.kernels) against the PyTorch functions they replace, on random inputs.

On CUDA the kernels run natively; without CUDA they run in triton's interpreter (TRITON_INTERPRET=1, set in
conftest.py because it must precede the first import of triton). Small shapes keep the interpreter quick, but
lengths are odd so that every kernel's partial tiles are exercised. References are computed with
KVTIER_KERNELS=torch, so that on CUDA the library functions do not dispatch to the kernels under test.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import kvtier  # noqa: E402
from kvtier import kernels  # noqa: E402
from kvtier.attention import attend  # noqa: E402
from kvtier.kernels import decode, dequant_score, digest_score, gather  # noqa: E402
from kvtier.link import Link  # noqa: E402
from kvtier.quant import LowBitKV, quantize_keys  # noqa: E402
from kvtier.select import page_digest, select_pages  # noqa: E402
from kvtier.store import DevicePool, HostPool, to_pages  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (rtol, atol relative to the reference's largest magnitude): the kernels accumulate in float32 where the
# references round products (or probabilities) to the input dtype first
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def torch_references(monkeypatch):
    monkeypatch.setenv("KVTIER_KERNELS", "torch")


def randn(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def spy(monkeypatch, module, name, calls):
    """Record in `calls` each time the library reaches module.name (a launcher), then run it."""
    original = getattr(module, name)

    def recorded(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, recorded)


def assert_close(actual, expected):
    tol = TOL[expected.dtype]
    scale = float(expected.float().abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * max(scale, 1.0))


def test_enabled_follows_device_and_environment(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setenv("KVTIER_KERNELS", "torch")
    assert not kernels.enabled(x)
    monkeypatch.delenv("KVTIER_KERNELS")
    assert not kernels.enabled(x), "on CPU only when asked for"
    monkeypatch.setenv("KVTIER_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.enabled(x)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not kernels.enabled(x), "a CPU tensor needs the interpreter"
    if torch.cuda.is_available():
        monkeypatch.setenv("KVTIER_KERNELS", "auto")
        assert kernels.enabled(x.cuda())


# -- digest scoring ----------------------------------------------------------------------------------------------
DIGEST_CASES = [  # batch, kv heads, group, pages, head dim, dtype
    (2, 2, 1, 37, 64, torch.float32),
    (1, 2, 3, 21, 128, torch.float32),
    (2, 1, 4, 45, 64, torch.bfloat16),
    (1, 2, 4, 9, 128, torch.float16),
]


@pytest.mark.parametrize("b, kv, group, pages, d, dtype", DIGEST_CASES)
def test_page_scores_and_probs(b, kv, group, pages, d, dtype):
    q = randn(b, kv * group, d, dtype=dtype, seed=1)
    keys = randn(b, kv, (pages + 3) * 4, d, dtype=dtype, seed=2)
    dmax, dmin = page_digest(keys, 4)
    dmax, dmin = dmax[:, :, 2:2 + pages], dmin[:, :, 2:2 + pages]  # a page range, as FreeKV selects from
    scores = digest_score.page_scores(q, dmax, dmin)
    assert scores.dtype == torch.float32 and scores.shape == (b, kv, group, pages)
    assert_close(scores, digest_score.page_scores_reference(q, dmax, dmin).to(dtype))
    probs = digest_score.page_probs(q, dmax, dmin, d ** -0.5)
    expected = digest_score.page_probs_reference(q, dmax, dmin, d ** -0.5)
    torch.testing.assert_close(probs, expected, rtol=0, atol=TOL[dtype] / pages)
    torch.testing.assert_close(probs.sum(-1), torch.ones(b, kv, device=DEVICE))


def test_select_pages_takes_the_fused_path(monkeypatch):
    q, keys = randn(2, 8, 64, seed=3), randn(2, 2, 31 * 4, 64, seed=4)
    dmax, dmin = page_digest(keys, 4)
    expected = select_pages(q, dmax, dmin, 5, 0.125, first_page=3)
    monkeypatch.setenv("KVTIER_KERNELS", "triton")
    calls = []
    spy(monkeypatch, digest_score, "page_probs", calls)
    pages, probs = select_pages(q, dmax, dmin, 5, 0.125, first_page=3)
    assert calls == ["page_probs"]
    assert torch.equal(pages, expected[0])
    assert_close(probs, expected[1])


# -- gather ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page_size, d, dtype",
                         [(4, 64, torch.float32), (1, 128, torch.bfloat16), (3, 64, torch.float16)])
def test_gather_pages(page_size, d, dtype):
    b, h, n, k = 2, 3, 11, 5
    src = randn(n, b, h, 2, page_size, d, dtype=dtype, seed=5)
    index = torch.randint(0, n, (b, h, k), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    assert torch.equal(gather.gather_pages(src, index), gather.gather_pages_reference(src, index))
    if torch.cuda.is_available():  # straight from pinned host memory, as a host pool is held
        host = src.cpu().pin_memory()
        assert torch.equal(gather.gather_pages(host, index), gather.gather_pages_reference(src, index))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recall_pages_matches_device_pool_recall(dtype):
    b, h, d, p, slots, pages = 2, 3, 16, 4, 4, 10
    link = Link(DEVICE)
    pool = HostPool(2, b, h, d, p, dtype, link)
    k, v = randn(b, h, pages * p, d, dtype=dtype, seed=7), randn(b, h, pages * p, d, dtype=dtype, seed=8)
    pool.write(1, to_pages(k, v, p))
    link.synchronize()
    ref, ours = (DevicePool(b, h, d, p, slots, dtype, DEVICE) for _ in range(2))
    gen = torch.Generator().manual_seed(9)
    for _ in range(2):  # the second round evicts and overwrites some slots
        wanted = torch.stack([torch.randperm(pages, generator=gen)[:slots] for _ in range(b * h)]).view(b, h, slots)
        plan = ref.table.plan(wanted.to(DEVICE))
        assert torch.equal(ours.table.plan(wanted.to(DEVICE))[2], plan[2])
        gather.recall_pages_reference(ref, pool, 1, link, *plan)
        gather.recall_pages(pool.pages[1], ours.slot_k, ours.slot_v, *plan)
        link.synchronize()
        assert torch.equal(ours.slot_k, ref.slot_k) and torch.equal(ours.slot_v, ref.slot_v)


# -- dequantize and score ----------------------------------------------------------------------------------------
DEQUANT_CASES = [  # kv heads, group, query tokens, keys, head dim, bits, group size, dtype
    (2, 1, 1, 64, 64, 2, 32, torch.float32),
    (1, 3, 2, 96, 128, 1, 32, torch.float32),
    (2, 4, 1, 70, 64, 4, 10, torch.bfloat16),
    (1, 3, 1, 45, 128, 2, 15, torch.float16),
]


@pytest.mark.parametrize("kv, group, t, n, d, bits, group_size, dtype", DEQUANT_CASES)
def test_dequant_scores(kv, group, t, n, d, bits, group_size, dtype):
    q = randn(2, kv * group, t, d, dtype=dtype, seed=10)
    qk = quantize_keys(randn(2, kv, n, d, dtype=dtype, seed=11), bits, group_size)
    scores = dequant_score.dequant_scores(q, qk, d ** -0.5)
    assert scores.shape == (2, kv, group * t, n) and scores.dtype == torch.float32
    assert_close(scores, dequant_score.dequant_scores_reference(q, qk, d ** -0.5).to(dtype))


def test_dequant_scores_over_a_lowbit_copy_equal_attention_scores_of_its_dequantized_keys():
    # SpeCache's use: the low-bit prefix of a LowBitKV, one chunk per flush
    low = LowBitKV(bits=2, group_size=16, residual=16, cache_dequantized=False)
    for i, t in enumerate((40, 1, 9)):
        low.append(randn(1, 2, t, 64, seed=12 + i), randn(1, 2, t, 64, seed=20 + i))
    q = randn(1, 6, 1, 64, seed=30)
    scores = torch.cat([dequant_score.dequant_scores(q, qk) for qk, _ in low.chunks], dim=-1)
    k_hat, _ = low.dequantized()
    assert_close(scores, torch.matmul(q.view(1, 2, 3, 64), k_hat.transpose(-1, -2)))


# -- decode attention --------------------------------------------------------------------------------------------
DECODE_CASES = [  # batch, kv heads, group, query tokens, keys, head dim, dtype, mask, splits
    (2, 2, 1, 1, 77, 64, torch.float32, None, 1),
    (2, 2, 3, 1, 100, 64, torch.float32, "rows", 1),
    (1, 2, 4, 2, 131, 128, torch.float32, "heads", 3),
    (2, 1, 3, 2, 90, 128, torch.bfloat16, "rows", 2),
    (2, 2, 4, 1, 45, 64, torch.float16, "heads", 1),
]


def random_mask(kind, b, kv, t, n):
    gen = torch.Generator().manual_seed(13)
    if kind == "rows":  # [b, t, n], with one fully masked row (a left-padding query)
        mask = torch.rand(b, t, n, generator=gen) > 0.3
        mask[0, 0] = False
    else:  # [1, kv, t, n], broadcast over the batch
        mask = torch.rand(1, kv, t, n, generator=gen) > 0.5
    return mask.to(DEVICE)


@pytest.mark.parametrize("b, kv, group, t, n, d, dtype, mask, splits", DECODE_CASES)
def test_decode_attention(b, kv, group, t, n, d, dtype, mask, splits):
    q = randn(b, kv * group, t, d, dtype=dtype, seed=14)
    k, v = randn(b, kv, n, d, dtype=dtype, seed=15), randn(b, kv, n, d, dtype=dtype, seed=16)
    mask = None if mask is None else random_mask(mask, b, kv, t, n)
    out = decode.decode_attention(q, k, v, d ** -0.5, mask, splits=splits)
    expected = attend(q, k, v, d ** -0.5, mask)
    assert out.shape == expected.shape and out.dtype == dtype
    assert_close(out, expected)


def test_attend_dispatches_decode_only(monkeypatch):
    q, k, v = randn(1, 4, 1, 64, seed=17), randn(1, 2, 50, 64, seed=18), randn(1, 2, 50, 64, seed=19)
    expected = attend(q, k, v, 0.125)
    monkeypatch.setenv("KVTIER_KERNELS", "triton")
    calls = []
    spy(monkeypatch, decode, "decode_attention", calls)
    assert_close(attend(q, k, v, 0.125), expected)
    assert calls == ["decode_attention"]
    long_q = randn(1, 4, kernels.DECODE_MAX_ROWS, 64, seed=20)  # a prefill chunk: the PyTorch path
    attend(long_q, k, v, 0.125)
    assert calls == ["decode_attention"]


# -- a whole decode through a method -----------------------------------------------------------------------------
@pytest.mark.parametrize("method, options", [
    ("freekv", dict(budget=32, page_size=4, sink=8, window=8)),
    ("freekv", dict(budget=32, page_size=4, sink=8, window=8, scorer="lowbit", score_group=8)),
    ("specache", dict(bits=2, group_size=16, residual=16, topk=8)),
])
def test_generate_through_the_kernels_gives_the_torch_tokens(tiny, monkeypatch, method, options):
    ids = torch.randint(3, 256, (1, 56), generator=torch.Generator().manual_seed(21))
    expected = kvtier.generate(tiny("llama").to(DEVICE), ids, method=method, max_new_tokens=6, eos_token_id=-1,
                               **options)
    monkeypatch.setenv("KVTIER_KERNELS", "triton")
    calls = []
    spy(monkeypatch, decode, "decode_attention", calls)
    spy(monkeypatch, digest_score, "page_probs", calls)
    spy(monkeypatch, dequant_score, "dequant_scores", calls)
    out = kvtier.generate(tiny("llama").to(DEVICE), ids, method=method, max_new_tokens=6, eos_token_id=-1, **options)
    assert torch.equal(out, expected)
    assert "decode_attention" in calls
    if method == "freekv":
        scorer = "dequant_scores" if options.get("scorer") == "lowbit" else "page_probs"
        assert scorer in calls, "no page selection went through the kernel"
