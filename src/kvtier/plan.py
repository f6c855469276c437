"""`kvtier plan`: what every method would hold and move for a real model shape, and what auto picks, without
loading weights (the model is built on the meta device; its parameters have shapes and no memory).

For each context and batch the device's memory is split: `utilization` of it (default 0.9: the CUDA context,
cuBLAS workspaces and allocator fragmentation take the rest, as serving engines assume), minus the weights,
minus one prefill chunk's activations, is the budget for KV state. Every method's figures come from
`kvtier.predict`; a method fits when its device KV state fits that budget and its host KV fits host memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .auto import LADDER, choose, fit_budget, recompute_can_pay
from .models import ModelSpec
from .predict import Prediction, predict
from .sizes import format_bytes

ASSUMED_BANDWIDTH = 25e9  # bytes/s: PCIe 4.0 x16 as measured in practice, when nothing better is known
PREFILL_CHUNK = 2048  # kvtier.generate's prefill chunk


@dataclass(frozen=True)
class ModelShape:
    """What a plan needs of a model: its spec (as the cache would see it) and the sizes beyond attention."""

    name: str
    spec: ModelSpec
    weight_bytes: int
    intermediate_size: int
    vocab_size: int

    def activation_bytes(self, context: int, batch: int) -> int:
        """One prefill chunk's transient tensors: hidden state, q/k/v and attention output (4 x hidden), the MLP's
        gate, up and activation (3 x intermediate), and the last position's float32 logits."""
        tokens = batch * min(context, PREFILL_CHUNK)
        elem = self.spec.dtype.itemsize
        return tokens * (4 * self.spec.hidden_size + 3 * self.intermediate_size) * elem + batch * self.vocab_size * 4


def load_config(model_config: str | None = None, model: str | None = None):
    """(transformers config, name) of a named shape (`kvtier.bench.shapes`: llama-3.1-8b, ...) or of a model (the
    embedded name, a folder, a .gguf file, a Hugging Face id in the local cache). Reads the config only."""
    if model_config is not None:
        from .bench.shapes import model_config as shape_config

        return shape_config(model_config), model_config
    from transformers import AutoConfig

    from .models import DEFAULT_MODEL, resolve_model

    source, kwargs = resolve_model(model)
    return AutoConfig.from_pretrained(source, **kwargs), model or DEFAULT_MODEL


def model_shape(model_config: str | None = None, model: str | None = None, dtype=torch.bfloat16,
                device="cuda", config=None) -> ModelShape:
    """A named shape or a model (see `load_config`; or its `config` as given) built on the meta device: its
    parameters have shapes and no memory, no weight is read."""
    from transformers import AutoModelForCausalLM

    if config is None:
        config, name = load_config(model_config, model)
    else:
        name = model_config or model or "smollm2-135m"
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    spec = ModelSpec.from_model(meta)  # unsupported family or sliding windows: refused here
    spec = ModelSpec(**{**spec.__dict__, "dtype": dtype, "device": torch.device(device)})
    elem = dtype.itemsize
    weights = sum(p.numel() for p in meta.parameters()) * elem  # parameters() counts tied embeddings once
    return ModelShape(name, spec, weights, config.intermediate_size, config.vocab_size)


def host_memory_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class PlanRow:
    """One method at one context and batch."""

    prediction: Prediction
    fits_device: bool
    fits_host: bool
    transfer_s: float  # h2d bytes of a decode step / link bandwidth (for approximate methods: at most)
    auto: bool = False

    @property
    def fits(self) -> bool:
        return self.fits_device and self.fits_host

    def to_dict(self) -> dict:
        return {**self.prediction.to_dict(), "fits_device": self.fits_device, "fits_host": self.fits_host,
                "fits": self.fits, "transfer_floor_s": self.transfer_s, "auto": self.auto}


@dataclass
class PlanCase:
    context: int
    new_tokens: int
    batch: int
    device_memory: int
    kv_budget: int
    activation_bytes: int
    rows: list = field(default_factory=list)
    auto: str = ""  # what auto picks, or why nothing fits
    auto_reason: str = ""

    def to_dict(self) -> dict:
        return {"context": self.context, "new_tokens": self.new_tokens, "batch": self.batch,
                "kv_budget": self.kv_budget, "activation_bytes": self.activation_bytes, "auto": self.auto,
                "auto_reason": self.auto_reason, "rows": [r.to_dict() for r in self.rows]}


def candidates(spec: ModelSpec, length: int, batch: int, kv_budget: int, profile=None) -> list[Prediction]:
    """The exact methods, then every setting auto may choose, each freekv setting at the largest budget that fits
    (its smallest when none does)."""
    rows = [predict(spec, "full", {}, length, batch), predict(spec, "offload", {}, length, batch)]
    if not recompute_can_pay(spec):
        rows.append(predict(spec, "kvpr", {}, length, batch))  # equal to offload: the cost model says l = 0
    elif profile is not None:
        rows.append(predict(spec, "kvpr", {}, length, batch, profile=profile))
    for rung in LADDER:
        if rung.method == "freekv":
            rows.append(fit_budget(spec, rung, length, batch, max(kv_budget, 0), None))
        else:
            rows.append(predict(spec, rung.method, rung.options, length, batch))
    return rows


