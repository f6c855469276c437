"""The kvtier cache file: a prefilled `KVCache` on disk (`KVCache.save`, `KVCache.load`).

One safetensors file. Its tensors are the method's buffers as raw bytes (`storage.<i>`, uint8) and the cached
token ids (`token_ids`, int64 [batch, tokens]); its metadata holds `format` ("kvtier-cache") and `kvtier`, a JSON
document with the format version, the model's fingerprint, the method and its options, and the method's state
as `kvtier.snapshot` encodes it. The layout is documented in docs/cache-file.md.

Everything that can be checked is checked from the header alone, before any tensor is read: that the file is
ours, whole (not truncated), of this format and kvtier version, and made for this model and method. Writing goes
to a temporary file in the same folder, which replaces the target only once it is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .models import dtype_name

FORMAT = "kvtier-cache"
FORMAT_VERSION = 1
_MAX_HEADER = 512 * 1024 * 1024  # a safetensors header larger than this is not one
REQUIRED = {"model", "device", "method", "options", "tokens_known", "link", "storages", "state"}


class CacheFileError(ValueError):
    """A cache file that kvtier refuses to load: not ours, damaged, or made for another model, method or version."""


def fingerprint(model) -> dict:
    """What identifies a model for a cache: family, shapes, dtype and a hash of a few weight tensors (the key and
    value projections of the first and last layers, which every cached key and value came through)."""
    from .models import ModelSpec, attention_modules

    spec = ModelSpec.from_model(model)
    modules = attention_modules(model)
    digest = hashlib.sha256()
    for layer in sorted({0, spec.num_layers - 1}):
        for name in ("k_proj", "v_proj"):
            weight = getattr(modules[layer], name).weight.detach()
            digest.update(weight.to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return {"family": spec.family, "num_layers": spec.num_layers, "num_heads": spec.num_heads,
            "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim, "hidden_size": spec.hidden_size,
            "vocab_size": int(getattr(model.config, "vocab_size", 0) or 0),
            "dtype": dtype_name(spec.dtype), "weights_sha256": digest.hexdigest()}


def model_mismatch(saved: dict, model: dict) -> str | None:
    """How the file's model differs from `model` ("num_layers 30 here, 3 in the file; ..."), or None."""
    diffs = [f"{key}: {model.get(key)!r} here, {saved.get(key)!r} in the file" for key in sorted(model)
             if key != "weights_sha256" and saved.get(key) != model[key]]
    if not diffs and saved.get("weights_sha256") != model["weights_sha256"]:
        diffs.append("same shapes but different weights")
    return "; ".join(diffs) or None


def storage_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """The storage's bytes as a uint8 CPU tensor (a view of it on CPU, a copy from a GPU)."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage).cpu()


def write(path, info: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write the file atomically: to a temporary file beside `path`, flushed to disk, then renamed over it."""
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"cannot save the cache to {path}: it is a folder; give a file name")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save the cache to {path}: folder {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "kvtier": json.dumps(info)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # an interrupt or a full disk leaves no half-written file behind
        raise
    return path


def read_info(path, *, kvtier_version: str) -> dict:
    """The JSON document of a cache file, after checking from its header alone that the file is a whole kvtier
    cache file of this format and kvtier version. Reads no tensor."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"cache file not found: {path}")
    if not path.is_file():
        raise CacheFileError(f"{path} is not a file; give a cache file written by KVCache.save or "
                             "`kvtier chat --save-cache`")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= length <= _MAX_HEADER:
            raise CacheFileError(f"{path} is not a kvtier cache file (not a safetensors file: "
                                 f"{size} bytes starting {head[:8]!r})")
        raw = f.read(length)
    if len(raw) < length:
        raise CacheFileError(f"{path} is truncated or not a kvtier cache file: its header claims {length} bytes but "
                             f"the file has {size}; save the cache again")
    try:
        header = json.loads(raw)
        meta = header.get("__metadata__") or {}
        ends = [int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"]
    except (ValueError, AttributeError, KeyError, TypeError, IndexError):
        raise CacheFileError(f"{path} is not a kvtier cache file (not a safetensors file)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "kvtier" not in meta:
        raise CacheFileError(f"{path} is a safetensors file but not a kvtier cache file (no {FORMAT!r} metadata); "
                             "give a file written by KVCache.save or `kvtier chat --save-cache`")
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        raise CacheFileError(f"{path} is truncated: {size} of its {expected} bytes are there (an interrupted copy "
                             "or a full disk?); save the cache again")
    try:
        info = json.loads(meta["kvtier"])
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise CacheFileError(f"{path} is a damaged kvtier cache file (its metadata is not a JSON object)")
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheFileError(f"{path} is a kvtier cache file of format version {version!r}; this kvtier reads "
                             f"version {FORMAT_VERSION}: prefill the document again and save it with this kvtier")
    if info.get("kvtier_version") != kvtier_version:
        raise CacheFileError(f"{path} was saved by kvtier {info.get('kvtier_version')}, this is kvtier "
                             f"{kvtier_version}: a cache file holds method internals of one version; prefill the "
                             "document again and save it with this kvtier")
    missing = sorted(REQUIRED - set(info))
    if missing:
        raise CacheFileError(f"{path} is a damaged kvtier cache file (its metadata lacks {missing}); save the "
                             "cache again")
    return info


def read_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    try:
        # copies out of the file's memory map: the cache owns its memory, whatever later happens to the file
        return {name: t.clone() for name, t in load_file(str(path), device="cpu").items()}
    except Exception as err:  # the header checked out, so the data is damaged
        raise CacheFileError(f"{path} is a damaged kvtier cache file ({type(err).__name__}: {err}); save the "
                             "cache again") from None
