"""method="auto": the method and options that keep the device-side KV state within a device-memory budget.

Exact methods come first: `full` when the whole cache fits, else `kvpr` where recomputation pays (a multi-head
model, with a hardware profile to plan with), else `offload` (two layers of staging). Only when none of them
fits, the approximate methods, in the order of their measured fidelity (docs/results/fidelity-bars: needles found
against full's, perplexity against full's at 2k and 4k), each with the largest budget that fits. Every figure
comes from `kvtier.predict`, so what is chosen is what the ledger will measure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .models import ModelSpec
from .predict import Prediction, engine_options, predict
from .retrieval.options import FreeKVOptions
from .sizes import format_bytes


@dataclass(frozen=True)
class Rung:
    """One approximate setting auto may choose, best first. A `freekv` rung gets the largest budget that fits, at
    least `min_share` of the length (the share its fidelity was measured at; 0: any valid budget)."""

    method: str
    options: dict
    fidelity: str  # what the measurements say, for the reason auto gives
    min_share: float | None = None  # freekv only


# Each rung's `fidelity` sums up its row of the fidelity bars (embedded model; docs/results/fidelity-bars, where the
# numbers and how they were measured are): needles found of 10 (full: 5), perplexity delta against full's on
# prose / code at 2k and 4k. FreeKV rungs ran at a quarter of the context.
LADDER = (
    Rung("freekv", {"scorer": "lowbit", "page_size": 8, "rest": "lowbit", "tau": 0.9},
         "meets every fidelity bar (needles: 5 of 10, as full; perplexity within 0.03 of full's at 2k and 4k)",
         min_share=0.25),
    Rung("specache", {"group_size": 32, "correct": 0.9},
         "needles 5 of 10, as full; perplexity within 0.04 of full's at 2k and 4k"),
    Rung("freekv", {"scorer": "lowbit", "page_size": 8},
         "needles 5 of 10, as full; perplexity within 0.09 of full's at 2k, +0.16 on prose at 4k", min_share=0.25),
    Rung("specache", {}, "needles 1 of 10 (full: 5); perplexity within 0.1 of full's at 2k and 4k"),
    Rung("freekv", {"scorer": "lowbit", "page_size": 8, "rest": "lowbit", "tau": 0.9, "dense_layers": 0},
         "below the quarter-context budget its bars were met at (at 256 tokens of 4k: prose perplexity +0.45)",
         min_share=0.0),
    Rung("specache", {"bits": 1}, "needles 0 of 10; perplexity +1.3 (prose) and +0.7 (code) over full's at 2k"),
    Rung("freekv", {"dense_layers": 0},
         "FreeKV as the paper has it, min/max page digests: needles 0 of 10, perplexity +0.4 at a quarter of 2k",
         min_share=0.0),
)


@dataclass(frozen=True)
class AutoChoice:
    """What auto chose for a budget, and why."""

    method: str
    options: dict
    prediction: Prediction
    device_memory: int
    reason: str
    considered: list = field(default_factory=list)  # Predictions tried, in order (the best-fitting of each rung)

    @property
    def label(self) -> str:
        return self.prediction.label

    def to_dict(self) -> dict:
        return {"method": self.method, "options": dict(self.options), "label": self.label,
                "device_memory": self.device_memory, "predicted_device_kv_bytes": self.prediction.device_bytes,
                "reason": self.reason}


def recompute_can_pay(spec: ModelSpec) -> bool:
    """KVPR's cost model can choose to recompute only when moving a token's input X costs less than its KV."""
    return spec.hidden_size < 2 * spec.num_kv_heads * spec.head_dim


MAX_SHARE = 0.25  # of the length: the budget the fidelity bars were met at, and the most a rung is given


def _budget_bounds(spec: ModelSpec, options: dict, length: int, min_share: float) -> tuple[int, int]:
    """Budgets (multiples of the page size) a freekv rung may take: at least min_share of the length and the
    smallest valid one, at most MAX_SHARE of it (auto reaches these rungs only when even offload's two layers do
    not fit, and a larger budget would approach full's footprint)."""
    p = options.get("page_size", FreeKVOptions.page_size)
    # one page each of sink, window and recalled slots at least; the sink and window grow with the budget (up to
    # FreeKVOptions.edge_tokens each), so step up to the first budget the options accept
    for lo in range(3 * p, 2 * FreeKVOptions.edge_tokens + 2 * p, p):
        try:
            engine_options("freekv", {**options, "budget": lo}, spec)
            break
        except ValueError:
            continue
    else:
        engine_options("freekv", {**options, "budget": lo}, spec)  # raises what is wrong with the options
    lo = max(lo, -(-int(min_share * length) // p) * p)
    hi = max(lo, -(-int(MAX_SHARE * length) // p) * p)
    return lo, hi


def fit_budget(spec, rung: Rung, length, batch, device_memory, kernels) -> Prediction:
    """The prediction for a freekv `rung` at the largest budget (whole pages, within the rung's bounds for `length`
    tokens) whose device bytes fit in `device_memory`; at its smallest budget when none does. Used by `choose`
    and by kvtier.plan's table."""
    p = rung.options.get("page_size", FreeKVOptions.page_size)
    lo, hi = _budget_bounds(spec, rung.options, length, rung.min_share or 0.0)

    def at(budget: int) -> Prediction:
        return predict(spec, "freekv", {**rung.options, "budget": budget}, length, batch, kernels)

    if at(lo).device_bytes > device_memory:
        return at(lo)
    # device bytes grow with the budget: binary search over whole pages
    a, b = lo // p, hi // p
    while a < b:
        mid = (a + b + 1) // 2
        if at(mid * p).device_bytes <= device_memory:
            a = mid
        else:
            b = mid - 1
    return at(a * p)


def choose(spec: ModelSpec, device_memory: int, length: int, batch: int = 1, kernels: bool | None = None,
           profile=None) -> AutoChoice:
    """The method auto runs with for `batch` sequences of up to `length` tokens within `device_memory` bytes of
    device KV state. ValueError naming the smallest budget that would work when nothing fits.

    profile: a hardware profile for kvpr's cost model (multi-head models only); without one auto streams with
    offload, which kvpr equals on grouped-query models."""
    budget = format_bytes(device_memory)
    full = predict(spec, "full", {}, length, batch)
    considered = [full]
    if full.device_bytes <= device_memory:
        return AutoChoice("full", {}, full, device_memory,
                          f"exact: the whole cache ({format_bytes(full.device_bytes)}) fits in {budget}; nothing "
                          "moves between host and device", considered)
    streaming = []
    if profile is not None and recompute_can_pay(spec):
        streaming.append(predict(spec, "kvpr", {}, length, batch, profile=profile))
    streaming.append(predict(spec, "offload", {}, length, batch))
    for pred in streaming:
        considered.append(pred)
        if pred.device_bytes <= device_memory:
            return AutoChoice(pred.method, {}, pred, device_memory,
                              f"exact: full needs {format_bytes(full.device_bytes)} > {budget}; {pred.method} keeps "
                              f"{format_bytes(pred.device_bytes)} on the device and moves "
                              f"{format_bytes(pred.h2d_step_bytes)} per decode step", considered)
    for rung in LADDER:
        if rung.method == "freekv":
            pred = fit_budget(spec, rung, length, batch, device_memory, kernels)
        else:
            pred = predict(spec, rung.method, rung.options, length, batch, kernels)
        considered.append(pred)
        if pred.device_bytes <= device_memory:
            return AutoChoice(pred.method, pred.options, pred, device_memory,
                              f"approximate: no exact method fits in {budget} (full needs "
                              f"{format_bytes(full.device_bytes)}, {streaming[-1].method} "
                              f"{format_bytes(streaming[-1].device_bytes)}); {pred.label} keeps "
                              f"{format_bytes(pred.device_bytes)} and is the most faithful that fits: {rung.fidelity}",
                              considered)
    smallest = min(considered, key=lambda p: p.device_bytes)
    raise ValueError(f"device_memory={budget} is too small for {batch} sequence(s) of {length} tokens: the "
                     f"smallest device KV state is {smallest.label} with {format_bytes(smallest.device_bytes)} "
                     f"({smallest.device_bytes} bytes); give device_memory >= {smallest.device_bytes} bytes, or a "
                     "shorter max_length or smaller batch")
