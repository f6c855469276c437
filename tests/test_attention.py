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

@pytest.mark.parametrize("num_heads,num_kv", HEADS)
def test_causal_attention_equals_sdpa_is_causal(num_heads, num_kv):
    b, t, d = 2, 10, 16
    q, k, v = qkv(b, num_heads, num_kv, t, t, d, seed=num_heads)
    scaling = d ** -0.5
    out = causal_attention(q, k, v, scaling, None, q_offset=0)
    torch.testing.assert_close(out, sdpa(q, k, v, scaling, is_causal=True), atol=ATOL, rtol=RTOL)


def explicit_causal(valid, t, n, q_offset, b):
    q_pos = torch.arange(q_offset, q_offset + t)
    mask = torch.arange(n)[None, :] <= q_pos[:, None]  # [t, n]
    mask = mask.expand(b, t, n)
    if valid is not None:
        mask = mask & valid[:, None, :]
    return mask.unsqueeze(1)  # [b, 1, t, n] for sdpa


@pytest.mark.parametrize("num_heads,num_kv", HEADS)
@pytest.mark.parametrize("t,n", [(1, 12), (5, 12), (12, 12)])
@pytest.mark.parametrize("padded", [False, True])
def test_causal_attention_with_offset_and_padding_equals_sdpa(num_heads, num_kv, t, n, padded):
    b, d = 2, 8
    q, k, v = qkv(b, num_heads, num_kv, t, n, d, seed=t * 31 + n + num_heads)
    q_offset = n - t
    valid = None
    if padded:
        valid = torch.ones(b, n, dtype=torch.bool)
        valid[1, :3] = False  # left padding of sequence 1
    scaling = 0.35
    out = causal_attention(q, k, v, scaling, valid, q_offset)
    expected = sdpa(q, k, v, scaling, attn_mask=explicit_causal(valid, t, n, q_offset, b))
    # query rows that see no key at all (padding queries at q_offset=0) are not comparable (NaN in sdpa)
    seen = explicit_causal(valid, t, n, q_offset, b)[:, 0].any(-1)  # [b, t]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[seen], expected[seen], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("elements", [64, 300, 600])
@pytest.mark.parametrize("num_heads,num_kv", HEADS)
@pytest.mark.parametrize("padded", [False, True])
def test_causal_attention_chunked_equals_sdpa(monkeypatch, elements, num_heads, num_kv, padded):
    b, t, n, d = 2, 9, 14, 8
    q_offset = n - t  # 5 > padding length, so no query row is fully masked
    q, k, v = qkv(b, num_heads, num_kv, t, n, d, seed=elements + num_heads)
    valid = None
    if padded:
        valid = torch.ones(b, n, dtype=torch.bool)
        valid[0, :2] = False
        valid[1, :4] = False
    scaling = d ** -0.5
    unchunked = causal_attention(q, k, v, scaling, valid, q_offset)

    calls = []
    real_attend = attention.attend

    def counting_attend(*args, **kwargs):
        calls.append(args[0].shape[2])
        return real_attend(*args, **kwargs)

    monkeypatch.setattr(attention, "_PREFILL_CHUNK_ELEMENTS", elements)
    monkeypatch.setattr(attention, "attend", counting_attend)
    out = causal_attention(q, k, v, scaling, valid, q_offset)
    chunk = max(1, elements // (b * num_heads * n))
    assert chunk < t  # the chunked path really ran
    assert len(calls) == -(-t // chunk) and sum(calls) == t

    expected = sdpa(q, k, v, scaling, attn_mask=explicit_causal(valid, t, n, q_offset, b))
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out, unchunked, atol=ATOL, rtol=RTOL)


def test_causal_attention_chunked_prefill_from_zero_with_left_padding(monkeypatch):
    # q_offset 0: the padding queries see nothing; they must stay finite, the others match sdpa.
    b, num_heads, num_kv, t, d = 2, 4, 2, 11, 8
    q, k, v = qkv(b, num_heads, num_kv, t, t, d, seed=99)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, :3] = False
    monkeypatch.setattr(attention, "_PREFILL_CHUNK_ELEMENTS", 64)
    out = causal_attention(q, k, v, 0.3, valid, 0)
    assert torch.isfinite(out).all()
    mask = explicit_causal(valid, t, t, 0, b)
    seen = mask[:, 0].any(-1)
    assert not bool(seen.all())
    expected = sdpa(q, k, v, 0.3, attn_mask=mask)
    torch.testing.assert_close(out[seen], expected[seen], atol=ATOL, rtol=RTOL)
