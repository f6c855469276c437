"""Decode speed and memory of every method, with Hugging Face's own caches beside them in the same run.

Models are random-weight instances of real shapes (`llama-3.1-8b`, `llama-2-7b`, `qwen2.5-7b`), built from a
config on the target device: nothing is downloaded, and speed does not depend on weight values. Small shapes
(`tiny-llama`, `tiny-mha`) run the same harness on CPU; CPU times are harness checks, never speed results.
`model="embedded"` runs the embedded SmolLM2-135M instead, on real text: selective methods pick tokens by
attention scores, and random weights on random ids give scores no real model would, so what they load per
step is only representative with real weights and text.

Per (context, batch, method): prefill seconds; decode ms/token (median over timed steps after warm-up, CUDA events
on CUDA), and on CPU the part of it spent inside the kvtier method (storing and attention: the cache's share,
against the model's own layers); peak device memory (CUDA); device and host KV bytes; host->device bytes per
decode step and the link bandwidth that achieved; and two limits: the roofline step time (weights + the KV that
attention reads, at measured device-memory bandwidth) and the pure-transfer time (the step's host->device bytes at
the measured pinned bandwidth). Then, on a few more untimed steps: aten ops per step (kernel launches on a GPU)
and host-synchronizing calls per step, and on CUDA whether the step passes torch's sync debug mode; a step that
launches many small kernels or waits on the device is slow however few bytes it moves. A row that runs out of
device memory says "does not fit" and the run goes on.
"""

from __future__ import annotations

import gc
import re
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..cache import HF_BASELINES, KVCache, make_cache
from ..evaluation.common import parse_length, write_json
from ..generate import Decoder, prefill
from ..methods import METHOD_REGISTRY, MethodSpec, parse_methods
from ..models import DEFAULT_MODEL, EMBEDDED_MODELS, dtype_name, environment_summary, head_dim, resolve_device, resolve_dtype
from ..hardware import StepClock, device_name, load_profile, measure_memory_bandwidth
from ..kernels import native
from ..stepcheck import StepCounter
from .report import CPU_LABEL, format_table, plot, short_length
from .shapes import REAL_SHAPES, SHAPES, TINY_SHAPES, build_model, kv_bytes, model_config, parameter_count, \
    weight_bytes_per_step

DEFAULT_METHODS = "full,offload,kvpr,freekv,specache,hf-dynamic,hf-offload"
SYNC_DEBUG_STEPS = 2  # CUDA only: steps run under torch.cuda.set_sync_debug_mode("error")
ROW_OFFSET = 512  # embedded model: row i of a batch starts i * ROW_OFFSET tokens into the text, so rows differ
NOTES = {
    "decode_ms_per_token": "median time of one decode step (one new token for every sequence of the batch) over "
                           "the timed steps, warm-up excluded; CUDA events on CUDA, perf_counter on CPU",
    "h2d_bytes_per_token": "host->device bytes per decode step, from the counters over the timed steps; for "
                           "hf-offload counted from the sizes of the layers DynamicCache(offloading=True) copies "
                           "in (an estimate of its traffic, not observed on the link)",
    "cache_ms_per_token": "CPU only: median over the timed steps of the time spent inside the kvtier method "
                          "(storing the step's keys and values, and attention); None on CUDA, where the host only "
                          "launches work, and for Hugging Face's caches",
    "model_ms_per_token": "CPU only: median over the timed steps of the step's time outside the method (the "
                          "model's own layers: projections, MLP, norms, output layer); None where "
                          "cache_ms_per_token is",
    "cache_ms_vs_full": "cache_ms_per_token / that of full at the same context and batch",
    "link_bytes_per_s": "h2d bytes of the timed steps / their total time",
    "roofline_ms": "(weights read per step + KV read per step) / measured device-memory bandwidth; KV read is "
                   "the whole cache for exact methods and the device KV state for approximate ones",
    "transfer_ms": "h2d bytes per step / measured pinned host->device bandwidth",
    "device_kv_bytes": "peak KV-related device bytes from cache.stats(); hf-dynamic: its whole cache; "
                       "hf-offload: two layers (the one running and the one prefetched), an estimate",
    "peak_device_bytes": "torch.cuda.max_memory_allocated over prefill and decode, weights included; None on CPU "
                         "(not measured there)",
    "aten_ops_per_step": "aten ops dispatched per decode step (each one a kernel launch on a GPU), counted with a "
                         "TorchDispatchMode over count_steps more decode steps after the timed ones (never timed); "
                         "Triton kernels launched directly are not aten ops and are not counted",
    "host_syncs_per_step": "calls per decode step that make the host wait for the device (.item, bool/int/float of "
                           "a tensor, .tolist, .cpu, nonzero, unique, boolean-mask indexing, ...), on the same "
                           "steps; on CPU they are counted where a GPU would wait (kvtier.stepcheck)",
    "host_syncs_by_call": "host_syncs_per_step by call",
    "ops_vs_hf_dynamic": "aten_ops_per_step / that of hf-dynamic at the same context and batch (None without it)",
    "cpu_contention_spells": "CPU only: spells during the timed steps in which the C kernels found another "
                             "process competing for the cores (a thread of theirs started late) and took half "
                             "of torch's threads; nonzero: the row is not a quiet machine's time. None elsewhere",
    "sync_debug": f"CUDA only: {SYNC_DEBUG_STEPS} more decode steps under torch.cuda.set_sync_debug_mode('error'): "
                  "'passed', or 'failed: ' and the first line of the error; None on CPU",
}


