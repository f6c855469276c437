"""Triton kernels (kvtier.kernels) against the PyTorch functions they replace, on random inputs.

On CUDA the kernels run natively; without CUDA they run in triton's interpreter (TRITON_INTERPRET=1, set in
conftest.py because it must precede the first import of triton). Small shapes keep the interpreter quick, but
lengths are odd so that every kernel's partial tiles are exercised. References are computed with
KVTIER_KERNELS=torch, so that on CUDA the library functions do not dispatch to the kernels under test.
"""

from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_DEVICE, KERNEL_TOL, assert_close, randn

pytest.importorskip("triton")

import kvtier  # noqa: E402
from kvtier import kernels  # noqa: E402
from kvtier.attention import attend  # noqa: E402
from kvtier.kernels import decode, dequant_score, digest_score, gather, mixed_decode  # noqa: E402
from kvtier.link import Link  # noqa: E402
from kvtier.quant import LowBitKeys, quantize_keys  # noqa: E402
from kvtier.retrieval import recall  # noqa: E402
from kvtier.retrieval.recall import PageTable, copy_rows_reference  # noqa: E402
from kvtier.retrieval.scorer import DigestScorer  # noqa: E402
from kvtier.selection import page_digest, page_scores  # noqa: E402
from kvtier.store import HostPool, to_pages  # noqa: E402

DEVICE = KERNEL_DEVICE
TOL = KERNEL_TOL


@pytest.fixture(autouse=True)
def _torch_references(torch_references):
    pass


def spy(monkeypatch, module, name, calls):
    """Record in `calls` each time the library reaches module.name (a launcher), then run it."""
    original = getattr(module, name)

    def recorded(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, recorded)



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


def test_page_scores_and_the_digest_scorer_take_the_fused_path(monkeypatch):
    q, keys = randn(2, 8, 1, 64, seed=3), randn(2, 2, 31 * 4, 64, seed=4)
    dmax, dmin = page_digest(keys, 4)
    scorer = DigestScorer(keys, 31, 4)
    scorer.add_pages(0, keys)
    expected_scores = page_scores(q[:, :, 0], dmax, dmin)
    expected = scorer.page_probs(q, 3, 28, 0.125)
    monkeypatch.setenv("KVTIER_KERNELS", "triton")
    calls = []
    spy(monkeypatch, digest_score, "page_scores", calls)
    assert_close(page_scores(q[:, :, 0], dmax, dmin), expected_scores)
    assert calls == ["page_scores"]
    probs = scorer.page_probs(q, 3, 28, 0.125)
    assert calls == ["page_scores"] * 2
    assert_close(probs, expected)
    assert not probs[..., :3].any() and not probs[..., 28:].any()  # pages outside [lo, hi) get nothing
    assert torch.equal(probs.topk(5, dim=-1).indices, expected.topk(5, dim=-1).indices)


