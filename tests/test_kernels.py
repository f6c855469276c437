"""Triton kernels (kvtier.kernels) against the PyTorch functions they replace, on random inputs.

On CUDA the kernels run natively; without CUDA they run in triton's interpreter (TRITON_INTERPRET=1, set in
conftest.py because it must precede the first import of triton). Small shapes keep the interpreter quick, but
lengths are odd so that every kernel's partial tiles are exercised. References are computed with
KVTIER_KERNELS=torch, so that on CUDA the library functions do not dispatch to the kernels under test.
"""

from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_DEVICE, KERNEL_TOL, assert_close, randn, slot_positions

pytest.importorskip("triton")

import kvtier  # noqa: E402
from kvtier import kernels  # noqa: E402
from kvtier.attention import attend  # noqa: E402
from kvtier.kernels import decode, dequant_score, digest_score, mixed_decode  # noqa: E402
from kvtier.kernels import recall as kernel_recall  # noqa: E402
from kvtier.link import Link  # noqa: E402
from kvtier.quant import LowBitKeys, quantize_keys  # noqa: E402
from kvtier.retrieval import recall  # noqa: E402
from kvtier.retrieval.recall import (PageTable, SlotRows, plan_pages_reference,  # noqa: E402
                                     recall_pages_reference)
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
    # two query tokens (a speculative step), and a range of pages inside the digests
    q2 = torch.stack((q, randn(b, kv * group, d, dtype=dtype, seed=9)), dim=2)
    for lo, hi in ((0, pages), (3, pages - 2)):
        probs = digest_score.page_probs(q2, dmax, dmin, d ** -0.5, lo, hi)
        expected = digest_score.page_probs_reference(q2, dmax, dmin, d ** -0.5, lo, hi)
        assert probs.shape == (b, kv, 2, pages)
        torch.testing.assert_close(probs, expected, rtol=0, atol=TOL[dtype] / (hi - lo))
        torch.testing.assert_close(probs.sum(-1), torch.ones(b, kv, 2, device=DEVICE))
        assert not probs[..., :lo].any() and not probs[..., hi:].any()


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
    spy(monkeypatch, digest_score, "page_probs", calls)
    assert_close(page_scores(q[:, :, 0], dmax, dmin), expected_scores)
    assert calls == ["page_scores"]
    probs = scorer.page_probs(q, 3, 28, 0.125)
    assert calls == ["page_scores", "page_probs"]  # the scorer's probabilities in one launch
    assert_close(probs, expected)
    assert not probs[..., :3].any() and not probs[..., 28:].any()  # pages outside [lo, hi) get nothing
    assert torch.equal(probs.topk(5, dim=-1).indices, expected.topk(5, dim=-1).indices)


# -- recall: plan and copy -------------------------------------------------------------------------------------
# (test_store.py runs both on each implementation on CPU; here the Triton kernels' own cases, on the kernel device)
def random_recall_plan(b, h, k, n_slots, n_pages, seed):
    """pages, slots [b, h, k] on DEVICE: distinct pages and slots per (sequence, KV head) pair, about a third of
    the entries -1 in both (at least one skipped, one copied)."""
    gen = torch.Generator().manual_seed(seed)
    pages = torch.stack([torch.randperm(n_pages, generator=gen)[:k] for _ in range(b * h)]).view(b, h, k)
    slots = torch.stack([torch.randperm(n_slots, generator=gen)[:k] for _ in range(b * h)]).view(b, h, k)
    skip = torch.rand(b, h, k, generator=gen) < 0.35
    skip.view(-1)[0], skip.view(-1)[-1] = True, False
    pages[skip], slots[skip] = -1, -1
    return pages.to(DEVICE), slots.to(DEVICE)


def trash_mask(n_rows, rows):
    return torch.arange(n_rows, device=DEVICE) % rows.rows_per_head == rows.rows_per_head - 1