def parse_bench_methods(text_or_list) -> list[MethodSpec]:
    """kvtier method specs ("freekv:budget=2048") and the Hugging Face baselines (hf-dynamic, hf-offload)."""
    items = text_or_list.split(",") if isinstance(text_or_list, str) else list(text_or_list)
    specs = []
    for item in (str(i).strip() for i in items):
        name = item.split(":")[0].strip()
        if name in HF_BASELINES:
            if ":" in item:
                raise ValueError(f"{name} takes no options, got {item!r}")
            specs.append(MethodSpec(name))
        elif name in METHOD_REGISTRY:
            specs.extend(parse_methods([item]))
        elif name:
            raise ValueError(f"unknown method {name!r}; valid methods: {', '.join([*METHOD_REGISTRY, *HF_BASELINES])}")
    if not specs:
        raise ValueError("no methods given")
    return specs


# -- one measurement -----------------------------------------------------------------------------------------
def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        empty_host = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
        if empty_host is not None:  # pinned host pools of the previous method
            empty_host()
        torch.cuda.reset_peak_memory_stats(device)


def _stepper(model, cache, ids, logits):
    """step() runs one greedy decode step as kvtier.generate does (a `Decoder` step)."""
    decoder = Decoder(model, cache, ids)
    state = [logits]

    def step():
        state[0] = decoder.step(state[0].argmax(-1))

    return step


def _make_cache(model, spec: MethodSpec, hardware):
    """The row's cache; kvpr plans with the hardware profile this run reports."""
    extra = {"profile": hardware} if spec.method == "kvpr" and "profile" not in spec.options else {}
    return make_cache(model, spec, **extra)


def _traffic(cache) -> tuple[int, int]:
    if isinstance(cache, KVCache):
        stats = cache.stats()
        return stats["h2d_bytes"], stats["d2h_bytes"]
    return cache.h2d_bytes, cache.d2h_bytes


def _kv_placement(cache) -> tuple[int, int, dict]:
    """(device KV bytes, host KV bytes, stats) of a cache after its run."""
    if isinstance(cache, KVCache):
        stats = cache.stats()
        return stats["device_kv_bytes"], stats["host_kv_bytes"], stats
    total = cache.kv_bytes()
    if not cache.counts_offload:
        return total, 0, {}
    return 2 * max(cache.layer_bytes(i) for i in range(len(cache.layers))), total, {}


class _CacheClock:
    """CPU only: wall time a decode step spends inside a kvtier method (storing and attention), so a row's step
    splits into the cache's share and the model's. On CUDA the host only launches work, so its clock would
    measure launches, not the step: None there, and for Hugging Face's own caches."""

    def __init__(self, cache, device: torch.device):
        self.method = cache.method if isinstance(cache, KVCache) and device.type == "cpu" else None
        self.spent, self.steps = 0.0, []
        if self.method is not None:
            for name in ("append", "attend"):
                setattr(self.method, name, self._timed(getattr(self.method, name)))

    def _timed(self, call):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.spent += time.perf_counter() - start
        return timed

    def mark(self) -> None:
        self.steps.append(self.spent * 1e3)
        self.spent = 0.0

    def close(self, step_ms: list[float]) -> dict:
        """The cache's and the model's median ms per step over the marked steps; the method runs untimed again."""
        if self.method is None:
            return {"cache_ms_per_token": None, "model_ms_per_token": None}
        for name in ("append", "attend"):
            delattr(self.method, name)
        cache_ms = self.steps[1:]  # the first mark opens the timed steps
        return {"cache_ms_per_token": statistics.median(cache_ms),
                "model_ms_per_token": statistics.median(s - c for s, c in zip(step_ms, cache_ms))}


