"""A method's state as data: what `KVCache.fork`, `save` and `load` copy, write and read.

A method is a small graph of plain objects (kvtier classes, lists, dicts, numbers) and tensors, several of them
views of one buffer (the retrieval engine reads and writes its KV buffer through row views, and its counters are
views of one tensor). `encode` turns the graph into JSON-able data plus a list of the storages (buffers) its
tensors live in; every tensor is recorded as a view (dtype, offset, shape, stride) of one of them, so views stay
views of one buffer after `decode` builds the graph again.

Objects that are not the method's own are named instead of encoded (`Method.model_refs`: the model's spec, the
link; KVPR's projections of the model), and `decode` is given the objects to put in their place: a fork gets
the parent's spec, a loaded cache the loading model's. A fork also names what it shares rather than copies (the
host pool, forked). Only classes defined in kvtier modules are rebuilt, without running their __init__ (their
attributes are set directly), so reading a file runs no code from it. The file format is in docs/cache-file.md.
"""

from __future__ import annotations

import importlib

import torch

from .link import Link
from .models import dtype_name
from .store import ForkShare


class SnapshotError(ValueError):
    """State that cannot be encoded, or data that does not decode into a method."""


def encode(root, names: dict[int, str]):
    """-> (graph, storages): JSON-able data for `root` and the storages its tensors view, in order of first use.

    names: id(object) -> name, for objects written as a reference to `decode`'s `objects[name]`. The caller
    synchronizes the method's link first: a CUDA event in the state is written as None (what it marked is done).
    """
    objects: dict[int, int] = {}
    storages: dict[int, int] = {}
    found: list[torch.UntypedStorage] = []
    alive = []  # every object encoded stays referenced, so no id is reused while encoding

    def enc(x):
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if id(x) in names:
            return {"external": names[id(x)]}
        if isinstance(x, Link):
            return {"external": "link"}  # copies go through the method's link, which holds streams, not state
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            key = storage.data_ptr() if storage.nbytes() else -len(found) - 1  # empty ones share no memory
            if key not in storages:
                storages[key] = len(found)
                found.append(storage)
                alive.append(x)
            return {"tensor": storages[key], "dtype": dtype_name(x.dtype),
                    "offset": x.storage_offset(), "shape": list(x.shape), "stride": list(x.stride())}
        if isinstance(x, torch.dtype):
            return {"dtype": dtype_name(x)}
        if isinstance(x, torch.device):
            return {"device": x.type}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if isinstance(x, tuple):
            return {"tuple": [enc(v) for v in x]}
        if isinstance(x, dict):
            return {"dict": [[enc(k), enc(v)] for k, v in x.items()]}
        if isinstance(x, (ForkShare, torch.cuda.Event)):
            return None  # who else reads a buffer is not state; an event's copy has landed
        if hasattr(x, "item") and callable(x.item) and type(x).__module__ == "numpy":
            return x.item()
        cls = type(x)
        if not cls.__module__.startswith("kvtier.") or isinstance(x, torch.nn.Module) or not hasattr(x, "__dict__"):
            raise SnapshotError(f"cannot copy or save a {cls.__module__}.{cls.__qualname__} held in a method's "
                                "state (only kvtier objects, tensors, numbers, strings and containers)")
        if id(x) in objects:
            return {"ref": objects[id(x)]}
        objects[id(x)] = len(objects)
        alive.append(x)
        return {"object": f"{cls.__module__}:{cls.__qualname__}", "id": objects[id(x)],
                "attrs": {k: enc(v) for k, v in vars(x).items()}}

    return enc(root), found


def _class(path: str) -> type:
    module, _, name = path.partition(":")
    if not (module == "kvtier" or module.startswith("kvtier.")):
        raise SnapshotError(f"class {path!r} is not a kvtier class")
    try:
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise SnapshotError(f"class {path!r} does not exist in this kvtier") from None
    if not isinstance(obj, type) or obj.__module__ != module:
        raise SnapshotError(f"{path!r} is not a class defined in kvtier")
    return obj


def _dtype(name) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise SnapshotError(f"unknown dtype {name!r}")
    return dtype


def decode(graph, storages: list[torch.UntypedStorage], objects: dict[str, object], device: torch.device):
    """Build the graph `encode` wrote, its tensors viewing `storages`; external names from `objects`; devices
    of the device's type as `device`. Tensors are made as ordinary tensors (not inference tensors), so the
    result works inside and outside torch.inference_mode."""
    built: dict[int, object] = {}

    def dec(x):
        if not isinstance(x, (list, dict)):
            return x
        if isinstance(x, list):
            return [dec(v) for v in x]
        if "tensor" in x:
            index = x["tensor"]
            if not isinstance(index, int) or not 0 <= index < len(storages):
                raise SnapshotError(f"tensor of storage {index!r}: there are {len(storages)} storages")
            storage = storages[index]
            t = torch.empty(0, dtype=_dtype(x["dtype"]), device=storage.device)
            return t.set_(storage, x["offset"], x["shape"], x["stride"])
        if "external" in x:
            if x["external"] not in objects:
                raise SnapshotError(f"the state refers to {x['external']!r}, which this method does not have")
            return objects[x["external"]]
        if "dtype" in x:
            return _dtype(x["dtype"])
        if "device" in x:
            if x["device"] != device.type:
                raise SnapshotError(f"the state was made on {x['device']}, not {device.type}")
            return device
        if "tuple" in x:
            return tuple(dec(v) for v in x["tuple"])
        if "dict" in x:
            return {dec(k): dec(v) for k, v in x["dict"]}
        if "ref" in x:
            if x["ref"] not in built:
                raise SnapshotError(f"reference to object {x['ref']} before it is defined")
            return built[x["ref"]]
        if "object" in x:
            cls = _class(x["object"])
            obj = built[x["id"]] = cls.__new__(cls)
            obj.__dict__.update({k: dec(v) for k, v in x["attrs"].items()})
            return obj
        raise SnapshotError(f"unknown entry with keys {sorted(x)}")

    with torch.inference_mode(False), torch.no_grad():
        return dec(graph)
