"""What the evaluations share: method specs ("freekv:budget=512"), lengths ("2k"), texts, JSON and plots."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..methods import METHOD_REGISTRY


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
            try:
                options[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                options[key] = value
        specs.append(MethodSpec(name, options))
    if not specs:
        raise ValueError("no methods given")
    return specs


def with_full(specs: list[MethodSpec]) -> list[MethodSpec]:
    """Every figure is set against full: put it first if it is missing."""
    return specs if any(s.method == "full" and not s.options for s in specs) else [MethodSpec("full"), *specs]


def parse_length(text) -> int:
    """"2k" -> 2048, "1500" -> 1500."""
    if isinstance(text, int):
        return text
    text = str(text).strip().lower()
    value = int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)
    if value <= 0:
        raise ValueError(f"length must be positive, got {text!r}")
    return value


def prose_text() -> str:
    """Python's own help topics: real English prose that every Python install has."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def code_text() -> str:
    """Real Python source from the standard library."""
    import argparse
    import inspect
    import json as json_module
    import logging

    return "\n\n".join(inspect.getsource(m) for m in (argparse, logging, json_module.decoder, inspect))


def text_by_name(name: str) -> str:
    if name == "prose":
        return prose_text()
    if name == "code":
        return code_text()
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"text {name!r} is neither 'prose', 'code' nor a file")
    return path.read_text()


def write_json(result: dict, out_dir, name: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


def plotting():
    """matplotlib with a file backend, or None when it is not installed (JSON is still written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None
