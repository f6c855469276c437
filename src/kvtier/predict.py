"""What a method will hold and move, predicted from the model's shape without running it.

One function per method (`predict_full`, `predict_offload`, `predict_kvpr`, `predict_freekv`, `predict_specache`;
the last two are presets of one engine, `predict_retrieval`) mirrors the buffers that method allocates for a cache made with
`KVCache(model, method, max_length=length)` and driven through one generation of `length` tokens in all
(`kvtier.generate` or `model.generate`: the cache ends holding `length - 1` tokens, because the last new token
is returned and never fed), with at least one decode step. The figures are the ones `stats()` reports:

- `device_bytes`: the device ledger's peak (`stats()["device_kv_bytes"]`), transient step buffers included;
- `host_bytes`: `stats()["host_kv_bytes"]` at the end; `host_reserved_bytes`: the host memory allocated for
  the whole length (pinned on CUDA), which is what must fit in RAM;
- `h2d_step_bytes`: host->device bytes of the last (largest) decode step. Exact for the exact methods; for
  `freekv` and `specache` what is recalled depends on the data, so it is the most a step can move
  (`h2d_exact` False).

The tests compare these with the ledger and the link counters byte for byte on tiny models of every family;
when a method changes what it allocates, they say so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .models import ModelSpec
from .quant import packed_size
from .retrieval.recall import plan_workspace_bytes

ROW_BYTES = 8  # int64: positions and page-table entries of the retrieval engine


@dataclass(frozen=True)
class Prediction:
    """Bytes one method holds and moves for `batch` sequences generated to `length` tokens."""

    method: str
    options: dict
    length: int
    batch: int
    exact: bool  # the method's output equals full's
    device_bytes: int
    host_bytes: int
    host_reserved_bytes: int
    h2d_step_bytes: int
    h2d_exact: bool  # False: h2d_step_bytes is an upper bound
    parts: dict = field(default_factory=dict)  # device bytes by what holds them
    note: str = ""

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.method}:{opts}" if opts else self.method

    def to_dict(self) -> dict:
        return {"method": self.method, "options": dict(self.options), "label": self.label, "length": self.length,
                "batch": self.batch, "exact": self.exact, "device_bytes": self.device_bytes,
                "host_bytes": self.host_bytes, "host_reserved_bytes": self.host_reserved_bytes,
                "h2d_step_bytes": self.h2d_step_bytes, "h2d_exact": self.h2d_exact, "parts": dict(self.parts),
                "note": self.note}


def elem_bytes(spec: ModelSpec) -> int:
    return spec.dtype.itemsize


def token_layer_bytes(spec: ModelSpec, batch: int) -> int:
    """Keys and values of one token of every sequence in one layer."""
    return batch * 2 * spec.num_kv_heads * spec.head_dim * elem_bytes(spec)


def kernels_on(device: torch.device) -> bool:
    """Whether the retrieval engine takes its Triton kernels on `device` (as `kernels.enabled` decides), without
    needing the device to exist here: a plan for CUDA on a machine without a GPU assumes triton is installed."""
    from . import kernels

    if device.type == "cuda":
        return os.environ.get("KVTIER_KERNELS", "auto") != "torch"
    return kernels.enabled(torch.empty(0, device=device))


def native_on(device: torch.device) -> bool:
    """Whether the C kernels run on `device` (CPU only, as `kernels.native_enabled` decides)."""
    from . import kernels

    return device.type == "cpu" and kernels.native_enabled(torch.empty(0))


def _check(length: int, batch: int) -> None:
    for name, value, low in (("length", length, 3), ("batch", batch, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def predict_full(spec: ModelSpec, length: int, batch: int) -> Prediction:
    """Every layer's keys and values on the device, sized once for `length`."""
    _check(length, batch)
    kv = spec.num_layers * length * token_layer_bytes(spec, batch)
    return Prediction("full", {}, length, batch, True, kv, 0, 0, 0, True, {"kv": kv})


def predict_offload(spec: ModelSpec, length: int, batch: int) -> Prediction:
    """Two staging buffers of one whole layer each; every step streams the whole cache in."""
    _check(length, batch)
    per = token_layer_bytes(spec, batch)
    staging = 2 * length * per
    last = length - 2  # tokens before the last decode step
    # layers 1.. stream in at the step's start length; the last layer prefetches layer 0 with the new token
    h2d = (spec.num_layers * last + 1) * per
    return Prediction("offload", {}, length, batch, True, staging, spec.num_layers * (length - 1) * per,
                      spec.num_layers * length * per, h2d, True, {"staging": staging})