def plan(shape: ModelShape, contexts, batches, device_memory: int, new_tokens: int = 256,
         bandwidth: float | None = None, host_memory: int | None = None, utilization: float = 0.9,
         profile=None) -> dict:
    """Every (context, batch): each method's device KV, host KV, host->device bytes per decode step and the
    transfer-time floor, whether it fits, and what auto picks. Returns a JSON-ready dict."""
    spec = shape.spec
    bandwidth = bandwidth or ASSUMED_BANDWIDTH
    host_memory = host_memory or host_memory_bytes()
    cases = []
    for context in contexts:
        if context + new_tokens > spec.max_positions:
            raise ValueError(f"context {context} + {new_tokens} new tokens exceeds {shape.name}'s "
                             f"{spec.max_positions} positions")
        for batch in batches:
            length = context + new_tokens
            activations = shape.activation_bytes(context, batch)
            kv_budget = int(device_memory * utilization) - shape.weight_bytes - activations
            case = PlanCase(context, new_tokens, batch, device_memory, kv_budget, activations)
            try:
                if kv_budget <= 0:
                    raise ValueError(f"the weights ({format_bytes(shape.weight_bytes)}) and activations leave no "
                                     "device memory for KV state")
                choice = choose(spec, kv_budget, length, batch, profile=profile)
                case.auto, case.auto_reason = choice.label, choice.reason
            except ValueError as err:
                choice, case.auto, case.auto_reason = None, "nothing fits", str(err)
            for pred in candidates(spec, length, batch, kv_budget, profile):
                if any(r.prediction.label == pred.label for r in case.rows):
                    continue
                case.rows.append(PlanRow(pred, 0 < pred.device_bytes <= kv_budget,
                                         pred.host_reserved_bytes <= host_memory, pred.h2d_step_bytes / bandwidth,
                                         auto=choice is not None and pred.label == choice.label))
            if choice is not None and choice.prediction.host_reserved_bytes > host_memory:
                case.auto_reason += (f"; but it needs {format_bytes(choice.prediction.host_reserved_bytes)} of host "
                                     f"memory and this machine has {format_bytes(host_memory)}")
            cases.append(case)
    notes = []
    if recompute_can_pay(spec) and profile is None:
        notes.append("kvpr is left out: on this multi-head model its split comes from the measured profile "
                     "(kvtier profile on the GPU), and without it auto considers offload only")
    return {"model": shape.name, "dtype": str(spec.dtype).replace("torch.", ""), "device": str(spec.device),
            "notes": notes,
            "weight_bytes": shape.weight_bytes, "device_memory": device_memory, "utilization": utilization,
            "host_memory": host_memory, "bandwidth_bytes_per_s": bandwidth, "cases": [c.to_dict() for c in cases],
            "_cases": cases}


def _size(n: int) -> str:
    return "0" if n == 0 else format_bytes(n)


def format_plan(result: dict, bandwidth_source: str = "") -> str:
    """The plan as text: one table per context and batch."""
    out = []
    gb_s = result["bandwidth_bytes_per_s"] / 1e9
    out.append(f"{result['model']} ({result['dtype']} on {result['device']}): weights "
               f"{format_bytes(result['weight_bytes'])}; host memory {format_bytes(result['host_memory'])}; "
               f"link {gb_s:.1f} GB/s{f' ({bandwidth_source})' if bandwidth_source else ''}")
    out.extend(f"note: {note}" for note in result["notes"])
    for case in result["_cases"]:
        out.append("")
        out.append(f"context {case.context} + {case.new_tokens} new tokens x batch {case.batch}: KV budget "
                   f"{format_bytes(max(case.kv_budget, 0))} = {result['utilization']:g} x "
                   f"{format_bytes(case.device_memory)} - weights {format_bytes(result['weight_bytes'])} - "
                   f"activations {format_bytes(case.activation_bytes)}")
        width = max(len(r.prediction.label) for r in case.rows)
        header = (f"{'method':<{width}} {'device KV':>11} {'host KV':>11} {'h2d/step':>12} {'transfer ms':>12}  fits")
        out.append(header)
        for row in case.rows:
            p = row.prediction
            bound = "" if p.h2d_exact else "<="
            fits = "yes" if row.fits else "no: " + ", ".join(
                w for w, ok in (("device", row.fits_device), ("host RAM", row.fits_host)) if not ok)
            out.append(f"{p.label:<{width}} {_size(p.device_bytes):>11} {_size(p.host_reserved_bytes):>11} "
                       f"{bound + _size(p.h2d_step_bytes):>12} {bound + f'{row.transfer_s * 1e3:.1f}':>12}  "
                       f"{fits}{'   <- auto' if row.auto else ''}")
        out.append(f"auto: {case.auto} ({case.auto_reason})")
    return "\n".join(out)
