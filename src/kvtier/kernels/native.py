"""CPU kernels in C (native.c): on a CPU, what the Triton kernels do on a GPU.

The PyTorch references are exact but pay, on a CPU, for work a GPU kernel does not do: the recall's reference
copies a null row for every planned entry that has nothing to copy (a fixed-size plan is mostly such entries),
and low-bit scoring and low-bit attention write a whole dequantized layer out before reading it back. The C
functions do what the Triton kernels do instead: skip -1 entries, dequantize in registers. Like a GPU kernel
they read the plan from memory, so nothing is read back to Python and the step stays free of host syncs.

The library is compiled once per machine with the C compiler ($CC, else `cc`), with OpenMP where torch runs on
GNU OpenMP (its loops then share torch's threads, as many as torch.get_num_threads()), into the user cache
($KVTIER_CACHE, else ~/.cache/kvtier; the temporary folder where that is not writable), named by the hash of
the source, flags and processor, and loaded with ctypes.
Without a compiler the references run, and `status()` says why (`kvtier info` prints it).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c11")
THREADED = ("-fopenmp",)  # first choice where torch's own libgomp is in the process (see _torch_uses_libgomp)
MAX_ROWS, MAX_DIM, MAX_TOKENS = 64, 512, 8  # as native.c
CONTENTION_LAG_S, CONTENTION_HOLD_S = 1e-3, 2.0  # as native.c: a worker this late starts a spell this long
_BITS = (1, 2, 4)

_c_i64, _c_ptr, _c_float, _c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "kvt_recall_pages": [_c_ptr] * 7 + [_c_i64] * 6,
    "kvt_plan_pages": [_c_ptr] * 4 + [_c_i64] * 5 + [_c_ptr] * 3,
    "kvt_dequant_scores_f32": [_c_ptr] * 5 + [_c_i64] * 5 + [_c_int, _c_float] + [_c_i64] * 4,
    "kvt_page_probs_f32": [_c_ptr] * 2 + [_c_i64] * 9,
    "kvt_digest_probs_f32": [_c_ptr] * 4 + [_c_i64] * 8 + [_c_float] + [_c_i64] * 2,
    "kvt_attention_f32": [_c_ptr],
    "kvt_store_rows": [_c_ptr] * 2 + [_c_i64] * 4 + [_c_ptr] * 3 + [_c_i64] * 7,
    "kvt_query_drift": [_c_ptr] * 3 + [_c_i64] * 4 + [_c_float] + [_c_i64] * 4,
    "kvt_contention": [_c_ptr, _c_i64, _c_i64],
    "kvt_topk_f32": [_c_ptr] + [_c_i64] * 5 + [_c_ptr],
}
_RETURNS_STATUS = {"kvt_plan_pages", "kvt_attention_f32", "kvt_digest_probs_f32", "kvt_topk_f32"}  # 0, or -1 where it could not run (nothing changed)
_error: str | None = None
threaded = False  # whether the kernels run their loops on torch's OpenMP threads (else on one)
launches = 0  # kernel calls so far: `stepcheck.StepCounter` counts each as one op (a launch on a GPU)


def _cache_dir() -> Path:
    root = os.environ.get("KVTIER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvtier")
    return Path(root)


def _cpu_id() -> str:
    """The processor's model and flags: -march=native code built for one CPU may not run on another."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return os.uname().machine