def predict_kvpr(spec: ModelSpec, length: int, batch: int, split="auto", profile=None) -> Prediction:
    """Offload, plus (when the cost model recomputes) two staging buffers of one layer's inputs X, the RoPE
    tables on the device, and X of every token in host memory. Each layer moves X[0:l) and KV[l:s).

    profile: the hardware profile the cost model reads (a dict with h2d_bytes_per_s and matmul_flops_per_s, a
    HardwareProfile, a JSON path; None: this machine's, as the method loads it); read only for split="auto" on
    models where recomputation can pay (hidden size < 2 x KV width): the others never recompute."""
    from .schedule import plan_split

    base = predict_offload(spec, length, batch)
    options = {} if split == "auto" else {"split": split}
    elem = elem_bytes(spec)
    kv_width = spec.num_kv_heads * spec.head_dim
    if split == "auto" and spec.hidden_size >= 2 * kv_width:
        return _replace(base, method="kvpr", options=options,
                        note="grouped-query attention: recomputation cannot pay, kvpr moves what offload moves")
    if split == "auto":
        from .hardware import load_profile

        # as the method loads it: the override given, else this machine's cached (or freshly measured) profile
        hw = load_profile(profile, device=spec.device, dtype=spec.dtype, hidden_size=spec.hidden_size,
                          kv_width=kv_width)
        rates = hw.h2d_bytes_per_s, hw.matmul_flops_per_s
    else:
        rates = 1.0, 1.0  # a fixed split ignores the rates

    def split_at(tokens: int) -> int:
        return plan_split(tokens, batch, spec.hidden_size, kv_width, elem, *rates, split=split).split

    # activations are kept when the split is positive at the prompt (the optimum is a fixed share of s, so the
    # decision at the whole length is the same)
    if (split_at(length - 1) if split == "auto" else split) == 0:
        return _replace(base, method="kvpr", options=options, note="no recomputation: kvpr moves what offload moves")
    per, x_token = token_layer_bytes(spec, batch), batch * spec.hidden_size * elem
    x_staging = 2 * length * x_token
    rope = 2 * batch * length * spec.head_dim * elem
    last = length - 2

    def moved(tokens: int) -> int:
        l = min(split_at(tokens), tokens)
        return l * x_token + (tokens - l) * per

    h2d = (spec.num_layers - 1) * moved(last) + moved(last + 1)
    parts = {"staging": base.device_bytes, "x_staging": x_staging, "rope": rope}
    return Prediction("kvpr", options, length, batch, True, sum(parts.values()),
                      base.host_bytes + spec.num_layers * (length - 1) * x_token,
                      base.host_reserved_bytes + spec.num_layers * length * x_token, h2d, True, parts,
                      "recomputes the leading tokens' KV from their layer inputs")


def _replace(pred: Prediction, **changes) -> Prediction:
    return Prediction(**{**pred.__dict__, **changes})


def engine_options(method: str, options: dict, spec: ModelSpec):
    """The retrieval engine's parts for `method` ("freekv" or "specache") and its options, checked."""
    from .retrieval.options import FreeKVOptions, SpeCacheOptions

    cls = {"freekv": FreeKVOptions, "specache": SpeCacheOptions}[method]
    return cls(**options).engine(spec.head_dim, spec.num_layers)