@pytest.mark.parametrize("b, h, k, n_slots, page, d, dtype, heads", [
    (2, 2, 3, 4, 4, 64, torch.float32, False),
    (1, 3, 4, 4, 1, 128, torch.bfloat16, True),
    (2, 1, 2, 3, 3, 64, torch.float16, True),  # a partial tile of columns
    (1, 2, 2, 2, 4, 1100, torch.float32, False),  # more than one block of columns
])
def test_recall_pages(b, h, k, n_slots, page, d, dtype, heads):
    n_pages, elems = 6, page * d
    rows = SlotRows(heads=b * h, rows_per_head=n_slots + 3, first_slot=1)
    n_rows = b * h * rows.rows_per_head
    host = randn(n_pages * b * h, 2, elems, dtype=dtype, seed=5)
    pages, slots = random_recall_plan(b, h, k, n_slots, n_pages, seed=6)
    held = (torch.arange(b * h, device=DEVICE) % 2 == 0).view(b, h) if heads else None
    keys, values = randn(n_rows, elems, dtype=dtype, seed=7), randn(n_rows, elems, dtype=dtype, seed=8)
    pos = torch.randint(0, 100, (n_rows, page), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    ref = keys.clone(), values.clone(), pos.clone()
    recall_pages_reference(host, *ref, pages, slots, rows, held)
    ours = keys.clone(), values.clone(), pos.clone()
    kernel_recall.recall_pages(host, *ours, pages, slots, rows, held)
    # every row but the trash rows the reference writes; the kernel leaves those alone
    trash = trash_mask(n_rows, rows)
    for got, expect, old in zip(ours, ref, (keys, values, pos)):
        assert torch.equal(got[~trash], expect[~trash]) and torch.equal(got[trash], old[trash])
    assert not torch.equal(ours[0], keys), "the plan copies something"
    if torch.cuda.is_available():  # straight from pinned host memory, as a host pool is held
        pinned = tuple(x.clone() for x in (keys, values, pos))
        kernel_recall.recall_pages(host.cpu().pin_memory(), *pinned, pages, slots, rows, held)
        torch.cuda.synchronize()
        assert all(torch.equal(x, y) for x, y in zip(pinned, ours))


def test_recall_pages_into_strided_rows_and_all_skipped():
    b, h, k, n_slots, page, d = 1, 2, 3, 4, 2, 48
    elems = page * d
    rows = SlotRows(heads=b * h, rows_per_head=n_slots + 1, first_slot=0)
    n_rows = b * h * rows.rows_per_head
    host = randn(5 * b * h, 2, elems, seed=9)
    wide = randn(2, n_rows, elems + 7, seed=10)  # rows of one buffer, keys and values side by side, padded rows
    keys, values = wide[0, :, :elems], wide[1, :, 3:3 + elems]
    pos = torch.full((n_rows, page), -5, dtype=torch.long, device=DEVICE)
    pages, slots = random_recall_plan(b, h, k, n_slots, 5, seed=11)
    ref, ref_pos = wide.clone(), pos.clone()
    recall_pages_reference(host, ref[0, :, :elems], ref[1, :, 3:3 + elems], ref_pos, pages, slots, rows)
    before = wide.clone()
    kernel_recall.recall_pages(host, keys, values, pos, pages, slots, rows, None)
    trash = trash_mask(n_rows, rows)
    assert torch.equal(wide[:, ~trash], ref[:, ~trash]) and torch.equal(pos[~trash], ref_pos[~trash])
    assert torch.equal(wide[:, trash], before[:, trash]) and bool((pos[trash] == -5).all())
    assert not torch.equal(wide, before)
    # a plan with nothing to copy (or no pair in heads) changes nothing, and an empty plan launches nothing
    before, before_pos = wide.clone(), pos.clone()
    kernel_recall.recall_pages(host, keys, values, pos, torch.full_like(pages, -1), torch.full_like(slots, -1), rows,
                               None)
    kernel_recall.recall_pages(host, keys, values, pos, pages, slots, rows,
                               torch.zeros(b, h, dtype=torch.bool, device=DEVICE))
    empty = pages[..., :0]
    kernel_recall.recall_pages(host, keys, values, pos, empty, empty, rows, None)
    assert torch.equal(wide, before) and torch.equal(pos, before_pos)
    with pytest.raises(ValueError, match="source"):
        kernel_recall.recall_pages(host[:, :1], keys, values, pos, pages, slots, rows, None)
    with pytest.raises(ValueError, match="destination"):
        kernel_recall.recall_pages(host, keys, values, pos.t().contiguous().t(), pages, slots, rows, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recall_matches_the_reference_through_a_page_table(monkeypatch, dtype):
    """The engine's use: pages of a host pool layer into slots of one device buffer per (sequence, KV head) with a
    trash page, by the dense plan; with kernels on, the table plans with the plan kernel and the library's
    recall_pages copies with the copy kernel, and both equal the references step after step."""
    b, h, d, p, slots, pages = 2, 3, 16, 4, 4, 10
    link = Link(DEVICE)
    pool = HostPool(2, b, h, d, p, dtype, link)
    k, v = randn(b, h, pages * p, d, dtype=dtype, seed=12), randn(b, h, pages * p, d, dtype=dtype, seed=13)
    pool.write(1, to_pages(k, v, p))
    link.synchronize()
    host = pool.pages[1].view(-1, 2, p * d)
    ref_table, table = PageTable(b, h, slots, pages, DEVICE), PageTable(b, h, slots, pages, DEVICE)
    rows = SlotRows(heads=b * h, rows_per_head=slots + 1, first_slot=0)
    ref_k, ref_v = (torch.zeros(b, h, (slots + 1) * p, d, dtype=dtype, device=DEVICE) for _ in range(2))
    ref_pos = torch.full((b, h, (slots + 1) * p), -1, dtype=torch.long, device=DEVICE)
    our_k, our_v, our_pos = ref_k.clone(), ref_v.clone(), ref_pos.clone()
    ref_count, our_count = (torch.zeros((), dtype=torch.long, device=DEVICE) for _ in range(2))
    monkeypatch.setenv("KVTIER_KERNELS", "triton")
    calls = []
    spy(monkeypatch, kernel_recall, "plan_pages", calls)
    spy(monkeypatch, kernel_recall, "recall_pages", calls)
    gen = torch.Generator().manual_seed(14)
    for step in range(3):  # later rounds hit resident pages (-1 entries) and evict others
        wanted = torch.stack([torch.randperm(pages, generator=gen)[:slots - step] for _ in range(b * h)])
        wanted, scores = wanted.view(b, h, -1).to(DEVICE), torch.rand(b, h, pages).to(DEVICE)
        plan = plan_pages_reference(*ref_table.tensors(), wanted, scores, ref_count)
        recall_pages_reference(host, ref_k.view(-1, p * d), ref_v.view(-1, p * d), ref_pos.view(-1, p), *plan, rows)
        ours = table.plan(wanted, scores, our_count)
        recall.recall_pages(host, our_k.view(-1, p * d), our_v.view(-1, p * d), our_pos.view(-1, p), *ours, rows)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        assert torch.equal(ours[0], plan[0]) and torch.equal(ours[1], plan[1])
        assert torch.equal(table.slot_page, ref_table.slot_page) and torch.equal(table.page_slot, ref_table.page_slot)
        assert int(our_count) == int(ref_count)
        n = slots * p
        assert torch.equal(our_k[:, :, :n], ref_k[:, :, :n]) and torch.equal(our_v[:, :, :n], ref_v[:, :, :n])
        assert torch.equal(our_pos[:, :, :n], ref_pos[:, :, :n])
        # the kernel never writes the trash page
        assert not our_k[:, :, n:].any() and not our_v[:, :, n:].any() and bool((our_pos[:, :, n:] == -1).all())
    assert calls == ["plan_pages", "recall_pages"] * 3
    assert int(our_count) > 0
    # and the slots hold their pages' tokens, at the positions the copy wrote
    pos = slot_positions(table, p)
    assert torch.equal(our_pos[:, :, :slots * p], pos)
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
    assert torch.isfinite(out).all()
    # a query row that sees no key (left padding) must be finite, and nothing reads it: SDPA's CUDA backends give
    # zeros there and its CPU math the mean of the values, so only the rows that see a key are compared
    seen = _sees_a_key(mask, b, kv, group, t)
    assert_close(out.masked_fill(~seen, 0), expected.masked_fill(~seen, 0))


def _sees_a_key(mask, b, kv, group, t):
    """Bool [b, t, H, 1]: which query rows of `attend`'s output see at least one key under `mask`."""
    if mask is None:
        return torch.ones(b, t, kv * group, 1, dtype=torch.bool, device=DEVICE)
    if mask.dim() == 3:  # [b, t, n]
        return mask.any(-1)[:, :, None, None].expand(b, t, kv * group, 1)
    seen = mask.any(-1).expand(b, kv, t)  # [b, kv, t]
    return seen.transpose(1, 2).repeat_interleave(group, dim=2).unsqueeze(-1)


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
    spy(monkeypatch, mixed_decode, "decode_attention_mixed", calls)
    spy(monkeypatch, kernel_recall, "plan_pages", calls)
    spy(monkeypatch, kernel_recall, "recall_pages", calls)
    out = kvtier.generate(tiny("llama").to(DEVICE), ids, method=method, max_new_tokens=6, eos_token_id=-1, **options)
    assert torch.equal(out, expected)
    # SpeCache reads the pages not recalled at low precision (rest="lowbit"): the mixed decode kernel
    assert ("decode_attention_mixed" if method == "specache" else "decode_attention") in calls
    scorer = "page_probs" if method == "freekv" and options.get("scorer") != "lowbit" else "dequant_scores"
    assert scorer in calls, "no page selection went through the kernel"
    assert "plan_pages" in calls, "no recall was planned by the kernel"
    assert "recall_pages" in calls, "no recall went through the kernel"
