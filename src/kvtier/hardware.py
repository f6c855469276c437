"""Measured host->device bandwidth and matmul rate: the two numbers KVPR's cost model needs.

`measure()` times them on this machine; `load_profile()` returns a user override, a saved JSON file, or
the per-machine cache (measuring and caching on first use). The cache lives under $KVTIER_CACHE_DIR or
~/.cache/kvtier, one file per device name, dtype and matmul shape.

On CPU "host" and "device" are both main memory: B is a memory-to-memory copy rate and F a CPU GEMM
rate, fine for exercising the scheduler and never a speed result. CPU runs shrink the sizes so that a
measurement takes about a second.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import platform
import re
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import torch

from .models import dtype_name, resolve_device, resolve_dtype

SOURCES = ("measured", "override", "cache")
RATE_KEYS = ("h2d_bytes_per_s", "matmul_flops_per_s")

# CPU runs: at most this much copied, at most this many tokens in the GEMM, about this long per GEMM.
_CPU_COPY_MIB = 64
_CPU_TOKENS = 1024
_CPU_GEMM_SECONDS = 0.05


@dataclass
class HardwareProfile:
    """Rates of one machine for one dtype and matmul shape."""

    h2d_bytes_per_s: float  # B: host->device copy rate (pinned host memory on CUDA)
    matmul_flops_per_s: float  # F: rate of [tokens, hidden] x [hidden, kv_width] in `dtype`
    device: str  # device name, e.g. "NVIDIA H100 80GB HBM3" or "cpu (AMD EPYC ...)"
    dtype: str  # "bfloat16", "float16", "float32"
    shape: tuple = ()  # (tokens, hidden, kv_width) of the GEMM measured
    measured_at: str = ""  # ISO 8601 time of the measurement
    source: str = "measured"  # "measured" (just now), "override" (given by the user) or "cache"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["shape"] = list(self.shape)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "HardwareProfile":
        return _from_mapping(data, source=None)


def _field_names() -> list[str]:
    return [f.name for f in fields(HardwareProfile)]


def _from_mapping(data, source: str | None, defaults: dict | None = None) -> HardwareProfile:
    """Validate a dict (an override or a saved file) into a HardwareProfile."""
    if not isinstance(data, dict):
        raise ValueError(f"a hardware profile must be a dict, got {type(data).__name__}")
    valid = _field_names()
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"unknown hardware profile key(s) {unknown}; valid keys: {valid}")
    missing = [k for k in RATE_KEYS if k not in data]
    if missing:
        raise ValueError(f"a hardware profile needs both rates {list(RATE_KEYS)}; missing {missing}")
    for key in RATE_KEYS:
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                or value <= 0:
            raise ValueError(f"{key} must be a positive finite number, got {value!r}")
    merged = dict(defaults or {})
    merged.update(data)
    merged["h2d_bytes_per_s"] = float(merged["h2d_bytes_per_s"])
    merged["matmul_flops_per_s"] = float(merged["matmul_flops_per_s"])
    merged["shape"] = tuple(int(x) for x in merged.get("shape", ()) or ())
    merged.setdefault("device", "unknown")
    merged.setdefault("dtype", "unknown")
    merged["device"], merged["dtype"] = str(merged["device"]), str(merged["dtype"])
    if source is not None:
        merged["source"] = source
    if merged.get("source", "measured") not in SOURCES:
        raise ValueError(f"source must be one of {list(SOURCES)}, got {merged['source']!r}")
    return HardwareProfile(**merged)


def _resolve_device(device) -> torch.device:
    """The device to profile: as `models.resolve_device`, with CUDA's current index made explicit."""
    device = resolve_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_name(device) -> str:
    device = _resolve_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({_cpu_model()})"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def steady_cpu_gemm() -> str | None:
    """Ask Intel MKL (torch's CPU BLAS) for its regular GEMM kernels; returns the mode in effect (None: MKL's own).

    By default MKL may send GEMMs of 2 or 3 rows to a small-matrix path that, on some CPUs, costs up to twice a
    one-row GEMM, so a decode step that feeds two tokens (SpeCache's speculative step, `kvtier.generate` with a
    speculating method) pays for its second token on CPU what it would not pay on a GPU. With MKL_CBWR=AUTO a
    two-row GEMM costs about what a one-row one does. MKL reads the variable at its first call, so this
    runs before any matmul (the CLI calls it first); a value the user set, even an empty one, is kept."""
    # MKL's conditional-numerical-reproducibility mode; AUTO keeps its choice of instruction set
    return os.environ.setdefault("MKL_CBWR", "AUTO") or None


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    return statistics.median(fn() for _ in range(repeats))


