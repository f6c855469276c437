"""What the evaluations share: argument checks, lengths ("2k"), texts and prompts, JSON and plots. Method specs
("freekv:budget=512") are `kvtier.methods.MethodSpec`; the runner that sets every method beside full is `runner`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..cache import make_cache
from ..methods import MethodSpec
from ..models import ModelSpec, environment_summary


def check_output_dir(path, what: str = "out_dir") -> Path:
    """A folder results can be written to: it exists as a folder, or can be made (its nearest existing parent is a
    writable folder). ValueError naming `what` otherwise; nothing is created."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder; give a folder for the results")
    _check_writable(path, what)
    return path


def check_output_file(path, what: str = "out") -> Path:
    """A file path a result can be written to: not a folder, and its folder exists or can be made."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file path, such as {path / 'result.json'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{what} {path} exists and cannot be written (permission denied)")
    _check_writable(path.parent, what)
    return path


def _check_writable(folder: Path, what: str) -> None:
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {folder} cannot be made: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {folder} cannot be written: no write permission in {existing}")


def check_existing(out_dir, names, overwrite: bool, what: str = "--out") -> None:
    """Refuse to overwrite earlier results: ValueError if any of `names` exists in out_dir, unless `overwrite`."""
    if overwrite or out_dir is None:
        return
    found = [n for n in names if (Path(out_dir).expanduser() / n).exists()]
    if found:
        raise ValueError(f"{what} {out_dir} already holds {', '.join(found)} from an earlier run; pass --overwrite to "
                         f"replace it, or give another {what}")


def check_lengths(lengths, what: str = "lengths") -> list[int]:
    """A non-empty list of prompt lengths ("2k", "1500", 2048) as token counts."""
    lengths = [lengths] if isinstance(lengths, (str, int)) else list(lengths)
    if not lengths:
        raise ValueError(f"{what} is empty; give at least one length, such as 1k or 2048")
    out = []
    for x in lengths:
        try:
            out.append(parse_length(x))
        except ValueError:
            raise ValueError(f"{what}: {x!r} is not a length (a positive number of tokens: 2048, 2k)") from None
    return out


def check_texts(texts, what: str = "texts") -> list[str]:
    """A non-empty list of texts: "prose", "code" or paths of readable files."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError(f"{what} is empty; give prose, code or text file paths")
    for name in texts:
        if name in ("prose", "code"):
            continue
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"{what}: {name!r} is neither 'prose', 'code' nor an existing file")
    return texts


def safe_name(label: str) -> str:
    """A method label as a file name: "freekv:budget=512" -> "freekv_budget512"."""
    return label.replace(":", "_").replace(",", "_").replace("=", "")


def with_full(specs: list[MethodSpec]) -> list[MethodSpec]:
    """Every figure is set against full: put it first (adding it if it is missing). A method given twice (the same
    options in any order) runs once: its rows would repeat the first's, and the run would take twice as long."""
    unique = {MethodSpec("full").label: MethodSpec("full")}
    for spec in specs:
        unique.setdefault(spec.label, spec)
    return list(unique.values())


def check_caches(model, specs, lengths, new_tokens: int = 0) -> None:
    """Build (and drop) each method's cache before any work, so that a bad option value fails before the first
    method runs rather than after it (a fractional budget at every length). Building a cache stores nothing.
    The longest length (+ `new_tokens`) must fit the model's positions (`check_fits`)."""
    lengths = [lengths] if isinstance(lengths, int) else list(lengths)
    for spec in specs:
        for n in lengths if isinstance(spec.options.get("budget"), float) else lengths[:1]:
            make_cache(model, spec, n)
    check_fits(ModelSpec.from_model(model).max_positions, lengths, new_tokens)


def check_fits(max_positions: int, lengths, new_tokens: int = 0) -> None:
    """Every length + `new_tokens` within the model's maximum positions, checked before the first prompt runs (a
    generation checks its own prompt, but only once the shorter lengths' prompts have all run)."""
    longest = max([lengths] if isinstance(lengths, int) else lengths)
    if longest + new_tokens > max_positions:
        more = f" + {new_tokens} tokens after it" if new_tokens else ""
        raise ValueError(f"length {longest}{more} exceeds the model's maximum of {max_positions} positions; use "
                         f"lengths up to {max_positions - new_tokens}")