def _torch_uses_libgomp() -> bool:
    """Whether this process has GNU OpenMP loaded (torch's CPU wheels for Linux bring it): then kernels built with
    -fopenmp share torch's thread pool. Another OpenMP runtime beside torch's would fight it for the cores."""
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _compile(compiler: str, flags: tuple[str, ...], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        done = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(out)], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[:500]}")
        os.replace(out, target)  # atomic: a concurrent process sees the old file or the whole new one


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None (and `status()` says why) where that is impossible."""
    global _error
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        _error = "no C compiler (cc, gcc or $CC): the CPU runs the PyTorch references"
        return None
    if not SOURCE.is_file():
        _error = f"{SOURCE} is missing from this install: the CPU runs the PyTorch references"
        return None
    global threaded
    lib = None
    source = SOURCE.read_bytes()
    for flags in ((FLAGS + THREADED, FLAGS) if _torch_uses_libgomp() else (FLAGS,)):
        key = hashlib.sha256(source + " ".join(flags).encode() + _cpu_id().encode()).hexdigest()[:16]
        for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"kvtier-{os.getuid()}"):  # a read-only home too
            target = folder / f"native-{key}.so"
            try:
                if not target.exists():
                    _compile(compiler, flags, target)
                lib = ctypes.CDLL(str(target))
                break
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                _error = f"could not build the CPU kernels ({err}): the CPU runs the PyTorch references"
        if lib is not None:
            threaded = flags != FLAGS
            break
    if lib is None:
        return None
    for name, args in _SIGNATURES.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = _c_int if name in _RETURNS_STATUS else None
    return lib


def _launch(kernel, *args):
    global launches
    launches += 1
    return kernel(*args)


def status() -> str:
    lib = library()
    if lib is None:
        return _error
    return "native CPU kernels loaded, " + ("on torch's OpenMP threads" if threaded else "on one thread")


def contention(lag_s: float | None = None, hold_s: float | None = None) -> dict | None:
    """How the threaded kernels see the cores: `parallel_loops` run on several threads so far, `spells` of
    contention begun (two loops within 0.1 s, each with a worker thread that started more than the lag late:
    another process held its core), `spell_s` left of the current one, and the `threads` the loops take now
    (half of torch's during a spell). With lag_s and hold_s: new limits (CONTENTION_LAG_S and
    CONTENTION_HOLD_S are the defaults), and any spell ends. None without the C kernels."""
    lib = library()
    if lib is None:
        return None
    out = (ctypes.c_int64 * 4)()
    set_limits = lag_s is not None
    lib.kvt_contention(out, int(lag_s * 1e9) if set_limits else -1, int((hold_s or 0) * 1e9))
    return {"parallel_loops": out[0], "spells": out[1], "spell_s": out[2] / 1e9, "threads": out[3]}


def recall_pages(host: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                 pages: torch.Tensor, slots: torch.Tensor, rows, heads: torch.Tensor | None) -> bool:
    """`retrieval.recall.recall_pages_reference` without the trash-row copies; False (nothing done) where the
    layout is not the contiguous one the C loop assumes, so the caller runs the reference."""
    if not (host.is_contiguous() and keys.is_contiguous() and values.is_contiguous() and positions.is_contiguous()
            and host.dtype == keys.dtype == values.dtype and positions.dtype == torch.long
            and pages.dtype == slots.dtype == torch.long and host.shape[-1] == keys.shape[-1] == values.shape[-1]
            and (heads is None or heads.dtype == torch.bool)):
        return False
    pages, slots = pages.contiguous(), slots.contiguous()
    held = None if heads is None else heads.contiguous().view(torch.uint8)  # bool and uint8 share their bytes
    _launch(library().kvt_recall_pages, host.data_ptr(), keys.data_ptr(), values.data_ptr(), positions.data_ptr(),
            pages.data_ptr(), slots.data_ptr(), 0 if held is None else held.data_ptr(), rows.heads,
            pages.shape[-1], rows.rows_per_head, rows.first_slot, positions.shape[-1],
            keys.shape[-1] * keys.element_size())
    return True


def plan_pages(slot_page: torch.Tensor, page_slot: torch.Tensor, wanted: torch.Tensor,
               page_scores: torch.Tensor | None, recalled: torch.Tensor | None):
    """`retrieval.recall.plan_pages_reference` (the table updated in place, (pages, slots) returned); None where
    the kernel does not apply (layouts, dtypes), so the caller runs the reference."""
    b, h, k = wanted.shape
    scores = None if page_scores is None else _heads_view(page_scores)
    if (not (slot_page.is_contiguous() and page_slot.is_contiguous()) or wanted.dtype != torch.long
            or slot_page.dtype != torch.long or page_slot.dtype != torch.int32
            or (page_scores is not None and (page_scores.dtype != torch.float32 or scores is None))
            or (recalled is not None and (recalled.dtype != torch.long or recalled.numel() != 1))):
        return None
    wanted = wanted.contiguous()
    pages, slots = torch.empty((2, b, h, k), dtype=torch.long, device=wanted.device).unbind()
    status = _launch(library().kvt_plan_pages, slot_page.data_ptr(), page_slot.data_ptr(), wanted.data_ptr(),
            0 if page_scores is None else page_scores.data_ptr(), 0 if scores is None else scores[0], b * h,
            slot_page.shape[-1], k, page_slot.shape[-1], pages.data_ptr(), slots.data_ptr(),
            0 if recalled is None else recalled.data_ptr())
    return (pages, slots) if status == 0 else None


TOPK_MIN_ROW = 64  # values per selected one below which torch.topk is as fast (the kernel's floor then cuts little)


def topk_indices(x: torch.Tensor, k: int, offset: int = 0) -> torch.Tensor | None:
    """`x.topk(k, dim=-1).indices + offset` for float32 x on CPU (ties lowest index first); None where the kernel
    does not apply (the rows are not equally spaced, shorter than TOPK_MIN_ROW * k, a NaN in x), so the caller
    runs torch."""
    from . import native_enabled

    n = x.shape[-1]
    if not native_enabled(x) or x.dtype != torch.float32 or not 1 <= k <= n // TOPK_MIN_ROW or x.stride(-1) != 1:
        return None
    dims = [(size, step) for size, step in zip(x.shape[:-1], x.stride()[:-1]) if size > 1]
    if any(outer != inner * size for (_, outer), (size, inner) in zip(dims, dims[1:])):
        return None  # the leading dims do not merge into one run of equally spaced rows
    rows, stride = x.numel() // n, dims[-1][1] if dims else n
    out = torch.empty((*x.shape[:-1], k), dtype=torch.long)
    status = _launch(library().kvt_topk_f32, x.data_ptr(), rows, n, stride, k, offset, out.data_ptr())
    return out if status == 0 else None


def serves(x: torch.Tensor, rows: int, d: int | None = None) -> bool:
    """Whether the kernels take this call: C kernels on here, float32, `rows` query rows (group x query tokens)
    and d channels (None: the call has no channel axis) within the kernels' fixed buffers."""
    from . import native_enabled

    return native_enabled(x) and x.dtype == torch.float32 and rows <= MAX_ROWS and (d is None or d <= MAX_DIM)