class StepClock:
    """Marks between steps of work: CUDA events on CUDA (the GPU timeline), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def step_ms(self) -> list[float]:
        """Milliseconds between consecutive marks."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def _seconds(work, device: torch.device) -> float:
    """Seconds one `work()` takes, timed by a StepClock after the device's queue drains."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    clock = StepClock(device)
    clock.mark()
    work()
    clock.mark()
    return clock.step_ms()[0] / 1e3


def _measure_copy(device: torch.device, nbytes: int, repeats: int) -> float:
    if device.type == "cuda":
        try:
            src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError:  # pinning can fail (locked-memory limits): measure what we can get
            warnings.warn("could not pin host memory; measuring a pageable host->device copy")
            src = torch.empty(nbytes, dtype=torch.uint8)
        src.fill_(1)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    else:
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
    return nbytes / max(_copy_seconds(dst, src, device, repeats), 1e-9)


def _copy_seconds(dst: torch.Tensor, src: torch.Tensor, device: torch.device, repeats: int) -> float:
    """Median seconds of dst.copy_(src) after a warm-up: CUDA events on CUDA, perf_counter on CPU."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            return _median_seconds(lambda: _seconds(lambda: dst.copy_(src, non_blocking=True), device), repeats)
    return _median_seconds(lambda: _seconds(lambda: dst.copy_(src), device), repeats)


