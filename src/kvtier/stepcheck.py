"""What one decode step costs the host: aten ops dispatched and calls that wait for the device.

On a GPU a decode step is fast only when the host can queue its kernels ahead of the device. Two things break
that: many small kernels (each aten op is a launch with a fixed host cost) and any call that reads a device
value on the host (`.item()`, `bool(t)`, `.tolist()`, `.cpu()`, `nonzero`, `unique`, a boolean-mask index, ...),
which stalls the host until everything queued before it has run. Both can be counted on CPU, where the
methods are developed, so a regression shows up before a GPU run does.

The CPU's C kernels (`kernels.native`) dispatch no aten op; each call counts as one op, as the Triton kernel
it stands for is one launch. `StepCounter` counts; `no_host_sync()` turns the first host read into an error
(for tests). Counting runs a Python hook on every op, so counted steps are never timed.

Each sync is counted once, at the level that names it best. Python-level reads (`item`, `bool`, `int`,
`float`, `index`, `tolist`, `cpu`, `numpy`, `to(cpu)`, printing) are seen by a TorchFunctionMode; the ops
they dispatch are then not counted again. Reads with no Python-level name (`nonzero`, `masked_select`, the
`unique` family, `equal`, boolean-mask indexing, a blocking copy to the host, `_local_scalar_dense` reached
from C++) are seen by a TorchDispatchMode under their aten names. `.cpu()` and `.to("cpu")` of a tensor
already on the CPU count too: on a GPU the same line would be a device-to-host copy. `.to(x.device)` counts
only when it really copies to the host (it is how device-generic code stays put), non-blocking copies do not
count, and neither does moving a module (`module.cpu()`): that is not a read of a value.
"""

from __future__ import annotations

import sys
from collections import Counter
from contextlib import ExitStack

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .kernels import native

_TensorBase = torch._C.TensorBase
# Python-level calls that read device data on the host, by the name a report shows.
_PY_READS = {
    _TensorBase.item: "item", _TensorBase.__bool__: "bool", _TensorBase.__int__: "int",
    _TensorBase.__float__: "float", _TensorBase.__index__: "index", _TensorBase.tolist: "tolist",
    _TensorBase.numpy: "numpy", torch.Tensor.__array__: "numpy", torch.Tensor.__repr__: "repr",
    torch.Tensor.__format__: "repr",
}
_PY_MOVES = {_TensorBase.cpu: "cpu", _TensorBase.to: "to(cpu)"}  # reads only when the target is the host
# aten ops whose result the host must wait for (a data-dependent shape or a scalar brought back).
_SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
             "unique_consecutive", "equal", "repeat_interleave"}
_MODULE_FILE = torch.nn.modules.module.__file__


class HostSyncError(RuntimeError):
    """A call inside `no_host_sync()` read a device value on the host."""


class StepCounter:
    """Counts aten ops (`ops`) and host-synchronizing calls (`syncs`, a Counter by name) inside a `with`.

    Counters add up over every `with` block of one instance; nested counters each count everything inside
    them.
    """

    def __init__(self, *, raise_on_sync: bool = False):
        self.raise_on_sync = raise_on_sync
        self.ops = 0
        self.syncs: Counter = Counter()
        self._inside_read = 0  # > 0 while a Python-level read that was already counted runs
        self._stack: ExitStack | None = None

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())

    def __enter__(self) -> "StepCounter":
        if self._stack is not None:
            raise RuntimeError("this StepCounter is already active; use a second one to nest")
        stack = ExitStack()
        try:
            stack.enter_context(_Calls(self))
            stack.enter_context(_Ops(self))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        self._native_start = native.launches
        return self

    def __exit__(self, *exc) -> bool:
        stack, self._stack = self._stack, None
        self._inside_read = 0
        self.ops += native.launches - self._native_start  # a C kernel call is one launch, as a Triton kernel is
        return stack.__exit__(*exc)

    def _sync(self, name: str):
        self.syncs[name] += 1
        if self.raise_on_sync:
            raise HostSyncError(f"{name}: a host-synchronizing call inside no_host_sync(); a decode step must not "
                                "read device values on the host (the host would wait for the device to drain)")