def lowbit_scoring_fits(dtype: torch.dtype, rows: int, d: int) -> bool:
    """Whether `dequant_scores` takes `rows` query rows against low-bit keys of d channels in this dtype: float32,
    within the fixed buffers, d a multiple of 8 (it reads eight channels at a time). Where it does not, the
    reference dequantizes the whole layer first (the engine's ledger and `predict` count that)."""
    return dtype == torch.float32 and rows <= MAX_ROWS and d <= MAX_DIM and d % 8 == 0


def scores_lowbit(x: torch.Tensor, rows: int, d: int) -> bool:
    """Whether `dequant_scores` runs here for queries like x (see `lowbit_scoring_fits`)."""
    from . import native_enabled

    return native_enabled(x) and lowbit_scoring_fits(x.dtype, rows, d)


def _heads_view(x: torch.Tensor) -> tuple[int, int] | None:
    """Strides of a [b, h, a, c] tensor seen as [b * h, a, c]: (head stride, row stride), or None where the last
    dim is not dense or b and h do not merge (the engine's views into its buffers always do)."""
    if x.stride(-1) != 1 or (x.shape[0] > 1 and x.stride(0) != x.shape[1] * x.stride(1)):
        return None
    return x.stride(1), x.stride(2)


def dequant_scores(q: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   group: int, scaling: float) -> torch.Tensor | None:
    """float32 q [b, H, t, d] against keys quantized per channel ([b, h, n, bytes] codes, [b, h, n/group, d]
    scale and zero) -> scores [b, h, g*t, n] as `dequant_scores_reference`; None where the kernel does not
    apply (dtype, sizes, layout), so the caller runs the reference."""
    b, num_heads, t, d = q.shape
    num_kv, n = packed.shape[1], packed.shape[2]
    rows = num_heads // num_kv * t
    codes, params = _heads_view(packed), _heads_view(scale)
    if (not scores_lowbit(q, rows, d) or bits not in _BITS or codes is None or params is None
            or zero.stride() != scale.stride() or scale.dtype != torch.float32 or zero.dtype != torch.float32):
        return None
    q = q.reshape(b, num_kv, rows, d).contiguous()
    out = q.new_empty((b, num_kv, rows, n))
    _launch(library().kvt_dequant_scores_f32, q.data_ptr(), packed.data_ptr(), scale.data_ptr(), zero.data_ptr(),
            out.data_ptr(), b * num_kv, rows, n, d, group, bits, scaling, *codes, *params)
    return out


