"""attend / causal_mask / causal_attention against straightforward references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kvtier.attention as attention
from kvtier.attention import attend, causal_attention, causal_mask

ATOL = RTOL = 1e-5


def reference(q, k, v, scaling, mask=None):
    """Repeat KV heads, matmul, float32 softmax with -inf for masked entries. Returns [b, t, H, d]."""
    num_heads, num_kv = q.shape[1], k.shape[1]
    group = num_heads // num_kv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    if mask is not None:
        if mask.dim() == 3:
            mask = mask.unsqueeze(1)  # [b, 1, t, n]
        else:
            mask = mask.repeat_interleave(group, dim=1)  # [b, H, t, n]
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float()).to(v.dtype).transpose(1, 2)


def sdpa(q, k, v, scaling, is_causal=False, attn_mask=None):
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scaling)
    return out.transpose(1, 2)


def qkv(b, num_heads, num_kv, t, n, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, num_heads, t, d, generator=g, dtype=dtype)
    k = torch.randn(b, num_kv, n, d, generator=g, dtype=dtype)
    v = torch.randn(b, num_kv, n, d, generator=g, dtype=dtype)
    return q, k, v


HEADS = [(4, 2), (6, 6), (9, 3)]


@pytest.mark.parametrize("num_heads,num_kv", HEADS)
@pytest.mark.parametrize("t,n", [(1, 1), (1, 17), (5, 11), (8, 8)])
def test_attend_matches_reference_without_mask(num_heads, num_kv, t, n):
    q, k, v = qkv(2, num_heads, num_kv, t, n, 16, seed=num_heads * 100 + t * 10 + n)
    scaling = 16 ** -0.5
    out = attend(q, k, v, scaling)
    assert out.shape == (2, t, num_heads, 16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(q, k, v, scaling), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("num_heads,num_kv", HEADS)
@pytest.mark.parametrize("t,n", [(1, 13), (4, 9), (7, 7)])
@pytest.mark.parametrize("per_head", [False, True])
def test_attend_matches_reference_with_mask(num_heads, num_kv, t, n, per_head):
    b, d = 2, 8
    q, k, v = qkv(b, num_heads, num_kv, t, n, d, seed=7 + t + n + num_heads)
    torch.manual_seed(t * n + num_heads + per_head)
    shape = (b, num_kv, t, n) if per_head else (b, t, n)
    mask = torch.rand(shape) < 0.6
    mask[..., 0] = True  # no fully masked row here: the -inf reference would be NaN there
    scaling = 0.3
    out = attend(q, k, v, scaling, mask)
    expected = reference(q, k, v, scaling, mask)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    # the mask really matters: without it the result differs
    assert not torch.allclose(out, attend(q, k, v, scaling), atol=1e-3)


def test_attend_per_head_mask_is_applied_to_the_right_group():
    # KV head 0 may only attend to key 0, KV head 1 only to key 1: every query head of group j must return v[:, j, j].
    b, num_heads, num_kv, t, n, d = 1, 4, 2, 3, 4, 5
    q, k, v = qkv(b, num_heads, num_kv, t, n, d, seed=3)
    mask = torch.zeros(b, num_kv, t, n, dtype=torch.bool)
    mask[:, 0, :, 0] = True
    mask[:, 1, :, 1] = True
    out = attend(q, k, v, 1.0, mask)  # [b, t, H, d]
    for head in range(num_heads):
        kv = head // (num_heads // num_kv)
        torch.testing.assert_close(out[0, :, head], v[0, kv, kv].expand(t, d), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("num_heads,num_kv", HEADS)
def test_attend_fully_masked_row_is_finite(num_heads, num_kv):
    b, t, n, d = 2, 4, 6, 8
    q, k, v = qkv(b, num_heads, num_kv, t, n, d, seed=11)
    mask = torch.ones(b, t, n, dtype=torch.bool)
    mask[1, 0] = False  # sequence 1, query 0: a left-padding query that sees nothing
    mask[0, 2, 3:] = False
    out = attend(q, k, v, 0.25, mask)
    assert torch.isfinite(out).all()
    expected = reference(q, k, v, 0.25, mask)
    assert torch.isnan(expected[1, 0]).all()  # what -inf masking would have given
    keep = torch.ones(b, t, dtype=torch.bool)
    keep[1, 0] = False
    torch.testing.assert_close(out[keep], expected[keep], atol=ATOL, rtol=RTOL)


def test_attend_half_precision_returns_input_dtype():
    q, k, v = qkv(1, 4, 2, 3, 10, 16, seed=5)
    out = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.25)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(q, k, v, 0.25), atol=3e-2, rtol=3e-2)


# -- causal_mask ------------------------------------------------------------------------------------

def test_causal_mask_none_when_nothing_is_masked():
    for n in (1, 2, 9):
        assert causal_mask(None, 1, n, n - 1, "cpu") is None
    # a query past every key (q_offset >= n - 1) sees everything too
    assert causal_mask(None, 3, 4, 3, "cpu") is None


def test_causal_mask_single_query_with_padding_is_the_padding_mask():
    valid = torch.tensor([[True, True, True, True], [False, False, True, True]])
    mask = causal_mask(valid, 1, 4, 3, "cpu")
    assert mask.shape == (2, 1, 4)
    assert torch.equal(mask[:, 0], valid)


@pytest.mark.parametrize("t,n,q_offset", [(4, 4, 0), (3, 7, 4), (1, 5, 2), (5, 9, 1)])
def test_causal_mask_values(t, n, q_offset):
    mask = causal_mask(None, t, n, q_offset, "cpu")
    assert mask.dtype == torch.bool and mask.shape == (1, t, n)
    for i in range(t):
        for j in range(n):
            assert bool(mask[0, i, j]) == (j <= q_offset + i), (i, j)


def test_causal_mask_combines_with_padding():
    t, n, q_offset = 3, 6, 3
    valid = torch.tensor([[True] * 6, [False, False, True, True, True, True], [True, False, True, False, True, True]])
    mask = causal_mask(valid, t, n, q_offset, "cpu")
    assert mask.shape == (3, t, n)
    for s in range(3):
        for i in range(t):
            for j in range(n):
                assert bool(mask[s, i, j]) == (j <= q_offset + i and bool(valid[s, j])), (s, i, j)


def test_causal_mask_uses_only_the_first_n_valid_positions():
    valid = torch.tensor([[False, True, True, True, False, False]])  # longer than n
    mask = causal_mask(valid, 1, 4, 3, "cpu")
    assert torch.equal(mask, valid[:, None, :4])


# -- causal_attention -------------------------------------------------------------------------------
# causal_attention runs torch's scaled_dot_product_attention; its reference here is `attend` with `causal_mask`
# (the matmul path it replaced), and an independent sdpa call with KV heads repeated.

CAUSAL_HEADS = [(4, 4), (8, 2), (9, 3)]  # GQA groups 1, 4 and 3


def attend_reference(q, k, v, scaling, valid, q_offset):
    """Matmul attention on float32 copies, written out here (attend itself runs SDPA): [b, t, H, d] float32.
    A row that sees no key gets equal weights."""
    b, num_heads, t, d = q.shape
    num_kv, n = k.shape[1], k.shape[2]
    group = num_heads // num_kv
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scaling
    mask = causal_mask(valid, t, n, q_offset, "cpu")
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(1), torch.finfo(torch.float32).min)
    return torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2)


def tolerance(dtype):
    return {"atol": ATOL, "rtol": RTOL} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Records the keyword arguments and query length of every scaled_dot_product_attention call."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append({"t": q.shape[2], "n": k.shape[2], "kv_heads": k.shape[1], **kwargs})
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    return calls


def left_padded(b, n, pads):
    valid = torch.ones(b, n, dtype=torch.bool)
    for row, pad in enumerate(pads):
        valid[row, :pad] = False
    return valid


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv", CAUSAL_HEADS)
def test_causal_attention_full_prefill_uses_is_causal(sdpa_calls, num_heads, num_kv, dtype):
    b, t, d = 2, 13, 16
    q, k, v = qkv(b, num_heads, num_kv, t, t, d, seed=num_heads, dtype=dtype)
    scaling = d ** -0.5
    out = causal_attention(q, k, v, scaling, None, q_offset=0)
    assert out.shape == (b, t, num_heads, d) and out.dtype == dtype
    torch.testing.assert_close(out.float(), attend_reference(q, k, v, scaling, None, 0), **tolerance(dtype))
    # no mask at all, and the KV heads as they are
    assert len(sdpa_calls) == 1
    call = sdpa_calls[0]
    assert call["is_causal"] and call["attn_mask"] is None and call["kv_heads"] == num_kv
    assert call.get("enable_gqa", False) == (num_heads != num_kv)


@pytest.mark.parametrize("num_heads,num_kv", HEADS)
def test_causal_attention_equals_sdpa_is_causal(num_heads, num_kv):
    b, t, d = 2, 10, 16
    q, k, v = qkv(b, num_heads, num_kv, t, t, d, seed=num_heads)
    scaling = d ** -0.5
    out = causal_attention(q, k, v, scaling, None, q_offset=0)
    torch.testing.assert_close(out, sdpa(q, k, v, scaling, is_causal=True), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv", CAUSAL_HEADS)
@pytest.mark.parametrize("t,n", [(1, 12), (2, 12), (5, 12), (7, 9)])
def test_causal_attention_with_offset_equals_attend(sdpa_calls, num_heads, num_kv, t, n, dtype):
    # a later chunk of a chunked prefill (or a decode step when t == 1): queries at n - t .. n - 1
    b, d = 2, 8
    q, k, v = qkv(b, num_heads, num_kv, t, n, d, seed=t * 31 + n + num_heads, dtype=dtype)
    q_offset = n - t
    out = causal_attention(q, k, v, 0.35, None, q_offset)
    torch.testing.assert_close(out.float(), attend_reference(q, k, v, 0.35, None, q_offset), **tolerance(dtype))
    (call,) = sdpa_calls
    assert not call["is_causal"]  # is_causal would align the diagonal to key 0, not to q_offset
    if t == 1:
        assert call["attn_mask"] is None  # the last query sees every key
    else:
        assert call["attn_mask"].dtype == torch.bool and call["attn_mask"].shape == (1, 1, t, n)


@pytest.mark.parametrize("num_heads,num_kv", HEADS)
@pytest.mark.parametrize("t,n", [(1, 12), (5, 12), (12, 12)])
@pytest.mark.parametrize("padded", [False, True])
def test_causal_attention_with_offset_and_padding_equals_sdpa(num_heads, num_kv, t, n, padded):
    b, d = 2, 8
    q, k, v = qkv(b, num_heads, num_kv, t, n, d, seed=t * 31 + n + num_heads)
    q_offset = n - t
    valid = left_padded(b, n, [0, 3]) if padded else None
    scaling = 0.35
    out = causal_attention(q, k, v, scaling, valid, q_offset)
    expected = sdpa(q, k, v, scaling, attn_mask=explicit_causal(valid, t, n, q_offset, b))
    # query rows that see no key at all (padding queries at q_offset=0) are not comparable
    seen = explicit_causal(valid, t, n, q_offset, b)[:, 0].any(-1)  # [b, t]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[seen], expected[seen], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv", CAUSAL_HEADS)
@pytest.mark.parametrize("q_offset", [0, 4])
def test_causal_attention_left_padding(num_heads, num_kv, q_offset, dtype):
    # sequence 1 has 5 padding positions, sequence 2 has 1, sequence 0 none: at q_offset 0 the padding queries
    # of sequences 1 and 2 see no key at all. They must stay finite; every other row matches attend.
    b, t, d = 3, 9, 16
    n = q_offset + t
    q, k, v = qkv(b, num_heads, num_kv, t, n, d, seed=5 + q_offset + num_heads, dtype=dtype)
    valid = left_padded(b, n, [0, 5, 1])
    out = causal_attention(q, k, v, 0.25, valid, q_offset)
    assert out.dtype == dtype and torch.isfinite(out).all()
    seen = causal_mask(valid, t, n, q_offset, "cpu").any(-1)  # [b, t]
    if q_offset == 0:
        assert not bool(seen.all())
    expected = attend_reference(q, k, v, 0.25, valid, q_offset)
    torch.testing.assert_close(out.float()[seen], expected[seen], **tolerance(dtype))
    # the padding really is masked: without it the real rows of the padded sequences differ
    unpadded = attend_reference(q, k, v, 0.25, None, q_offset)
    assert not torch.allclose(out.float()[1][seen[1]], unpadded[1][seen[1]], atol=1e-2)


def test_sdpa_mask_unmasks_only_rows_that_see_nothing():
    t, n = 6, 6
    valid = left_padded(2, n, [0, 3])
    mask = attention._sdpa_mask(valid, t, n, 0, "cpu")
    plain = causal_mask(valid, t, n, 0, "cpu")
    assert mask.shape == (2, 1, t, n) and mask.dtype == torch.bool
    assert mask.any(-1).all()  # no row fully masked: SDPA returns NaN or 0 for those depending on backend
    seen = plain.any(-1)
    assert torch.equal(mask[:, 0][seen], plain[seen])
    # sequence 1's padding queries see the keys up to their own position instead of none: what they would see
    # in any chunk of the prompt
    assert torch.equal(mask[1, 0, :3], torch.ones(3, n, dtype=torch.bool).tril())
    assert attention._sdpa_mask(None, 1, n, n - 1, "cpu") is None


def explicit_causal(valid, t, n, q_offset, b):
    q_pos = torch.arange(q_offset, q_offset + t)
    mask = torch.arange(n)[None, :] <= q_pos[:, None]  # [t, n]
    mask = mask.expand(b, t, n)
    if valid is not None:
        mask = mask & valid[:, None, :]
    return mask.unsqueeze(1)  # [b, 1, t, n] for sdpa


@pytest.mark.parametrize("elements", [28, 64, 200])
@pytest.mark.parametrize("num_heads,num_kv", CAUSAL_HEADS)
@pytest.mark.parametrize("padded", [False, True])
def test_causal_attention_chunked_equals_attend(monkeypatch, sdpa_calls, elements, num_heads, num_kv, padded):
    b, t, n, d = 2, 9, 14, 8
    q_offset = n - t  # 5 > padding length, so no query row is fully masked
    q, k, v = qkv(b, num_heads, num_kv, t, n, d, seed=elements + num_heads)
    valid = left_padded(b, n, [2, 4]) if padded else None
    scaling = d ** -0.5
    unchunked = causal_attention(q, k, v, scaling, valid, q_offset)
    assert len(sdpa_calls) == 1
    sdpa_calls.clear()

    monkeypatch.setattr(attention, "_PREFILL_CHUNK_ELEMENTS", elements)
    out = causal_attention(q, k, v, scaling, valid, q_offset)
    chunk = max(1, elements // (b * n))
    assert chunk < t  # the chunked path really ran
    assert len(sdpa_calls) == -(-t // chunk) and sum(c["t"] for c in sdpa_calls) == t
    stop = 0
    for c in sdpa_calls:
        stop += c["t"]
        assert c["n"] == q_offset + stop  # keys past the chunk's last query are left out
        # the mask stays within the bound (a one-query chunk whose query sees every key needs none)
        assert c["attn_mask"] is None and c["t"] == 1 and not padded or c["attn_mask"].numel() <= elements

    torch.testing.assert_close(out, attend_reference(q, k, v, scaling, valid, q_offset), atol=ATOL, rtol=RTOL)
    expected = sdpa(q, k, v, scaling, attn_mask=explicit_causal(valid, t, n, q_offset, b))
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out, unchunked, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv", CAUSAL_HEADS)
def test_causal_attention_chunked_prefill_from_zero_with_left_padding(monkeypatch, num_heads, num_kv, dtype):
    # q_offset 0: the padding queries see nothing; they must stay finite, the others match attend.
    b, t, d = 2, 11, 8
    q, k, v = qkv(b, num_heads, num_kv, t, t, d, seed=99, dtype=dtype)
    valid = left_padded(b, t, [0, 3])
    monkeypatch.setattr(attention, "_PREFILL_CHUNK_ELEMENTS", 64)
    out = causal_attention(q, k, v, 0.3, valid, 0)
    assert torch.isfinite(out).all()
    seen = causal_mask(valid, t, t, 0, "cpu").any(-1)
    assert not bool(seen.all())
    torch.testing.assert_close(out.float()[seen], attend_reference(q, k, v, 0.3, valid, 0)[seen],
                               **tolerance(dtype))


@pytest.mark.parametrize("masked", [False, True])
def test_causal_attention_repeats_kv_heads_without_enable_gqa(monkeypatch, sdpa_calls, masked):
    # torch < 2.5 has no enable_gqa: the KV heads are repeated instead, with the same result
    b, num_heads, num_kv, t, d = 2, 8, 2, 7, 8
    q_offset = 3 if masked else 0
    n = q_offset + t
    q, k, v = qkv(b, num_heads, num_kv, t, n, d, seed=17)
    native = causal_attention(q, k, v, 0.3, None, q_offset)
    assert sdpa_calls[-1]["enable_gqa"] and sdpa_calls[-1]["kv_heads"] == num_kv
    monkeypatch.setattr(attention, "_SDPA_HAS_GQA", False)
    repeated = causal_attention(q, k, v, 0.3, None, q_offset)
    assert "enable_gqa" not in sdpa_calls[-1] and sdpa_calls[-1]["kv_heads"] == num_heads
    torch.testing.assert_close(repeated, native, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(repeated, attend_reference(q, k, v, 0.3, None, q_offset), atol=ATOL, rtol=RTOL)
