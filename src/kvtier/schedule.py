"""KVPR's cost model: how many tokens to recompute on the device instead of copying their KV.

For one layer, with b sequences of s tokens, hidden size h, KV width n_kv*d (the width of K, and of V),
p bytes per element, host->device bandwidth B (bytes/s) and matmul rate F (FLOP/s):

    T_act(l) = b*l*h*p / B                    copy the layer inputs X of tokens [0, l)
    T_rec(l) = 4*b*l*h*(n_kv*d) / F           K = X W_k and V = X W_v for those tokens
    T_kv(l)  = 2*b*(s-l)*(n_kv*d)*p / B       copy K and V of tokens [l, s)
    T(l)     = T_act(l) + max(T_rec(l), T_kv(l))

The activations go first; the recomputation then overlaps the copy of the KV tail. T is piecewise linear
in l with one break, where T_rec = T_kv, so the best integer l is 0, s, or one of the two integers around
that crossing, and `plan_split` evaluates exactly those. Below the crossing T has slope b*p*(h - 2*n_kv*d)/B:
recomputation can only pay when h < 2*n_kv*d, i.e. with full (or mildly grouped) multi-head attention.
For strongly grouped-query models (Llama-3, Qwen2, SmolLM2) the answer is l = 0, plain offload, and the
plan says so.

Everything here is plain arithmetic on Python numbers: all times are predicted seconds for one layer.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

# Two predicted times closer than this (relative) count as a tie; ties go to the smaller l.
_TIE = 1e-12


@dataclass(frozen=True)
class SplitPlan:
    """The split of one layer's tokens: recompute [0, split), copy the KV of [split, tokens)."""

    split: int  # l: tokens whose K and V are recomputed from copied activations
    tokens: int  # s: tokens in the cache
    t_act: float  # predicted seconds to copy the activations of [0, l)
    t_rec: float  # predicted seconds to recompute K and V of [0, l)
    t_kv: float  # predicted seconds to copy the KV of [l, s)
    t_total: float  # t_act + max(t_rec, t_kv)
    t_offload: float  # predicted seconds of l = 0 (copy all the KV): the baseline
    act_bytes: int  # b*l*h*p
    kv_bytes: int  # 2*b*(s-l)*kv_width*p
    reason: str  # why this l, in one sentence


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_rate(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def _costs(l: int, s: int, b: int, h: int, kv: int, p: float, B: float, F: float) -> tuple[float, float, float]:
    t_act = b * l * h * p / B
    t_rec = 4 * b * l * h * kv / F
    t_kv = 2 * b * (s - l) * kv * p / B
    return t_act, t_rec, t_kv


def crossing_point(tokens: int, hidden_size: int, elem_bytes: float, bandwidth: float, flops: float) -> float:
    """The real l where T_rec(l) = T_kv(l): s*p*F / (p*F + 2*h*B). The KV width cancels out."""
    s, h, p, B, F = tokens, hidden_size, elem_bytes, bandwidth, flops
    return s * p * F / (p * F + 2 * h * B)


def closed_form_mha(tokens: int, hidden_size: int, elem_bytes: float, bandwidth: float, flops: float) -> float:
    """The paper's optimum for full multi-head attention: l* = s*p*F / (p*F + 2*h*B) (a real number).

    With kv_width == hidden_size the activations of a token cost half its KV to move, so T falls until the
    recomputation stops hiding under the KV copy, and the optimum is that crossing point.
    """
    s = _check_int("tokens", tokens, 0)
    h = _check_int("hidden_size", hidden_size, 1)
    p = _check_rate("elem_bytes", elem_bytes)
    B = _check_rate("bandwidth", bandwidth)
    F = _check_rate("flops", flops)
    return crossing_point(s, h, p, B, F)


def plan_split(tokens: int, batch: int, hidden_size: int, kv_width: int, elem_bytes: float,
               bandwidth: float, flops: float, split="auto") -> SplitPlan:
    """Choose l, the number of leading tokens whose K and V are recomputed rather than copied.

    tokens: s, tokens in the cache; batch: b; hidden_size: h (the width of the layer input X);
    kv_width: num_kv_heads * head_dim; elem_bytes: p; bandwidth: B, host->device bytes/s;
    flops: F, matmul FLOP/s. split: "auto" for the exact minimizer of T(l) over integers l in [0, s]
    (ties go to the smaller l), or a fixed int l >= 0, clamped to s (a fixed l larger than the current s
    means "recompute everything there is").
    """
    s = _check_int("tokens", tokens, 0)
    b = _check_int("batch", batch, 1)
    h = _check_int("hidden_size", hidden_size, 1)
    kv = _check_int("kv_width", kv_width, 1)
    p = _check_rate("elem_bytes", elem_bytes)
    B = _check_rate("bandwidth", bandwidth)
    F = _check_rate("flops", flops)
    fixed = None
    if isinstance(split, str):
        if split != "auto":
            raise ValueError(f"split must be 'auto' or a non-negative int, got {split!r}")
    elif isinstance(split, bool) or not isinstance(split, numbers.Integral):
        raise ValueError(f"split must be 'auto' or a non-negative int, got {split!r}")
    elif split < 0:
        raise ValueError(f"split must be >= 0 (tokens to recompute), got {split}")
    else:
        fixed = int(split)

    def total(l: int) -> float:
        t_act, t_rec, t_kv = _costs(l, s, b, h, kv, p, B, F)
        return t_act + max(t_rec, t_kv)

    t_offload = total(0)
    # Exact search: T is linear on [0, x] and on [x, s], x the crossing point, so the integer minimum is at
    # 0, s, floor(x) or ceil(x).
    x = crossing_point(s, h, p, B, F)
    candidates = sorted({0, s, min(s, max(0, math.floor(x))), min(s, max(0, math.ceil(x)))})
    times = {l: total(l) for l in candidates}
    best_t = min(times.values())
    best = next(l for l in candidates if times[l] <= best_t * (1 + _TIE))

    if fixed is None:
        l = best
        reason = _auto_reason(l, s, h, kv, times, t_offload)
    else:
        l = min(fixed, s)
        clamp = f" (asked for {fixed}, clamped to the {s} tokens there are)" if fixed > s else ""
        reason = (f"split fixed by the user at l = {l}{clamp}: predicted {_fmt_time(total(l))} vs "
                  f"{_fmt_time(t_offload)} for plain offload; the cost model would choose l = {best} "
                  f"({_fmt_time(times[best])})")

    t_act, t_rec, t_kv = _costs(l, s, b, h, kv, p, B, F)
    return SplitPlan(
        split=l, tokens=s, t_act=t_act, t_rec=t_rec, t_kv=t_kv, t_total=t_act + max(t_rec, t_kv),
        t_offload=t_offload, act_bytes=_bytes(b * l * h * p), kv_bytes=_bytes(2 * b * (s - l) * kv * p),
        reason=reason,
    )


def _bytes(value: float) -> int:
    return int(math.ceil(value))


def _auto_reason(l: int, s: int, h: int, kv: int, times: dict, t_offload: float) -> str:
    if s == 0:
        return "no tokens in the cache yet, so there is nothing to move or recompute"
    if l == 0 and h >= 2 * kv:
        return (f"recomputation cannot pay: hidden size {h} >= 2 x KV width {kv} (grouped-query attention), "
                "so moving activations costs at least as much as moving the KV they replace; plain offload "
                f"predicted {_fmt_time(t_offload)}")
    if l == 0:
        runner_up = min((t, c) for c, t in times.items() if c > 0)
        return (f"recomputation does not pay for {s} tokens: plain offload predicted {_fmt_time(t_offload)}, "
                f"the best split (l = {runner_up[1]}) {_fmt_time(runner_up[0])}")
    if l == s:
        return (f"recompute all {s} tokens, no KV to move: predicted {_fmt_time(times[l])} vs "
                f"{_fmt_time(t_offload)} for plain offload")
    return (f"recompute {l} of {s} tokens while the KV tail transfers: predicted {_fmt_time(times[l])} vs "
            f"{_fmt_time(t_offload)} for plain offload")