def measure_memory_bandwidth(device=None, copy_mib: int = 1024, repeats: int = 5) -> float:
    """Device memory (HBM) bandwidth in bytes/s: a device-to-device copy of `copy_mib` MiB, counting the bytes
    read and the bytes written, median of `repeats` after a warm-up. On CPU it is a main-memory copy of at
    most 64 MiB. Not cached: it takes a fraction of a second."""
    device = _resolve_device(device)
    if device.type == "cpu":
        copy_mib = min(copy_mib, _CPU_COPY_MIB)
    src = torch.ones(copy_mib << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / max(_copy_seconds(dst, src, device, repeats), 1e-9)


def _cpu_gemm_tokens(hidden: int, kv_width: int, dtype: torch.dtype, cap: int) -> int:
    """The largest token count up to `cap` whose GEMM takes about _CPU_GEMM_SECONDS (CPU rates vary 1000x
    by dtype: float16 GEMMs on CPU can run at well under 1 GFLOP/s)."""
    w = torch.randn(hidden, kv_width, dtype=dtype)
    t = 1
    while t < cap:
        x = torch.randn(t, hidden, dtype=dtype)
        dt = _seconds(lambda: x @ w, torch.device("cpu"))
        if dt >= _CPU_GEMM_SECONDS:
            break
        t = min(cap, max(2 * t, int(t * _CPU_GEMM_SECONDS / max(dt, 1e-9) / 2)))
    return t


def _measure_matmul(device: torch.device, dtype: torch.dtype, tokens: int, hidden: int, kv_width: int,
                    repeats: int) -> float:
    flops = 2.0 * tokens * hidden * kv_width
    if device.type == "cuda":
        with torch.cuda.device(device):
            x = torch.randn(tokens, hidden, dtype=dtype, device=device)
            w = torch.randn(hidden, kv_width, dtype=dtype, device=device)
            one = _median_seconds(lambda: _seconds(lambda: x @ w, device), 1)
            inner = max(1, min(100, math.ceil(2e-3 / max(one, 1e-9))))  # >= ~2 ms per timed block

            def block():
                for _ in range(inner):
                    x @ w

            seconds = _median_seconds(lambda: _seconds(block, device), repeats) / inner
    else:
        x = torch.randn(tokens, hidden, dtype=dtype)
        w = torch.randn(hidden, kv_width, dtype=dtype)
        seconds = _median_seconds(lambda: _seconds(lambda: x @ w, device), repeats)
    return flops / max(seconds, 1e-12)


def measure(device=None, dtype=None, hidden_size: int = 4096, kv_width: int = 4096, tokens: int = 4096,
            copy_mib: int = 256, repeats: int = 5) -> HardwareProfile:
    """Measure B (host->device copy of `copy_mib` MiB) and F (the recompute GEMM
    [tokens, hidden_size] x [hidden_size, kv_width] in `dtype`) on `device`: medians of `repeats` runs
    after a warm-up. On CUDA the host side is pinned and times come from CUDA events; on CPU both sides
    are main memory, timed with perf_counter, and the sizes shrink (copy <= 64 MiB, tokens <= 1024 and
    fewer when the dtype is slow on CPU) so the run takes about a second. `shape` records what was run.
    """
    for name, value in (("hidden_size", hidden_size), ("kv_width", kv_width), ("tokens", tokens),
                        ("copy_mib", copy_mib), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    device = _resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if device.type == "cpu":
        copy_mib = min(copy_mib, _CPU_COPY_MIB)
        tokens = _cpu_gemm_tokens(hidden_size, kv_width, dtype, min(tokens, _CPU_TOKENS))
    bandwidth = _measure_copy(device, copy_mib << 20, repeats)
    flops = _measure_matmul(device, dtype, tokens, hidden_size, kv_width, repeats)
    return HardwareProfile(
        h2d_bytes_per_s=bandwidth, matmul_flops_per_s=flops, device=device_name(device),
        dtype=dtype_name(dtype), shape=(tokens, hidden_size, kv_width),
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), source="measured",
    )


def default_cache_dir() -> Path:
    env = os.environ.get("KVTIER_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvtier"


def cache_file(device=None, dtype=None, hidden_size: int = 4096, kv_width: int = 4096, tokens: int = 4096,
               cache_dir=None) -> Path:
    """Where the cached profile of this device name, dtype and GEMM shape lives."""
    device = _resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower() or "device"
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return directory / f"profile-{slug}-{dtype_name(dtype)}-{tokens}x{hidden_size}x{kv_width}.json"


def save(profile: HardwareProfile, path) -> Path:
    """Write `profile` as JSON to `path` (parent folders created; written atomically)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"cannot write the hardware profile to {path}: it is a folder; give a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(profile.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave the half-written file behind
        raise
    return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not a valid hardware profile JSON file: {err}") from None


def load_profile(profile=None, device=None, dtype=None, hidden_size: int = 4096, kv_width: int = 4096,
                 tokens: int = 4096, cache_dir=None, force: bool = False) -> HardwareProfile:
    """The hardware profile to plan with.

    profile: a dict override (both rates, positive: {"h2d_bytes_per_s": ..., "matmul_flops_per_s": ...},
    optionally other HardwareProfile fields; source "override"); a path to a JSON file written by `save`
    (or by hand, same keys; source "override"); a HardwareProfile (returned as is); or None: the cached
    profile of this device, dtype and shape (source "cache"), measured and cached when there is none or
    when `force` is set (source "measured"). The cache lives in `cache_dir`, else $KVTIER_CACHE_DIR,
    else ~/.cache/kvtier.
    """
    if isinstance(profile, HardwareProfile):
        return profile
    if profile is not None and not isinstance(profile, (dict, str, os.PathLike)):
        raise ValueError(f"profile must be a dict, a JSON path, a HardwareProfile or None, got "
                         f"{type(profile).__name__}")
    dev = _resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    defaults = {"device": device_name(dev), "dtype": dtype_name(torch_dtype),
                "shape": (tokens, hidden_size, kv_width),
                "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if isinstance(profile, dict):
        return _from_mapping(profile, source="override", defaults=defaults)
    if profile is not None:
        path = Path(profile).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"hardware profile file not found: {path}")
        return _from_mapping(_read_json(path), source="override", defaults=defaults)

    path = cache_file(dev, torch_dtype, hidden_size, kv_width, tokens, cache_dir)
    if path.is_file() and not force:
        try:
            return _from_mapping(_read_json(path), source="cache")
        except (ValueError, TypeError) as err:
            warnings.warn(f"ignoring the unreadable profile cache {path} ({err}); measuring again")
    measured = measure(dev, torch_dtype, hidden_size=hidden_size, kv_width=kv_width, tokens=tokens)
    try:
        save(measured, path)
    except OSError as err:
        warnings.warn(f"could not write the profile cache {path}: {err}")
    return measured
