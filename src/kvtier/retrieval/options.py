"""Typed options: one dataclass per preset, the engine's own settings, and the checks for all of them.

A preset's options are what a user types (`freekv:budget=512`); `engine()` turns them into `EngineOptions`, the
parts the engine is built from. Checks live in field metadata and run in one place, `check_fields`, so every bad
value gets the same kind of message: the option, what it must be, and what was given.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

SCORERS = ("digest", "lowbit")
RESTS = ("drop", "lowbit")
QUERIES = ("current", "previous", "speculative")


def _int(lo: int = 0):
    return {"check": "int", "min": lo}


def _choice(*values):
    return {"check": "choice", "values": values}


def check_fields(obj, owner: str) -> None:
    """Validate every field of a dataclass instance against its metadata; ValueError names the first bad one."""
    for f in dataclasses.fields(obj):
        rule, value = f.metadata, getattr(obj, f.name)
        if not rule or (value is None and rule.get("optional")):
            continue
        kind = rule["check"]
        if kind == "int":
            if not isinstance(value, int) or isinstance(value, bool) or value < rule["min"]:
                what = "a non-negative int" if rule["min"] == 0 else f"an int >= {rule['min']}"
                raise ValueError(f"{owner} option {f.name} must be {what}, got {value!r}")
        elif kind == "choice":
            # True == 1 in Python: a bool is one of the choices only where the choices are bools
            if value not in rule["values"] or (isinstance(value, bool)
                                               and not any(isinstance(c, bool) for c in rule["values"])):
                raise ValueError(f"{owner} option {f.name} must be one of {list(rule['values'])}, got {value!r}")
        elif kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{owner} option {f.name} must be True or False, got {value!r}")
        elif kind == "range":
            lo, hi = rule["range"]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ValueError(f"{owner} option {f.name} must be a number in [{lo}, {hi}] ({rule['means']}), "
                                 f"got {value!r}")


def defaults_of(cls) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls)}


@dataclass
class EngineOptions:
    """The parts of one retrieval engine (see `retrieval.engine`).

    page_size: granularity (1: single tokens). sink, window: tokens kept whole on the device at the start and
    the end; the window leaves the device a `window_unit` at a time. slots: recalled pages per KV head.
    scorer: "digest" (min/max keys per page) or "lowbit" (low-bit keys of every token). rest: what attention
    does with pages not recalled ("drop", or "lowbit": read their low-bit copy). query: which query selects the
    pages a step reads ("current"; "previous" step's, corrected when the cosine drops below tau; "speculative"
    next token's, corrected when it caught less than `correct` of the real token's pages).
    """

    page_size: int = field(default=32, metadata=_int(1))
    sink: int = field(default=0, metadata=_int())
    window: int = field(default=0, metadata=_int())
    window_unit: int = field(default=32, metadata=_int(1))
    slots: int = field(default=1, metadata=_int(1))
    scorer: str = field(default="digest", metadata=_choice(*SCORERS))
    bits: int = field(default=2, metadata=_choice(1, 2, 4))
    key_group: int = field(default=64, metadata=_int(1))
    value_group: int = field(default=64, metadata=_int(1))
    rest: str = field(default="drop", metadata=_choice(*RESTS))
    query: str = field(default="previous", metadata=_choice(*QUERIES))
    tau: float = field(default=0.8, metadata={"check": "range", "range": (-1.0, 1.0), "means": "a cosine"})
    correct: float = field(default=0.0, metadata={"check": "range", "range": (0.0, 1.0), "means": "a hit share"})
    dense_layers: int = field(default=0, metadata=_int())

    def check(self, owner: str, head_dim: int, num_layers: int) -> "EngineOptions":
        check_fields(self, owner)
        p = self.page_size
        if self.sink % p or self.window % p or self.window_unit % p:
            raise ValueError(f"{owner} sink ({self.sink}) and window ({self.window}) must be multiples of the "
                             f"page size ({p})")
        if self.key_group % p:
            raise ValueError(f"{owner} low-bit key groups ({self.key_group} tokens) must be a multiple of the page "
                             f"size ({p})")
        if self.rest == "lowbit" and self.scorer != "lowbit":
            raise ValueError(f"{owner} rest='lowbit' reads the pages not recalled through the low-bit keys that "
                             "scorer='lowbit' keeps: give scorer='lowbit' too")
        if head_dim % self.value_group:
            raise ValueError(f"{owner} value group ({self.value_group} channels) must divide head_dim {head_dim}")
        if self.dense_layers > num_layers:
            raise ValueError(f"{owner} dense_layers={self.dense_layers} exceeds the model's {num_layers} layers")
        return self

    @property
    def ring(self) -> int:
        """Device tokens of the recent window: its most tokens plus one unit, and a speculative token, in pages."""
        most = max(self.window + self.window_unit, self.key_group if self.scorer == "lowbit" else 0)
        return -(-most // self.page_size) * self.page_size

    def held_rows(self, capacity: int) -> tuple[int, int]:
        """(slots, ring tokens) a layer of `capacity` tokens holds: no more than the sequence can fill, since a
        budget or window beyond it would only hold empty rows. The pages selected stay the same: a step selects
        among the pages between the sink and the window, at most (capacity - sink - window) / page_size."""
        p = self.page_size
        between = -(-(capacity - self.sink - self.window) // p)
        return min(self.slots, max(1, between)), min(self.ring, -(-capacity // p) * p)


@dataclass
class FreeKVOptions:
    """FreeKV's options (defaults are the paper's, sink and window scaled to the budget; see methods/freekv.py)."""

    budget: int = field(default=2048, metadata=_int(1))
    page_size: int = field(default=32, metadata=_int(1))
    sink: int | None = field(default=None, metadata={**_int(), "optional": True})
    window: int | None = field(default=None, metadata={**_int(), "optional": True})
    tau: float = field(default=0.8, metadata={"check": "range", "range": (-1.0, 1.0), "means": "a cosine"})
    dense_layers: int = field(default=1, metadata=_int())
    speculative: bool = field(default=True, metadata={"check": "bool"})
    query: str | None = field(default=None, metadata={**_choice(*QUERIES, None), "optional": True})
    scorer: str = field(default="digest", metadata=_choice(*SCORERS))
    score_bits: int = field(default=2, metadata=_choice(1, 2, 4))
    score_group: int | None = field(default=None, metadata={**_int(1), "optional": True})
    rest: str = field(default="drop", metadata=_choice(*RESTS))
    correct: float = field(default=0.0, metadata={"check": "range", "range": (0.0, 1.0), "means": "a hit share"})

    edge_tokens = 128  # the paper's sink and window for long inputs

    def check(self) -> tuple[int, int, int]:
        """The checks that need no model; returns the (sink, window, slots) the budget is split into."""
        check_fields(self, "freekv")
        p = self.page_size
        edge = max(p, min(self.edge_tokens, self.budget // 16 // p * p))
        sink = edge if self.sink is None else self.sink
        window = edge if self.window is None else self.window
        slots = (self.budget - sink - window) // p
        if slots < 1:
            raise ValueError(f"freekv budget {self.budget} must cover sink ({sink}) + window ({window}) + at least "
                             f"one page of {p} tokens")
        return sink, window, slots

    def engine(self, head_dim: int, num_layers: int) -> EngineOptions:
        sink, window, slots = self.check()
        p = self.page_size
        group = self.score_group if self.score_group is not None else max(64, p) // p * p
        query = self.query or ("previous" if self.speculative else "current")
        return EngineOptions(page_size=p, sink=sink, window=window, window_unit=p, slots=slots, scorer=self.scorer,
                             bits=self.score_bits, key_group=group, value_group=math.gcd(64, head_dim),
                             rest=self.rest, query=query, tau=float(self.tau), correct=float(self.correct),
                             dense_layers=self.dense_layers).check("freekv", head_dim, num_layers)


@dataclass
class SpeCacheOptions:
    """SpeCache's options (defaults are the paper's; see methods/specache.py)."""

    bits: int = field(default=2, metadata=_choice(1, 2))
    group_size: int = field(default=64, metadata=_int(1))
    residual: int = field(default=64, metadata=_int(1))
    topk: int = field(default=64, metadata=_int(1))
    speculative: bool = field(default=True, metadata={"check": "bool"})
    value_group: int | None = field(default=None, metadata={**_int(1), "optional": True})
    correct: float = field(default=0.0, metadata={"check": "range", "range": (0.0, 1.0), "means": "a hit share"})

    def check(self) -> None:
        """The checks that need no model."""
        check_fields(self, "specache")

    def engine(self, head_dim: int, num_layers: int) -> EngineOptions:
        self.check()
        value_group = self.value_group if self.value_group is not None else min(self.group_size, head_dim)
        if head_dim % value_group and self.value_group is not None:
            raise ValueError(f"specache value_group {self.value_group} must divide head_dim {head_dim} (values are "
                             "grouped along channels)")
        if head_dim % value_group:
            raise ValueError(f"specache group_size {self.group_size} must divide head_dim {head_dim} (values are "
                             "grouped along channels), or give value_group")
        return EngineOptions(page_size=1, sink=0, window=self.residual, window_unit=self.group_size,
                             slots=self.topk, scorer="lowbit", bits=self.bits, key_group=self.group_size,
                             value_group=value_group, rest="lowbit",
                             query="speculative" if self.speculative else "current", correct=float(self.correct),
                             dense_layers=0).check("specache", head_dim, num_layers)
