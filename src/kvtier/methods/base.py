"""The surface every method implements, and the registry that names them.

A method receives each layer's new keys and values (after RoPE) through `append`, then the layer's queries
through `attend`, and returns the attention output. It decides where KV lives and what moves; it never
sees transformers. The bookkeeping every method shares (lengths, batch checks, counters) lives here.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..link import Link
from ..models import ModelSpec
from ..store import DeviceLedger

METHOD_REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    METHOD_REGISTRY[cls.name] = cls
    return cls


def method_class(name: str) -> type["Method"]:
    if name not in METHOD_REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHOD_REGISTRY)}")
    return METHOD_REGISTRY[name]


class Method:
    """Base of every KV placement method. Subclasses set `name`, `defaults` and implement `_append`/`_attend`."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, spec: ModelSpec, **options):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            valid = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items()) or "none"
            raise ValueError(f"unknown option(s) {unknown} for method {self.name!r}; valid options: {valid}")
        self.options = {**self.defaults, **options}
        self.spec = spec
        self.device = spec.device
        self.link = Link(spec.device)
        self.ledger = DeviceLedger()
        self.lengths = [0] * spec.num_layers
        self.batch: int | None = None
        self.decode_steps = 0
        # True while a prompt is fed in chunks: later chunks extend the prompt, they are not decode steps.
        self.in_prefill = False
        # How the fed tokens are kept: "store" (all), "lookahead" (none: a pre-decode pass) or "speculative"
        # (all but the last, which is a guessed next token). Only methods with supports_speculation set
        # accept the last two; kvtier.generate sets them through KVCache.feeding().
        self.feed_mode = "store"

    supports_speculation: ClassVar[bool] = False

    def stored_count(self, fed: int) -> int:
        """How many of `fed` tokens this forward keeps in the cache."""
        return {"store": fed, "lookahead": 0, "speculative": fed - 1}[self.feed_mode]

    # -- what a method implements -------------------------------------------------------------------
    def _append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        raise NotImplementedError

    def _attend(self, layer: int, q: torch.Tensor, valid: torch.Tensor | None, scaling: float) -> torch.Tensor:
        raise NotImplementedError

    def host_bytes(self) -> int:
        return 0

    def method_stats(self) -> dict:
        return {}

    def reserve(self, tokens: int) -> None:
        """A hint that the sequence will reach `tokens` tokens, so buffers can be sized once."""

    # -- shared bookkeeping -------------------------------------------------------------------------
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        b, h, t, d = k.shape
        if t == 0:
            raise ValueError("empty input: a forward pass must carry at least one token")
        if (h, d) != (self.spec.num_kv_heads, self.spec.head_dim):
            raise ValueError(f"layer {layer} gave KV of {h} heads x {d} dims; this cache was built for "
                             f"{self.spec.num_kv_heads} x {self.spec.head_dim} (a cache is bound to one model)")
        if self.batch is None:
            self.batch = b
        elif b != self.batch:
            raise ValueError(f"this cache holds {self.batch} sequences but got a batch of {b}; "
                             "make a new KVCache for a new batch")
        if layer == 0 and self.lengths[0] > 0 and not self.in_prefill:
            self.decode_steps += 1
        self._append(layer, k, v)
        self.lengths[layer] += self.stored_count(t)

    def attend(self, layer: int, q: torch.Tensor, valid: torch.Tensor | None, scaling: float) -> torch.Tensor:
        return self._attend(layer, q, valid, scaling)

    def stats(self) -> dict:
        out = {
            "method": self.name,
            "device_kv_bytes": self.ledger.peak,
            "host_kv_bytes": self.host_bytes(),
            "h2d_bytes": self.link.h2d_bytes,
            "d2h_bytes": self.link.d2h_bytes,
            "decode_steps": self.decode_steps,
            "tokens": self.lengths[0],
        }
        out.update(self.method_stats())
        return out