def _count(step, steps: int) -> dict:
    """aten ops and host syncs per step, over `steps` more steps (slowed by the counting: never timed)."""
    if steps < 1:
        return {"aten_ops_per_step": None, "host_syncs_per_step": None, "host_syncs_by_call": None}
    with StepCounter() as counter:
        for _ in range(steps):
            step()
    return {"aten_ops_per_step": counter.ops / steps, "host_syncs_per_step": counter.total_syncs / steps,
            "host_syncs_by_call": {name: n / steps for name, n in sorted(counter.syncs.items())}}


def _sync_debug(step, device: torch.device) -> str | None:
    """CUDA's own check of the same question: does a step make the host wait? Last, as a failure leaves the
    step half done."""
    if device.type != "cuda":
        return None
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(SYNC_DEBUG_STEPS):
            step()
    except RuntimeError as err:
        return "failed: " + next(iter(str(err).strip().splitlines()), type(err).__name__)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize(device)
    return "passed"


@torch.inference_mode()
def _measure(model, spec: MethodSpec, ids, steps: int, warmup: int, hardware, chunk, progress,
             count_steps: int = 2) -> dict:
    device = ids.device
    n = ids.shape[1]
    cache = _make_cache(model, spec, hardware)
    if isinstance(cache, KVCache):
        cache.reserve(n + warmup + steps + max(count_steps, 0) + SYNC_DEBUG_STEPS + 1)
    _sync(device)
    start = time.perf_counter()
    logits = prefill(model, cache, ids, chunk=chunk, progress=progress)
    _sync(device)
    prefill_s = time.perf_counter() - start
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError("non-finite logits after prefill")
    step = _stepper(model, cache, ids, logits)
    for _ in range(warmup):
        step()
    _sync(device)
    h2d0, d2h0 = _traffic(cache)
    spells0 = _contention_spells(device)
    clock, inside = StepClock(device), _CacheClock(cache, device)
    clock.mark()
    inside.mark()
    for _ in tqdm(range(steps), desc=f"decode ({spec.label})", unit="tok", disable=not progress, leave=False):
        step()
        clock.mark()
        inside.mark()
    step_ms = clock.step_ms()
    spells = None if spells0 is None else _contention_spells(device) - spells0
    h2d1, d2h1 = _traffic(cache)
    device_kv, host_kv, stats = _kv_placement(cache)
    h2d_total = h2d1 - h2d0
    row = {
        "status": "ok", "prefill_s": prefill_s, "decode_ms_per_token": statistics.median(step_ms),
        "step_ms": step_ms, "device_kv_bytes": device_kv, "host_kv_bytes": host_kv,
        "h2d_bytes_per_token": h2d_total / steps, "d2h_bytes_per_token": (d2h1 - d2h0) / steps,
        "link_bytes_per_s": h2d_total / (sum(step_ms) / 1e3),
        "exact": METHOD_REGISTRY[spec.method].exact if spec.method in METHOD_REGISTRY else True,
        "stats": stats,
        "cpu_contention_spells": spells,
        **inside.close(step_ms),
    }
    row.update(_count(step, count_steps))
    row["sync_debug"] = _sync_debug(step, device)
    return row


def _contention_spells(device: torch.device) -> int | None:
    """Spells of contention the C kernels have seen so far (another process competing for the cores; CPU
    only, None elsewhere or without the kernels): a timed step among them is not a quiet machine's time."""
    if device.type != "cpu":
        return None
    state = native.contention()
    return None if state is None else state["spells"]


def _does_not_fit(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


# -- the run -------------------------------------------------------------------------------------------------
def _embedded_name(model: str) -> str:
    name = DEFAULT_MODEL if model == "embedded" else model
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"the benchmark runs the embedded model (model 'embedded' or one of "
                         f"{', '.join(EMBEDDED_MODELS)}) or a --model-config shape, never a downloaded one; "
                         f"got {model!r}")
    return name


def _embedded_config(name: str):
    """The embedded model's config alone (its GGUF header), so limits are checked before any loading."""
    from transformers import AutoConfig

    from ..models import embedded_model_file

    path = embedded_model_file(name)
    return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)