def no_host_sync() -> StepCounter:
    """A context in which the first host-synchronizing call raises `HostSyncError`, naming the call."""
    return StepCounter(raise_on_sync=True)


class _Calls(TorchFunctionMode):
    def __init__(self, owner: StepCounter):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            name = _PY_READS.get(func) or (_PY_MOVES.get(func) and _move_name(func, args, kwargs))
        except TypeError:  # an unhashable callable: not one of ours
            name = None
        if not name:
            return func(*args, **kwargs)
        owner = self.owner
        if not owner._inside_read:
            owner._sync(name)
        owner._inside_read += 1
        try:
            return func(*args, **kwargs)
        finally:
            owner._inside_read -= 1


def _move_name(func, args, kwargs) -> str | None:
    """`.cpu()` / `.to(<cpu>)` of a tensor, blocking: a read; the same call from Module.cpu()/.to(): not."""
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    caller = sys._getframe(2)  # 0: here, 1: __torch_function__, 2: its caller (or an outer counter's hook)
    while caller is not None and caller.f_code.co_filename == __file__:
        caller = caller.f_back
    if caller is not None and caller.f_code.co_filename == _MODULE_FILE:
        return None
    if func is _TensorBase.to:
        try:
            device, _, non_blocking, *_ = torch._C._nn._parse_to(*args[1:], **kwargs)
        except (TypeError, RuntimeError):
            return None
        if device is None or device.type != "cpu" or non_blocking:
            return None
        # .to(x.device) in device-generic code moves nothing when x is on the same device as the tensor, on a
        # GPU too; only a host target spelled out ("cpu") is a move to the host wherever the code runs.
        spelled = any(isinstance(a, str) for a in args[1:]) or isinstance(kwargs.get("device"), str)
        if not spelled and args[0].device.type == "cpu":
            return None
    return _PY_MOVES[func]


class _Ops(TorchDispatchMode):
    def __init__(self, owner: StepCounter):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = self.owner
        owner.ops += 1
        if not owner._inside_read:
            name = _sync_name(func.overloadpacket.__name__, args, kwargs)
            if name is not None:
                owner._sync(name)
        return func(*args, **kwargs)


def _sync_name(op: str, args, kwargs) -> str | None:
    if op in _SYNC_OPS:
        if op == "repeat_interleave" and (kwargs.get("output_size") is not None or not _tensor_repeats(args)):
            return None  # given the output size (or integer repeats) it never looks at the data
        return op
    if op == "index" and _bool_index(args[1] if len(args) > 1 else kwargs.get("indices")):
        return "boolean mask index"
    if op in ("index_put", "index_put_", "_index_put_impl_") and len(args) > 2 and _bool_index(args[1]):
        values, accumulate = args[2], args[3] if len(args) > 3 else kwargs.get("accumulate", False)
        # one host value written under a mask goes to masked_fill, which never counts the mask
        fill = not accumulate and values.numel() == 1 and values.device.type == "cpu"
        return None if fill else "boolean mask index"
    if op in ("copy_", "_to_copy"):
        return _host_copy(op, args, kwargs)
    return None


def _tensor_repeats(args) -> bool:
    repeats = args[1] if len(args) > 1 else args[0] if args else None  # (self, repeats, ...) or (repeats)
    return isinstance(repeats, torch.Tensor)


def _bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _host_copy(op: str, args, kwargs) -> str | None:
    """A blocking copy from a device into host memory (only on a machine with a device)."""
    if kwargs.get("non_blocking") or (op == "copy_" and len(args) > 2 and args[2]):
        return None
    if op == "copy_":
        dst, src = args[0], args[1] if len(args) > 1 else kwargs.get("src")
        to_host = isinstance(src, torch.Tensor) and dst.device.type == "cpu"
    else:
        src, device = args[0], kwargs.get("device")
        to_host = device is not None and torch.device(device).type == "cpu"
    return "copy to host" if to_host and src.device.type not in ("cpu", "meta") else None


__all__ = ["HostSyncError", "StepCounter", "no_host_sync"]