def _window_start(o, tokens: int) -> int:
    """First position of the device window once `tokens` are stored (the engine's `_append`)."""
    start = (tokens - o.window) // o.window_unit * o.window_unit
    if o.scorer == "lowbit":  # the window keeps what the scorer has not quantized yet
        start = min(start, tokens // o.key_group * o.key_group)
    return max(o.sink, start)


def predict_retrieval(spec: ModelSpec, method: str, options: dict, length: int, batch: int,
                      kernels: bool | None = None) -> Prediction:
    """`freekv` or `specache`: per retrieval layer one device buffer (sink, recalled-page slots, window ring,
    trash page) with row positions and the page table, the scorer's state (digests or low-bit keys) and the
    low-bit values when the rest is read; dense layers whole; the transient scores of one layer, and where no
    kernel reads the low-bit copy in place its dequantized layer; on CPU without the C kernels the reference
    copy's gather buffer. Host memory holds every whole page of the retrieval layers.

    kernels: whether Triton kernels run (None: as they would on the model's device); the C kernels run on CPU
    wherever `kernels.native_enabled` says so."""
    from .kernels import native

    _check(length, batch)
    o = engine_options(method, options, spec)
    if kernels is None:
        kernels = kernels_on(spec.device)
    c_kernels = not kernels and native_on(spec.device)
    b, h, d, elem = batch, spec.num_kv_heads, spec.head_dim, elem_bytes(spec)
    p, lowbit = o.page_size, o.scorer == "lowbit"
    unit = o.key_group if lowbit else p
    capacity = -(-length // unit) * unit
    held = length - 1
    retrieval = spec.num_layers - o.dense_layers
    slots, ring = o.held_rows(capacity)
    rows = o.sink + slots * p + ring + p
    parts = {
        "dense_layers": o.dense_layers * length * token_layer_bytes(spec, batch),
        "buffers": retrieval * 2 * b * h * rows * d * elem,
        "positions": retrieval * b * h * rows * ROW_BYTES,
        # slot -> page (int64) and page -> slot (int32, one more column for -1 entries)
        "page_table": retrieval * b * h * (slots * ROW_BYTES + (capacity // p + 1) * 4),
    }
    if not lowbit:
        parts["digests"] = retrieval * 2 * b * h * (capacity // p) * d * elem
    elif held >= o.key_group:  # the low-bit buffers appear with the first whole key group
        codes = b * h * capacity * packed_size(d, o.bits)
        parts["lowbit_keys"] = retrieval * (codes + 2 * b * h * (capacity // o.key_group) * d * elem)
        if o.rest == "lowbit":
            parts["lowbit_values"] = retrieval * (codes + 2 * b * h * capacity * (d // o.value_group) * elem)
    if retrieval:
        query_rows = spec.num_heads // h * 2  # a speculative step has two query tokens
        workspace = plan_workspace_bytes(b, h, slots)
        if not lowbit:  # the page bounds per query row and their softmax
            workspace += 4 * b * h * query_rows * (capacity // p) * 2
        else:
            workspace += 4 * b * h * query_rows * capacity * 2  # raw token scores and their softmax
            in_place = kernels or (c_kernels and native.lowbit_scoring_fits(spec.dtype, query_rows, d))
            if not in_place:  # the PyTorch reference dequantizes one layer's low-bit copy
                workspace += elem * b * h * capacity * d * (2 if o.rest == "lowbit" else 1)
        parts["step_workspace"] = workspace
    # the last decode step selects among the pages between the sink and the window, and (previous or speculative
    # query) again for the step after it, when the window will have moved
    ahead = o.query in ("previous", "speculative")
    lo, hi = o.sink // p, _window_start(o, held) // p
    if ahead:
        step = (held + 1 - o.window) // o.window_unit * o.window_unit
        if lowbit:
            step = min(step, held // o.key_group * o.key_group)
        hi = max(hi, max(_window_start(o, held), o.sink, step) // p)
    wanted = min(o.slots, hi - lo)
    cpu_reference = not kernels and not c_kernels and spec.device.type == "cpu"
    if retrieval and wanted > 0 and cpu_reference:
        parts["recall_staging"] = b * h * wanted * 2 * p * d * elem
    page = b * h * 2 * p * d * elem
    # a step recalls at most every page it selects (all slots, or all candidates when fewer) once, twice where a
    # correction and the next step's selection both copy
    refills = 2 if o.query == "previous" or (o.query == "speculative" and o.correct > 0) else 1
    h2d = retrieval * refills * max(wanted, 0) * page
    return Prediction(method, dict(options), length, batch, False, sum(parts.values()),
                      retrieval * (held // p) * page, retrieval * (capacity // p) * page, h2d, False, parts,
                      f"{o.slots} slots of {p}-token pages per KV head, {o.sink}-token sink, {o.window}-token window")


def predict_freekv(spec: ModelSpec, length: int, batch: int, kernels: bool | None = None, **options) -> Prediction:
    """`freekv` with its options (budget=..., page_size=..., ...): see `predict_retrieval`."""
    return predict_retrieval(spec, "freekv", options, length, batch, kernels)


def predict_specache(spec: ModelSpec, length: int, batch: int, kernels: bool | None = None, **options) -> Prediction:
    """`specache` with its options (bits=..., topk=..., ...): see `predict_retrieval`."""
    return predict_retrieval(spec, "specache", options, length, batch, kernels)


def predict(spec: ModelSpec, method: str, options: dict | None = None, length: int = 4096, batch: int = 1,
            kernels: bool | None = None, profile=None) -> Prediction:
    """The prediction of any method by name (the options as `KVCache` takes them)."""
    from .methods import method_class

    options = dict(options or {})
    cls = method_class(method)
    unknown = sorted(set(options) - set(cls.defaults))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; valid options: "
                         f"{', '.join(cls.defaults) or 'none'}")
    if method == "full":
        return predict_full(spec, length, batch)
    if method == "offload":
        return predict_offload(spec, length, batch)
    if method == "kvpr":
        return predict_kvpr(spec, length, batch, split=options.get("split", "auto"),
                            profile=options.get("profile") or profile)
    if method in ("freekv", "specache"):
        return predict_retrieval(spec, method, options, length, batch, kernels)
    raise ValueError(f"no prediction for method {method!r}")