def parse_length(text) -> int:
    """"2k" -> 2048, "1500" -> 1500."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        text = str(text).strip().lower()
        try:
            value = int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)
        except ValueError:
            raise ValueError(f"length {text!r} is not a number of tokens (2048, 2k)") from None
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
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"text file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def chat_ids(tokenizer, content: str, answer_prefix: str = "") -> torch.Tensor:
    """[1, n] ids of `content` as one user message (plain text if the model has no chat template), then the
    start of the assistant's answer (`answer_prefix`), as RULER primes its answers."""
    if getattr(tokenizer, "chat_template", None) is None:
        ids = tokenizer(content + "\n", return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                            add_generation_prompt=True, return_tensors="pt")
        if not isinstance(ids, torch.Tensor):
            ids = ids["input_ids"]
    if answer_prefix:
        prefix = tokenizer(answer_prefix, return_tensors="pt", add_special_tokens=False)["input_ids"]
        ids = torch.cat((ids, prefix), dim=1)
    return ids


def haystack_prompt(tokenizer, context_tokens: int, inserts, question: str, answer_prefix: str = "") -> torch.Tensor:
    """About `context_tokens` tokens of prose with each (depth, sentence) of `inserts` on its own line at that
    depth (0..1) of the text, then `question`; chat-formatted by `chat_ids`."""
    inserts = sorted((float(d), s) for d, s in inserts)
    if any(not 0.0 <= d <= 1.0 for d, _ in inserts):
        raise ValueError(f"depths must be in [0, 1], got {[d for d, _ in inserts]}")
    text_ids = tokenizer(prose_text(), add_special_tokens=False)["input_ids"]
    overhead = chat_ids(tokenizer, question, answer_prefix).shape[1]
    # 32 tokens of slack hold one needle sentence; whatever the inserts take beyond that comes off the text
    inserted = sum(len(tokenizer(s, add_special_tokens=False)["input_ids"]) + 1 for _, s in inserts)
    budget = context_tokens - overhead - 32 - max(0, inserted - 32)
    if budget < 64:
        raise ValueError(f"context_tokens={context_tokens} is too short for this prompt")
    if budget > len(text_ids):
        raise ValueError(f"context_tokens={context_tokens} exceeds the {len(text_ids)} tokens of haystack text")
    body = text_ids[:budget]
    parts, start = [], 0
    for depth, sentence in inserts:
        cut = int(len(body) * depth)
        # cut at a line break so the insert reads as its own sentence
        parts += [tokenizer.decode(body[start:cut]).rsplit("\n", 1)[0], sentence]
        start = cut
    parts.append(tokenizer.decode(body[start:]))
    return chat_ids(tokenizer, "\n".join(parts) + f"\n\n{question}", answer_prefix)


def write_json(result: dict, out_dir, name: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps({**result, "environment": environment_summary()}, indent=2, default=str))
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


def bars(ax, groups: dict, ylabel: str, title: str, labels=None) -> None:
    """Grouped bars on `ax`: a group per key of `groups` ({group: {method label: value}}), a bar per method of
    `labels` (default: every method in `groups`; a method keeps its color and slot across panels)."""
    labels = labels or list(dict.fromkeys(label for values in groups.values() for label in values))
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        xs = [g + (i - (len(labels) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [values.get(label, float("nan")) for values in groups.values()], width, label=label,
               color=f"C{i % 10}")
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.axhline(0, color="black", lw=0.5)


def bar_chart(groups: dict, out_dir, name: str, ylabel: str, title: str) -> str | None:
    """One panel of `bars`, legend beside it, saved as out_dir/name; None without matplotlib."""
    plt = plotting()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(4 + 1.2 * len(groups), 3.4))
    bars(ax, groups, ylabel, title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    path = Path(out_dir) / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
