"""The quickstart's main job: one long prompt, every method, side by side.

A needle (a passphrase) is hidden in a few thousand tokens of Python's own documentation; each method
answers the same question with greedy decoding. The table shows the answer, whether it matches `full`
token for token, KV bytes on the device and in host memory, bytes moved, and wall time. On CPU the
"device" is main memory too: bytes are exact, times are CPU times and say so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .evaluation.common import check_output_file, with_full
from .evaluation.needle import needle_prompt
from .evaluation.runner import BesideFull
from .generate import generate
from .methods import parse_methods
from .models import environment_summary, load, resolve_device, resolve_dtype, resolve_model


# FreeKV at about a third of the demo's context, where it saves device memory, as the paper has it and with the
# options beyond the paper that hold it to full's output (docs/results/fidelity-bars); the others at their defaults.
DEFAULT_METHODS = ("full,offload,kvpr,freekv:budget=1024,"
                   "freekv:budget=1024:page_size=8:scorer=lowbit:rest=lowbit:tau=0.9,specache")


def run(model_name: str | None = None, methods=None, context_tokens: int = 3000, max_new_tokens: int = 24,
        device=None, dtype=None, out: str | None = "runs/demo.json", progress: bool = True) -> dict:
    """methods: "full,freekv:budget=1024,..." or a list of such names (see kvtier.evaluation.parse_methods); None for
    DEFAULT_METHODS. Every argument, method option name and the output path are checked before the model loads,
    every method's option values before the first method runs."""
    specs = with_full(parse_methods(DEFAULT_METHODS if methods is None else methods))  # every figure vs full
    for name, value in (("context_tokens", context_tokens), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")
    if out:
        check_output_file(out)
    resolve_dtype(dtype, resolve_device(device))
    resolve_model(model_name)
    model, tokenizer = load(model_name, device=device, dtype=dtype)
    runner = BesideFull(model, specs, context_tokens)
    value = "violet-anchor-4127"
    ids = needle_prompt(tokenizer, context_tokens, 0.5, value).to(runner.device)

    def ask(spec):
        cache = runner.cache(spec, context_tokens)
        start = time.perf_counter()
        out_ids = generate(model, ids, cache=cache, max_new_tokens=max_new_tokens, progress=progress)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return out_ids[0, ids.shape[1]:], time.perf_counter() - start, cache.stats()

    def row(spec, output, reference):
        new, seconds, stats = output
        answer = tokenizer.decode(new, skip_special_tokens=True)
        return {"answer": answer.strip(), "found_needle": value in answer,
                "same_tokens_as_full": bool(torch.equal(new, reference[0])), "seconds": seconds,
                "options": spec.options, **{k: v for k, v in stats.items() if k != "method"}}

    rows = runner.rows(ask, row)
    result = {
        "job": "demo",
        "prompt_tokens": int(ids.shape[1]),
        "max_new_tokens": max_new_tokens,
        "needle": value,
        "environment": environment_summary(),
        "time_note": "wall time on CPU: not a speed result" if model.device.type == "cpu" else "wall time",
        "rows": rows,
    }
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        result["path"] = str(path)
    return result


def _mib(n: int) -> str:
    return f"{n / 2**20:8.2f}"


def format_table(result: dict) -> str:
    env = result["environment"]
    width = max([20] + [len(r["method"]) for r in result["rows"]])
    lines = [
        f"kvtier {env['kvtier']} | torch {env['torch']} | transformers {env['transformers']} | {env['device']}",
        f"prompt: {result['prompt_tokens']} tokens, needle '{result['needle']}' at half depth; "
        f"{result['max_new_tokens']} new tokens, greedy",
        "",
        f"{'method':<{width}} {'device KV MiB':>13} {'host KV MiB':>11} {'h2d MiB':>9} {'d2h MiB':>9} "
        f"{'time s':>7}  {'=full':>5}  answer",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['method']:<{width}} {_mib(r['device_kv_bytes']):>13} {_mib(r['host_kv_bytes']):>11} "
            f"{_mib(r['h2d_bytes']):>9} {_mib(r['d2h_bytes']):>9} {r['seconds']:7.1f}  "
            f"{'yes' if r['same_tokens_as_full'] else 'no':>5}  {r['answer'][:72]!r}"
        )
    lines.append("")
    lines.append(f"({result['time_note']}; device KV = peak bytes of KV state on the device; "
                 f"h2d/d2h = bytes moved host->device / device->host)")
    if "path" in result:
        lines.append(f"JSON: {result['path']}")
    return "\n".join(lines)