def _prose_ids(tokenizer, n: int, batch: int) -> torch.Tensor:
    """[batch, n] tokens of real prose (kvtier.evaluation.common.prose_text), row i from token i * ROW_OFFSET."""
    from ..evaluation.common import prose_text

    need, text = n + (batch - 1) * ROW_OFFSET, prose_text()
    chars = 6 * need
    while True:  # tokenize only as much text as needed; the last token may be a cut word, so one more
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > need or chars >= len(text):
            break
        chars *= 2
    if len(ids) < need:
        raise ValueError(f"the prose text has {len(ids)} tokens, {need} are needed for context {n} x batch {batch}")
    return torch.tensor([ids[i * ROW_OFFSET:i * ROW_OFFSET + n] for i in range(batch)])


def run(model_config_name: str | None = None, contexts=("1k",), batches=(1,), methods=DEFAULT_METHODS,
        decode_steps: int = 16, warmup: int = 4, dtype=None, device=None, out=None, random_weights: bool = False,
        seed: int = 0, prefill_chunk: int | None = None, profile=None, command: str | None = None,
        progress: bool = True, model: str | None = None, count_steps: int = 2) -> dict:
    """Every method x context x batch on one model; returns JSON-ready results and, when `out` is given,
    writes bench-<model>-<grid>-<device>-<date>.json and a PNG there.

    The model is a named shape with random weights and random prompt ids (`model_config_name`, tiny-llama
    when neither is given), or `model="embedded"`: the embedded model, its own weights, and the first
    `context` tokens of real prose as every prompt. Named real shapes need `random_weights=True` (weights are
    never downloaded). `profile` is passed to `kvtier.hardware.load_profile` (None: the cached or freshly
    measured one for this device). `count_steps` more decode steps per row are counted (aten ops, host syncs).
    """
    if model is not None and model_config_name is not None:
        raise ValueError("give either a random-weight shape (--model-config) or the embedded model "
                         "(--model embedded), not both")
    if model is not None:
        if random_weights:
            raise ValueError("random weights apply to --model-config shapes; the embedded model runs its own")
        load_name = _embedded_name(model)
        label, what = model, "embedded model"
    else:
        model_config_name, load_name = model_config_name or "tiny-llama", None
        if model_config_name in REAL_SHAPES and not random_weights:
            raise ValueError(f"{model_config_name} is a real model shape; the benchmark never downloads weights: "
                             "pass --random-weights (random_weights=True) to build it with random weights")
        label, what = model_config_name, "shape"
    specs = parse_bench_methods(methods)
    contexts = [parse_length(c) for c in contexts]
    batches = [int(b) for b in batches]
    if decode_steps < 1 or warmup < 0 or count_steps < 0 or not batches or min(batches) < 1:
        raise ValueError("decode_steps >= 1, warmup >= 0, count_steps >= 0 and batch sizes >= 1 are needed")
    config = _embedded_config(load_name) if model is not None else model_config(model_config_name)
    steps = warmup + decode_steps + count_steps + SYNC_DEBUG_STEPS
    if max(contexts) + steps + 2 > config.max_position_embeddings:
        raise ValueError(f"context {max(contexts)} + {steps} decode steps exceeds the {what}'s "
                         f"{config.max_position_embeddings} positions")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    hardware = load_profile(profile, device=device, dtype=dtype, hidden_size=config.hidden_size,
                            kv_width=config.num_key_value_heads * head_dim(config))
    memory_bw = measure_memory_bandwidth(device)
    if model is not None:
        from ..models import load

        lm, tokenizer = load(load_name, device=device, dtype=dtype)
        config = lm.config
        text_ids = _prose_ids(tokenizer, max(contexts), max(batches))
    else:
        lm = build_model(model_config_name, device, dtype, seed)
    weight_bytes = weight_bytes_per_step(lm)
    rows = []
    cells = [(n, b, s) for n in contexts for b in batches for s in specs]
    for n, b, spec in tqdm(cells, desc=f"bench {label}", disable=not progress):
        if model is not None:
            ids = text_ids[:b, :n]
        else:
            ids = torch.randint(0, config.vocab_size, (b, n), generator=torch.Generator().manual_seed(seed + n + b))
        row = {"method": spec.label, "context": n, "batch": b}
        _release(device)
        try:
            row.update(_measure(lm, spec, ids.to(device), decode_steps, warmup, hardware, prefill_chunk,
                                progress, count_steps=count_steps))
            if device.type == "cuda":
                row["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
        except Exception as err:  # noqa: BLE001 - one failing row must not lose the others
            fit = _does_not_fit(err)
            row.update(status="does not fit" if fit else "error", error=f"{type(err).__name__}: {err}"[:2000])
            if not fit:
                row["traceback"] = traceback.format_exc(limit=8)
        rows.append(row)
    _release(device)
    for row in rows:
        _limits(row, config, dtype, weight_bytes, memory_bw, hardware.h2d_bytes_per_s, warmup + decode_steps // 2)
    _compare(rows)
    env = environment_summary()
    result = {
        "bench": "decode", "model_config": model_config_name, "model": model,
        "model_name": load_name, "random_weights": model is None,
        "prompt": "prose" if model is not None else "random ids",
        "parameters": sum(p.numel() for p in lm.parameters()), "weight_bytes_per_step": weight_bytes,
        "config": {k: getattr(config, k, None) for k in ("model_type", "hidden_size", "intermediate_size",
                                                         "num_hidden_layers", "num_attention_heads",
                                                         "num_key_value_heads", "head_dim", "vocab_size",
                                                         "max_position_embeddings")},
        "device": device_name(device), "device_type": device.type, "dtype": dtype_name(dtype),
        "label": CPU_LABEL if device.type == "cpu" else None,
        "torch": env["torch"], "transformers": env["transformers"], "kvtier": env["kvtier"],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(["kvtier", *sys.argv[1:]]),
        "contexts": contexts, "batches": batches, "methods": [s.label for s in specs],
        "decode_steps": decode_steps, "warmup": warmup, "count_steps": count_steps, "seed": seed,
        "profile": hardware.to_dict(), "device_memory_bytes_per_s": memory_bw, "notes": NOTES, "rows": rows,
    }
    del lm
    _release(device)
    if out is not None:
        slug = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")
        Path(out).mkdir(parents=True, exist_ok=True)
        grid = "-".join(short_length(n) for n in contexts) + "-b" + "-".join(str(b) for b in batches)
        stem = f"bench-{label}-{grid}-{slug}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        result["json"] = str(Path(out) / f"{stem}.json")
        result["plot"] = plot(result, Path(out) / f"{stem}.png")
        write_json(result, out, f"{stem}.json")
    return result


def _limits(row, config, dtype, weight_bytes, memory_bw, link_bw, extra_tokens):
    """The two limits beside each figure: roofline step time and pure-transfer time (the cache at the middle
    of the timed steps: the prompt + `extra_tokens`)."""
    if row["status"] != "ok":
        return
    all_kv = kv_bytes(config, row["context"] + extra_tokens, row["batch"], dtype)
    kv_read = all_kv if row["exact"] else min(all_kv, row["device_kv_bytes"])
    row["kv_read_bytes_per_token"] = kv_read
    row["roofline_ms"] = (weight_bytes + kv_read) / memory_bw * 1e3
    row["transfer_ms"] = row["h2d_bytes_per_token"] / link_bw * 1e3


def _compare(rows):
    """Decode time and device KV of every row relative to `full`, and aten ops per step relative to
    `hf-dynamic` (the launches a plain transformers decode makes), at the same context and batch."""

    def reference(method, row):
        return next((r for r in rows if r["method"] == method and r["context"] == row["context"]
                     and r["batch"] == row["batch"] and r["status"] == "ok"), None)

    for row in rows:
        ref = reference("full", row)
        ok = row["status"] == "ok" and ref is not None
        row["ms_vs_full"] = row["decode_ms_per_token"] / ref["decode_ms_per_token"] if ok else None
        row["device_kv_vs_full"] = row["device_kv_bytes"] / max(ref["device_kv_bytes"], 1) if ok else None
        cache_ms, ref_cache_ms = row.get("cache_ms_per_token"), ref and ref.get("cache_ms_per_token")
        row["cache_ms_vs_full"] = cache_ms / ref_cache_ms if ok and cache_ms is not None and ref_cache_ms else None
        hf = reference("hf-dynamic", row)
        ops, hf_ops = row.get("aten_ops_per_step"), hf and hf.get("aten_ops_per_step")
        row["ops_vs_hf_dynamic"] = ops / hf_ops if row["status"] == "ok" and ops is not None and hf_ops else None


__all__ = ["CPU_LABEL", "DEFAULT_METHODS", "HF_BASELINES", "REAL_SHAPES", "SHAPES", "TINY_SHAPES", "build_model",
           "format_table", "model_config", "parameter_count", "parse_bench_methods", "run"]
