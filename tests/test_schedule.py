"""KVPR's cost model: exact minimization of T(l), the paper's closed form, grouped-query behaviour."""

from __future__ import annotations

import math
import random

import pytest

from kvtier.schedule import SplitPlan, closed_form_mha, plan_split

GB = 1e9
TF = 1e12


def cost(l, s, b, h, kv, p, B, F):
    """T(l) written out from the formulas in kvtier.schedule's docstring, independently of its code."""
    t_act = b * l * h * p / B
    t_rec = 4 * b * l * h * kv / F
    t_kv = 2 * b * (s - l) * kv * p / B
    return t_act + max(t_rec, t_kv)


def logspace(lo, hi, n):
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


# -- full multi-head attention: the paper's closed form ------------------------------------------------------
@pytest.mark.parametrize("s", [128, 1000, 4096, 32768])
@pytest.mark.parametrize("B", [8 * GB, 25 * GB, 64 * GB])
@pytest.mark.parametrize("F", [50 * TF, 300 * TF, 900 * TF])
def test_closed_form_agrees_with_auto_split_for_mha(s, B, F):
    h, p = 4096, 2
    plan = plan_split(s, 1, h, h, p, B, F)
    star = closed_form_mha(s, h, p, B, F)
    assert 0 < star < s
    assert abs(plan.split - star) <= 1, (plan.split, star)
    assert plan.split > 0 and plan.t_total < plan.t_offload  # with MHA recomputation pays
    assert f"recompute {plan.split} of {s} tokens" in plan.reason
    assert "plain offload" in plan.reason


def test_closed_form_value():
    # l* = s*p*F / (p*F + 2*h*B)
    assert closed_form_mha(1000, 4096, 2, 25 * GB, 300 * TF) == pytest.approx(
        1000 * 2 * 300e12 / (2 * 300e12 + 2 * 4096 * 25e9))
    assert closed_form_mha(0, 4096, 2, 25 * GB, 300 * TF) == 0


# -- grouped-query attention: recomputation cannot pay -------------------------------------------------------
@pytest.mark.parametrize("hidden, kv_width", [(4096, 1024), (576, 192), (4096, 2048)])
@pytest.mark.parametrize("batch", [1, 8])
def test_grouped_query_models_get_plain_offload(hidden, kv_width, batch):
    for B in logspace(1 * GB, 1000 * GB, 7):
        for F in logspace(0.1 * TF, 10000 * TF, 7):
            plan = plan_split(4096, batch, hidden, kv_width, 2, B, F)
            assert plan.split == 0, (hidden, kv_width, B, F, plan)
            assert plan.t_total == plan.t_offload
            assert "grouped-query" in plan.reason
            assert f"hidden size {hidden} >= 2 x KV width {kv_width}" in plan.reason
            assert plan.act_bytes == 0 and plan.kv_bytes == 2 * batch * 4096 * kv_width * 2


def test_mildly_grouped_model_can_still_recompute():
    # h < 2*kv_width: activations are cheaper than the KV they replace, so with a fast matmul l > 0.
    plan = plan_split(4096, 1, 4096, 2560, 2, 25 * GB, 500 * TF)
    assert plan.split > 0 and plan.t_total < plan.t_offload
    assert "grouped-query" not in plan.reason


# -- monotone behaviour -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("hidden, kv_width", [(4096, 4096), (4096, 2560), (2048, 2048), (576, 576)])
@pytest.mark.parametrize("s", [37, 512, 8192])
def test_auto_split_is_monotone_in_flops_and_bandwidth(hidden, kv_width, s):
    splits_f = [plan_split(s, 2, hidden, kv_width, 2, 25 * GB, F).split for F in logspace(0.01 * TF, 5000 * TF, 60)]
    assert splits_f == sorted(splits_f), "faster matmul must never mean less recomputation"
    assert splits_f[0] < splits_f[-1]  # the sweep actually moves the split
    splits_b = [plan_split(s, 2, hidden, kv_width, 2, B, 200 * TF).split for B in logspace(0.1 * GB, 5000 * GB, 60)]
    assert splits_b == sorted(splits_b, reverse=True), "faster link must never mean more recomputation"
    assert splits_b[0] > splits_b[-1]


