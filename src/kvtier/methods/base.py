"""The surface every method implements, the registry that names them, and method specs ("freekv:budget=512").

A method receives each layer's new keys and values (after RoPE) through `append`, then the layer's queries
through `attend`, and returns the attention output. It decides where KV lives and what moves; it never
sees transformers. The bookkeeping every method shares (lengths, batch checks, counters) lives here.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .. import snapshot
from ..link import Link
from ..models import ModelSpec
from ..store import DeviceLedger, HostPool

METHOD_REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    METHOD_REGISTRY[cls.name] = cls
    return cls


def method_class(name: str) -> type["Method"]:
    if name not in METHOD_REGISTRY:
        hint = ""
        if isinstance(name, str) and ":" in name and name.split(":")[0].strip() in METHOD_REGISTRY:
            # a spec as the evaluations take it ("freekv:budget=512"), where a method name alone is wanted
            base, *opts = [part.strip() for part in name.split(":")]
            hint = (f"; give the options apart: method={base!r}, {', '.join(opts)} in Python, "
                    f"--method {base} {' '.join('--option ' + o for o in opts)} on the command line")
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHOD_REGISTRY)}{hint}")
    return METHOD_REGISTRY[name]


@dataclass(frozen=True)
class MethodSpec:
    """A method and its options, named for tables: "freekv:budget=512"."""

    method: str
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.method}:{opts}" if opts else self.method

    def __hash__(self):
        return hash(self.label)


def parse_value(text: str):
    """An option's value as written on a command line: a Python literal (512, 0.25, True, "x"), else the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_methods(text_or_list) -> list[MethodSpec]:
    """"full,freekv:budget=512:page_size=16" or a list of such strings / MethodSpecs -> [MethodSpec]."""
    items = text_or_list.split(",") if isinstance(text_or_list, str) else list(text_or_list)
    specs = []
    for item in items:
        if isinstance(item, MethodSpec):
            specs.append(item)
            continue
        name, *opts = [part.strip() for part in str(item).split(":")]
        if not name:
            continue
        if name not in METHOD_REGISTRY:
            raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHOD_REGISTRY)}")
        options = {}
        for opt in opts:
            if "=" not in opt:
                raise ValueError(f"method option {opt!r} in {item!r} must be key=value")
            key, value = opt.split("=", 1)
            if key.strip() in options:
                raise ValueError(f"method option {key.strip()!r} is given twice in {item!r}; give it once")
            options[key.strip()] = parse_value(value)
        check_option_names(name, options, f" in {item!r}")
        # a budget given as a share of the context is resolved, and checked, per prompt: any context will do here
        method_class(name).check_values(resolve_options(options, 1 << 30))
        specs.append(MethodSpec(name, options))
    if not specs:
        raise ValueError("no methods given")
    return specs


def check_option_names(method: str, options, where: str = "") -> None:
    """Unknown method or option names as the method's constructor reports them, without building anything (the
    values are checked when the cache is made)."""
    _check_names(method, method_class(method).defaults, options, where)


def _check_names(method: str, defaults: dict, options, where: str = "") -> None:
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "none"
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}{where}; valid options: {valid}")


def resolve_options(options: dict, context_tokens: int | None) -> dict:
    """A budget given as a fraction ("freekv:budget=0.25") becomes that share of this prompt's context."""
    options = dict(options)
    budget = options.get("budget")
    if context_tokens is not None and isinstance(budget, float) and 0 < budget <= 1:
        options["budget"] = int(budget * context_tokens)
    return options


class Method:
    """Base of every KV placement method. Subclasses set `name`, `defaults` and implement `_append`/`_attend`."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, spec: ModelSpec, **options):
        self.check_values(options)
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

    @classmethod
    def check_values(cls, options: dict) -> None:
        """Check the option names and the values that need no model, as the constructor would (ValueError): the
        command line and the evaluations call this before they load a model. The constructor checks the rest
        (those that depend on the model's shape)."""
        _check_names(cls.name, cls.defaults, options)

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

    # -- forking and saving (the state as data: kvtier.snapshot) ----------------------------------------------
    def model_refs(self) -> dict[str, object]:
        """Objects in the state that belong to the model or the process, by name: never copied or saved. A fork
        gets its parent's; a loaded method the loading model's (those of a fresh method built for it)."""
        return {"spec": self.spec}

    def fork_shares(self, link: Link) -> dict[str, tuple[object, object]]:
        """What a fork shares with this method instead of copying, by name: (this method's object, the fork's).
        A method keeps its host pool in `self.pool`; the fork reads the same pages (append-only past them,
        `store.ForkShare`)."""
        pool = getattr(self, "pool", None)
        return {"pool": (pool, pool.fork(link))} if isinstance(pool, HostPool) else {}

    def forked_from(self, parent: "Method") -> None:
        """Called on a new fork once it is built, for a method to join what it shares with `parent`."""

    def _between_steps(self, what: str) -> None:
        busy = self.fresh if isinstance(getattr(self, "fresh", None), dict) else {}
        if busy or self.in_prefill or self.feed_mode != "store":
            raise RuntimeError(f"{what} a cache in the middle of a forward pass; do it between forward passes")
        self.link.synchronize()  # copies in flight land before their buffers are read (nothing to do on CPU)

    def fork(self) -> "Method":
        """A copy that continues on its own: device state copied, host pages shared (`fork_shares`), counters
        carried on (a fork's stats count the prefix it was made from, as the parent's do)."""
        self._between_steps("cannot fork")
        link = Link(self.device)
        for name in ("h2d_bytes", "d2h_bytes", "h2d_copies", "d2h_copies"):
            setattr(link, name, getattr(self.link, name))
        shares = self.fork_shares(link)
        refs = {**self.model_refs(), "link": self.link}
        names = {id(obj): name for name, obj in refs.items() if obj is not None}
        names.update({id(mine): name for name, (mine, _) in shares.items() if mine is not None})
        graph, storages = snapshot.encode(self, names)
        objects = {**refs, "link": link, **{name: theirs for name, (_, theirs) in shares.items()}}
        twin = snapshot.decode(graph, [s.clone() for s in storages], objects, self.device)
        twin.forked_from(self)
        return twin

    def snapshot(self) -> tuple[object, list[torch.UntypedStorage], dict]:
        """The state to save: (graph, storages, link counters); `restore` builds the method again from them."""
        self._between_steps("cannot save")
        refs = {**self.model_refs(), "link": self.link}
        graph, storages = snapshot.encode(self, {id(obj): name for name, obj in refs.items() if obj is not None})
        return graph, storages, {"h2d_bytes": self.link.h2d_bytes, "d2h_bytes": self.link.d2h_bytes,
                                 "h2d_copies": self.link.h2d_copies, "d2h_copies": self.link.d2h_copies}

    def restore(self, graph, storages: list[torch.UntypedStorage], counters: dict) -> "Method":
        """The method a `snapshot` describes, bound to this (fresh) method's model and link."""
        for name, value in counters.items():
            setattr(self.link, name, int(value))
        return snapshot.decode(graph, storages, {**self.model_refs(), "link": self.link}, self.device)

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