# -- recall copy ---------------------------------------------------------------------------------------------------
def random_rows_plan(n_src, n_dst, n, seed):
    """A plan of n entries into distinct rows of [0, n_dst), about a third skipped (source -1, destination the
    trash row n_dst, as the engine points them); returns (src_rows, dst_rows) on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    src_rows = torch.randint(0, n_src, (n,), generator=gen)
    dst_rows = torch.randperm(n_dst, generator=gen)[:n]
    skip = torch.rand(n, generator=gen) < 0.35
    skip[0], skip[-1] = True, False  # at least one of each
    src_rows[skip], dst_rows[skip] = -1, n_dst
    return src_rows.to(DEVICE), dst_rows.to(DEVICE)


@pytest.mark.parametrize("n_src, n_dst, n, elems, dtype", [
    (11, 9, 6, 4 * 64, torch.float32),
    (7, 12, 12, 128, torch.bfloat16),
    (20, 15, 9, 3 * 64, torch.float16),  # a partial tile
    (5, 6, 4, 4400, torch.float32),  # more than one block of columns
])
def test_copy_rows(n_src, n_dst, n, elems, dtype):
    src = randn(n_src, 2, elems, dtype=dtype, seed=5)
    src_rows, dst_rows = random_rows_plan(n_src, n_dst, n, seed=6)
    dst_k, dst_v = randn(n_dst + 1, elems, dtype=dtype, seed=7), randn(n_dst + 1, elems, dtype=dtype, seed=8)
    ref_k, ref_v = dst_k.clone(), dst_v.clone()
    copy_rows_reference(src, ref_k, ref_v, src_rows, dst_rows)
    old_trash = dst_k[n_dst].clone(), dst_v[n_dst].clone()
    gather.copy_rows(src, dst_k, dst_v, src_rows, dst_rows)
    # every row but the trash row the reference writes; the kernel leaves that one alone
    assert torch.equal(dst_k[:n_dst], ref_k[:n_dst]) and torch.equal(dst_v[:n_dst], ref_v[:n_dst])
    assert torch.equal(dst_k[n_dst], old_trash[0]) and torch.equal(dst_v[n_dst], old_trash[1])
    if torch.cuda.is_available():  # straight from pinned host memory, as a host pool is held
        host = src.cpu().pin_memory()
        dst_k2, dst_v2 = randn(n_dst + 1, elems, dtype=dtype, seed=7), randn(n_dst + 1, elems, dtype=dtype, seed=8)
        gather.copy_rows(host, dst_k2, dst_v2, src_rows, dst_rows)
        torch.cuda.synchronize()
        assert torch.equal(dst_k2, dst_k) and torch.equal(dst_v2, dst_v)


def test_copy_rows_into_strided_rows_and_all_skipped():
    elems = 96
    src = randn(6, 2, elems, seed=9)
    wide = randn(2, 8, elems + 7, seed=10)  # rows of one buffer, keys and values side by side, padded rows
    dst_k, dst_v = wide[0, :, :elems], wide[1, :, 3:3 + elems]
    src_rows, dst_rows = random_rows_plan(6, 7, 7, seed=11)
    ref = wide.clone()
    copy_rows_reference(src, ref[0, :, :elems], ref[1, :, 3:3 + elems], src_rows, dst_rows)
    before = wide.clone()
    gather.copy_rows(src, dst_k, dst_v, src_rows, dst_rows)
    assert torch.equal(wide[:, :7], ref[:, :7])
    assert torch.equal(wide[:, 7], before[:, 7])  # the trash row
    # a plan with nothing to copy changes nothing, and an empty plan launches nothing
    before = wide.clone()
    gather.copy_rows(src, dst_k, dst_v, torch.full_like(src_rows, -1), dst_rows)
    empty = src_rows[:0]
    gather.copy_rows(src, dst_k, dst_v, empty, empty)
    assert torch.equal(wide, before)
    with pytest.raises(ValueError, match="source"):
        gather.copy_rows(src[:, :1], dst_k, dst_v, src_rows, dst_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_rows_matches_the_reference_through_a_page_table(monkeypatch, dtype):
    """The engine's use: pages of a host pool layer into slots of one device buffer per (sequence, KV head) with a
    trash page, by the dense plan; the library's copy_rows takes the kernel when kernels are on."""
    b, h, d, p, slots, pages = 2, 3, 16, 4, 4, 10
    link = Link(DEVICE)
    pool = HostPool(2, b, h, d, p, dtype, link)
    k, v = randn(b, h, pages * p, d, dtype=dtype, seed=12), randn(b, h, pages * p, d, dtype=dtype, seed=13)
    pool.write(1, to_pages(k, v, p))
    link.synchronize()
    host = pool.pages[1].view(-1, 2, p * d)
    table = PageTable(b, h, slots, DEVICE)
    seq_head = torch.arange(b * h, device=DEVICE).view(b, h, 1)
    slot_rows, trash_rows = seq_head * (slots + 1), seq_head * (slots + 1) + slots
    ref_k, ref_v = (torch.zeros(b, h, (slots + 1) * p, d, dtype=dtype, device=DEVICE) for _ in range(2))
    our_k, our_v = ref_k.clone(), ref_v.clone()
    monkeypatch.setenv("KVTIER_KERNELS", "triton")
    calls = []
    spy(monkeypatch, gather, "copy_rows", calls)
    gen = torch.Generator().manual_seed(14)
    for step in range(3):  # later rounds hit resident pages (-1 entries) and evict others
        wanted = torch.stack([torch.randperm(pages, generator=gen)[:slots - step] for _ in range(b * h)])
        planned, slot = table.plan(wanted.view(b, h, -1).to(DEVICE), torch.rand(b, h, pages).to(DEVICE))
        copy = planned >= 0
        src = torch.where(copy, planned * (b * h) + seq_head, -1).flatten()
        dst = torch.where(copy, slot_rows + slot, trash_rows).flatten()
        copy_rows_reference(host, ref_k.view(-1, p * d), ref_v.view(-1, p * d), src, dst)
        recall.copy_rows(host, our_k.view(-1, p * d), our_v.view(-1, p * d), src, dst)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        n = slots * p
        assert torch.equal(our_k[:, :, :n], ref_k[:, :, :n]) and torch.equal(our_v[:, :, :n], ref_v[:, :, :n])
        assert not our_k[:, :, n:].any() and not our_v[:, :, n:].any()  # the kernel never writes the trash page
    assert calls == ["copy_rows"] * 3
    # and the slots hold their pages' tokens
    pos = table.positions(p)
    idx = pos.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, d)
    present = pos >= 0
    assert torch.equal(our_k[:, :, :slots * p][present], k.gather(2, idx)[present])
    assert torch.equal(our_v[:, :, :slots * p][present], v.gather(2, idx)[present])


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


@pytest.mark.parametrize("reserve", [0, 96])
def test_dequant_scores_over_lowbit_keys_equal_attention_scores_of_their_dequantized_keys(reserve):
    # the low-bit scorer's use: the quantized prefix of a LowBitKeys store, views into buffers that grow with a
    # margin (or were reserved once), so not contiguous once they hold fewer rows than they have room for
    keys = LowBitKeys(bits=2, group_size=16)
    keys.reserve(reserve)
    for i, t in enumerate((40, 1, 9)):
        keys.append(randn(1, 2, t, 64, seed=12 + i))
    qk = keys.quantized()
    assert qk.shape == (1, 2, 48, 64)
    q = randn(1, 6, 1, 64, seed=30)
    scores = dequant_score.dequant_scores(q, qk)
    assert_close(scores, torch.matmul(q.view(1, 2, 3, 64), qk.dequantize().transpose(-1, -2)))
    assert_close(scores, dequant_score.dequant_scores_reference(q, qk))


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
    spy(monkeypatch, digest_score, "page_scores", calls)
    spy(monkeypatch, dequant_score, "dequant_scores", calls)
    spy(monkeypatch, mixed_decode, "decode_attention_mixed", calls)
    spy(monkeypatch, gather, "copy_rows", calls)
    out = kvtier.generate(tiny("llama").to(DEVICE), ids, method=method, max_new_tokens=6, eos_token_id=-1, **options)
    assert torch.equal(out, expected)
    # SpeCache reads the pages not recalled at low precision (rest="lowbit"): the mixed decode kernel
    assert ("decode_attention_mixed" if method == "specache" else "decode_attention") in calls
    scorer = "page_scores" if method == "freekv" and options.get("scorer") != "lowbit" else "dequant_scores"
    assert scorer in calls, "no page selection went through the kernel"
    assert "copy_rows" in calls, "no recall went through the kernel"