class _AttentionArgs(ctypes.Structure):
    """native.c's attention_args, field for field."""

    _fields_ = [(name, kind) for names, kind in (
        ("q k v pos mask", _c_ptr), ("sm_h sm_t sm_b L past tokens", _c_i64), ("valid", _c_ptr),
        ("sv_b kv_heads", _c_i64), ("scaling", _c_float), ("raw", _c_ptr), ("sr_h sr_m lo hi", _c_i64),
        ("resident", _c_ptr), ("srs_h page slot_start slot_stop", _c_i64), ("packed scale zero", _c_ptr),
        ("sp_h sp_n sz_h sz_n group bits heads rows d", _c_i64), ("out", _c_ptr)) for name in names.split()]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, *, mask: torch.Tensor | None = None,
              positions: torch.Tensor | None = None, past: int = 0, valid: torch.Tensor | None = None,
              rest=None, raw: torch.Tensor | None = None, values=None) -> torch.Tensor | None:
    """Decode attention of float32 q [b, H, t, d] over k, v [b, h, L, d] in one call: `attention.attend` (with
    a bool `mask` broadcastable to [b, h, t, L], or none), `attention.attend_buffer` (rows visible by their
    `positions` [b, h, L], `past` and `valid` [b, >= positions] bool), and with `rest` (an attention.RestRange),
    the low-bit tokens scored by `raw` [b, h, g*t, >= rest.hi] and read from `values` (a per-token QTensor):
    `attend_mixed`. Returns [b * h, g*t, d], or None where the kernel does not apply (the caller runs the
    reference)."""
    b, num_heads, t, d = q.shape
    h, L = k.shape[1], k.shape[2]
    rows = num_heads // h * t
    if (not serves(q, rows, d) or t > MAX_TOKENS or k.dtype != torch.float32 or v.dtype != torch.float32
            or not (k.is_contiguous() and v.is_contiguous())):
        return None
    args = _AttentionArgs(L=L, past=past, tokens=t, kv_heads=h, scaling=scaling, heads=b * h, rows=rows, d=d)
    keep = [q.reshape(b, h, rows, d).contiguous()]  # tensors the call reads: alive until it returns
    args.q, args.k, args.v = keep[0].data_ptr(), k.data_ptr(), v.data_ptr()
    if mask is not None:
        mask = mask if mask.dim() == 4 else mask.unsqueeze(1)
        mask = mask.expand(b, h, t, L)
        if mask.dtype != torch.bool or mask.stride(-1) != 1:
            return None
        keep.append(mask)
        args.mask = mask.data_ptr()
        args.sm_b, args.sm_h, args.sm_t = mask.stride(0), mask.stride(1), mask.stride(2)
    elif positions is not None:
        if positions.dtype != torch.long or not positions.is_contiguous():
            return None
        args.pos = positions.data_ptr()
    if valid is not None:
        if valid.dtype != torch.bool or valid.stride(-1) != 1:
            return None
        args.valid, args.sv_b = valid.data_ptr(), valid.stride(0)
    if rest is not None and rest.hi > rest.lo:
        codes, params = _heads_view(values.packed), _heads_view(values.scale)
        raw_strides = _heads_view(raw)
        by_slots = rest.resident is None  # read from the slots' positions (attention.RestRange)
        if by_slots and (positions is None or mask is not None):
            return None
        if ((not by_slots and rest.resident.dtype != torch.bool) or values.bits not in _BITS or codes is None
                or params is None
                or raw_strides is None or raw.dtype != torch.float32 or values.zero.stride() != values.scale.stride()
                or values.scale.dtype != torch.float32 or d % values.group_size):
            return None
        args.raw, (args.sr_h, args.sr_m), args.lo, args.hi = raw.data_ptr(), raw_strides, rest.lo, rest.hi
        args.page = rest.page_size
        if by_slots:
            args.slot_start, args.slot_stop = rest.slots.start, rest.slots.stop
        else:
            held = rest.resident.contiguous()
            keep.append(held)
            args.resident, args.srs_h = held.data_ptr(), held.shape[-1]
        args.packed, args.scale, args.zero = values.packed.data_ptr(), values.scale.data_ptr(), values.zero.data_ptr()
        (args.sp_h, args.sp_n), (args.sz_h, args.sz_n) = codes, params
        args.group, args.bits = values.group_size, values.bits
    out = q.new_empty((b * h, rows, d))
    args.out = out.data_ptr()
    status = _launch(library().kvt_attention_f32, ctypes.byref(args))
    return out if status == 0 else None