def test_random_plans_are_in_range_and_never_worse_than_offload():
    rng = random.Random(0)
    for _ in range(500):
        s = rng.choice([0, 1, 2, 3, rng.randrange(1, 200), rng.randrange(1, 200_000)])
        h = rng.choice([576, 2048, 4096, 8192])
        kv = rng.choice([h, h // 2, h // 3, h // 4, h // 8, int(h * 0.75)])
        b = rng.randrange(1, 65)
        p = rng.choice([1, 2, 4])
        B = 10 ** rng.uniform(8, 12)
        F = 10 ** rng.uniform(10, 16)
        plan = plan_split(s, b, h, kv, p, B, F)
        assert isinstance(plan, SplitPlan)
        assert 0 <= plan.split <= s and plan.tokens == s
        assert plan.t_total <= plan.t_offload
        assert plan.t_offload == pytest.approx(cost(0, s, b, h, kv, p, B, F), rel=1e-12, abs=0)
        assert plan.reason


# -- exactness of the candidate search --------------------------------------------------------------------------
def test_candidate_search_equals_brute_force():
    rng = random.Random(1)
    interior = 0
    for _ in range(400):
        s = rng.randrange(0, 80)
        h = rng.choice([64, 576, 1024, 4096])
        kv = rng.choice([h, h // 2, h // 3 or 1, int(h * 0.6), int(h * 0.9)])
        b = rng.randrange(1, 9)
        p = rng.choice([1, 2, 4])
        B = 10 ** rng.uniform(8, 12)
        F = 10 ** rng.uniform(9, 15)
        plan = plan_split(s, b, h, kv, p, B, F)
        times = [cost(l, s, b, h, kv, p, B, F) for l in range(s + 1)]
        best = min(times)
        assert plan.t_total == pytest.approx(best, rel=1e-9, abs=1e-300), (s, h, kv, b, p, B, F, plan.split)
        assert plan.t_total == pytest.approx(times[plan.split], rel=1e-12, abs=1e-300)
        # ties go to the smaller l
        assert plan.split == next(l for l, t in enumerate(times) if t <= best * (1 + 1e-9))
        interior += 0 < plan.split < s
    assert interior > 50, "the sample must exercise splits strictly inside (0, s)"


def test_plan_fields_follow_the_formulas():
    s, b, h, kv, p, B, F = 3000, 4, 4096, 4096, 2, 25 * GB, 300 * TF
    plan = plan_split(s, b, h, kv, p, B, F)
    l = plan.split
    assert plan.t_act == pytest.approx(b * l * h * p / B)
    assert plan.t_rec == pytest.approx(4 * b * l * h * kv / F)
    assert plan.t_kv == pytest.approx(2 * b * (s - l) * kv * p / B)
    assert plan.t_total == pytest.approx(plan.t_act + max(plan.t_rec, plan.t_kv))
    assert plan.act_bytes == b * l * h * p
    assert plan.kv_bytes == 2 * b * (s - l) * kv * p
    assert plan.t_offload == pytest.approx(2 * b * s * kv * p / B)


def test_no_tokens():
    plan = plan_split(0, 1, 4096, 4096, 2, 25 * GB, 300 * TF)
    assert plan.split == 0 and plan.t_total == 0 and plan.t_offload == 0 and plan.kv_bytes == 0
    assert plan.reason


def test_tiny_cache_may_not_pay_even_with_mha():
    # s = 1 with a slow matmul: recomputing the one token costs more than copying its KV.
    plan = plan_split(1, 1, 4096, 4096, 2, 25 * GB, 0.01 * TF)
    assert plan.split == 0
    assert "does not pay" in plan.reason and "grouped-query" not in plan.reason


# -- fixed splits ---------------------------------------------------------------------------------------------
def test_fixed_split_is_used_and_explained():
    s, b, h, kv, p, B, F = 1000, 1, 4096, 4096, 2, 25 * GB, 300 * TF
    auto = plan_split(s, b, h, kv, p, B, F)
    for l in (0, 1, 300, 999, 1000):
        plan = plan_split(s, b, h, kv, p, B, F, split=l)
        assert plan.split == l
        assert plan.t_total == pytest.approx(cost(l, s, b, h, kv, p, B, F))
        assert plan.t_total >= auto.t_total
        assert "fixed by the user" in plan.reason and f"l = {auto.split}" in plan.reason


def test_fixed_split_clamps_to_the_tokens_there_are():
    plan = plan_split(100, 1, 4096, 1024, 2, 25 * GB, 300 * TF, split=500)
    assert plan.split == 100 and plan.kv_bytes == 0 and plan.t_kv == 0
    assert "clamped" in plan.reason
    assert plan_split(0, 1, 4096, 1024, 2, 25 * GB, 300 * TF, split=8).split == 0


@pytest.mark.parametrize("split", [-1, "half", "AUTO", 2.5, True, None, [3]])
def test_bad_split_raises(split):
    with pytest.raises(ValueError, match="split"):
        plan_split(100, 1, 4096, 4096, 2, 25 * GB, 300 * TF, split=split)


# -- bad inputs -------------------------------------------------------------------------------------------------
GOOD = dict(tokens=100, batch=1, hidden_size=4096, kv_width=1024, elem_bytes=2, bandwidth=25 * GB, flops=300 * TF)


@pytest.mark.parametrize("key, value", [
    ("tokens", -1), ("tokens", 2.5), ("tokens", True), ("batch", 0), ("hidden_size", 0), ("kv_width", -8),
    ("elem_bytes", 0), ("bandwidth", 0), ("bandwidth", -1.0), ("bandwidth", math.nan), ("bandwidth", math.inf),
    ("bandwidth", "25e9"), ("flops", 0), ("flops", -3e12), ("flops", math.nan),
])
def test_bad_inputs_raise(key, value):
    with pytest.raises(ValueError, match=key):
        plan_split(**{**GOOD, key: value})


@pytest.mark.parametrize("args", [(-5, 4096, 2, 25 * GB, 1 * TF), (10, 4096, 2, 0, 1 * TF),
                                  (10, 4096, 2, 25 * GB, -1.0), (10, 0, 2, 25 * GB, 1 * TF)])
def test_closed_form_bad_inputs_raise(args):
    with pytest.raises(ValueError):
        closed_form_mha(*args)