def page_probs(raw: torch.Tensor, group: int, tokens: int, pages: int, lo: int, hi: int,
               page: int) -> torch.Tensor | None:
    """Raw float32 token scores [b, h, group*tokens, >= hi] (rows: head in group, then token) -> [b, h, tokens,
    pages]: per row the softmax over tokens [lo, hi) (whole pages), summed per page and averaged over the group
    (`LowBitScorer.page_probs`); None where the kernel does not apply."""
    b, h, rows, n = raw.shape
    strides = _heads_view(raw)
    if not serves(raw, rows) or strides is None or lo % page or hi % page or hi > n or hi // page > pages:
        return None
    out = raw.new_empty((b, h, tokens, pages))
    _launch(library().kvt_page_probs_f32, raw.data_ptr(), out.data_ptr(), b * h, group, tokens, pages, lo, hi,
            page, *strides)
    return out


def digest_probs(q: torch.Tensor, digest_max: torch.Tensor, digest_min: torch.Tensor, scaling: float, lo: int,
                 hi: int) -> torch.Tensor | None:
    """float32 q [b, H, t, d] against page digests [b, h, pages, d] -> [b, h, t, pages]: per query row the softmax
    over pages [lo, hi) of the digest bound, averaged over the group (`selection.digest_page_probs`); None where
    the kernel does not apply."""
    b, num_heads, t, d = q.shape
    num_kv, pages = digest_max.shape[1], digest_max.shape[2]
    strides = _heads_view(digest_max)
    if (not serves(q, num_heads // num_kv * t, d) or strides is None or digest_min.stride() != digest_max.stride()
            or digest_max.dtype != torch.float32 or digest_min.dtype != torch.float32 or not 0 <= lo < hi <= pages):
        return None
    q = q.contiguous()
    out = q.new_empty((b, num_kv, t, pages))
    status = _launch(library().kvt_digest_probs_f32, q.data_ptr(), digest_max.data_ptr(), digest_min.data_ptr(),
                     out.data_ptr(), b * num_kv, num_kv, num_heads // num_kv, t, pages, d, lo, hi, scaling, *strides)
    return out if status == 0 else None


def query_drift(q: torch.Tensor, previous: torch.Tensor, num_kv_heads: int, tau: float) -> torch.Tensor | None:
    """float32 q, previous [b, H, d] -> bool [b, H_kv]: `selection.query_drift`; None where the kernel does not
    apply."""
    b, num_heads, d = q.shape
    if (not serves(q, 1, d) or previous.dtype != torch.float32 or previous.shape != q.shape
            or q.stride(-1) != 1 or previous.stride(-1) != 1):
        return None
    out = torch.empty((b, num_kv_heads), dtype=torch.bool, device=q.device)
    _launch(library().kvt_query_drift, q.data_ptr(), previous.data_ptr(), out.data_ptr(), b, num_kv_heads,
            num_heads // num_kv_heads, d, tau, q.stride(0), q.stride(1), previous.stride(0), previous.stride(1))
    return out


def store_rows(k_new: torch.Tensor, v_new: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               positions: torch.Tensor, row0: int, first: int, count: int, position0: int) -> bool:
    """keys, values [b, h, L, d] rows row0 .. row0 + count - 1 = k_new, v_new [b, h, t, d] tokens first ..
    first + count - 1, positions [b, h, L] = position0 + i (the engine's ring writes, as slice assignments do);
    False (nothing done) where the layouts are not the ones the C loop takes."""
    b, h, L, d = keys.shape
    if not (keys.dtype == values.dtype == k_new.dtype == v_new.dtype == torch.float32 and keys.is_contiguous()
            and values.is_contiguous() and positions.is_contiguous() and positions.dtype == torch.long):
        return False
    ks, vs = _heads_view(k_new), _heads_view(v_new)
    if ks is None or vs is None:
        return False
    _launch(library().kvt_store_rows, k_new.data_ptr(), v_new.data_ptr(), *ks, *vs, keys.data_ptr(),
            values.data_ptr(), positions.data_ptr(), b * h, L, d, row0, first, count, position0)
    return True
