"""Decode-mode perplexity: teacher-forced targets after a long real context, one token at a time."""

from __future__ import annotations

import math

import torch

from ..generate import score
from .common import check_lengths, check_texts, text_by_name, write_json
from .runner import BesideFull


def paired_delta(method_nll: torch.Tensor, full_nll: torch.Tensor) -> dict:
    """Method minus full on the same tokens: mean NLL difference, its standard error and a 95% interval on the
    perplexity difference, paired token by token (why: docs/evaluation.md)."""
    diff = (method_nll.double() - full_nll.double()).flatten()
    n = diff.numel()
    delta = float(diff.mean())
    se = float(diff.std()) / math.sqrt(n) if n > 1 else math.nan  # one token gives no spread to estimate
    base = float(full_nll.double().mean())
    ci = [math.exp(base + delta + z * 1.96 * se) - math.exp(base) for z in (-1, 1)]
    return {"nll_delta_vs_full": delta, "nll_delta_se": se, "ppl_delta_ci95": ci}


def window_starts(length: int, window: int, windows: int) -> list[int]:
    """Starts of `windows` disjoint windows of `window` tokens, one at the head of each equal share of the text."""
    fit = length // window
    if windows > fit:
        raise ValueError(f"{length} tokens fit {fit} disjoint window(s) of context + targets = {window}; "
                         f"asked for {windows}")
    return [i * (length // windows) for i in range(windows)]


def check_ppl(texts, context, targets: int, windows: int) -> tuple[list[str], int]:
    """The run's arguments checked before any work: (texts, context in tokens)."""
    texts = check_texts(texts)
    context = check_lengths([context], "context")[0]
    for name, value in (("targets", targets), ("windows", windows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")
    return texts, context


def text_windows(tokenizer, texts, context: int, targets: int, windows: int) -> dict:
    """{text: (its ids, the starts of its windows)}, every text checked before any is scored: one too short for the
    windows failed only after the texts before it had run."""
    out = {}
    for name in texts:
        ids = tokenizer(text_by_name(name), return_tensors="pt", add_special_tokens=False)["input_ids"]
        try:
            out[name] = ids, window_starts(ids.shape[1], context + targets, windows)
        except ValueError as err:
            raise ValueError(f"text {name!r}: {err}") from None
    return out


@torch.inference_mode()
def perplexity(model, tokenizer, methods, texts=("prose", "code"), context="2k", targets: int = 256,
               out_dir=None, progress: bool = True, windows: int = 1) -> dict:
    """NLL and perplexity of `targets` tokens after `context` tokens, in each of `windows` disjoint windows spread
    over each text, per method; the windows' tokens are pooled, and each method is set against full on them.

    Cache counters add up over windows, except device_kv_bytes: the largest of the windows' peaks.
    """
    texts, context = check_ppl(texts, context, targets, windows)
    runner = BesideFull(model, methods, context, out_dir, new_tokens=targets)
    rows = []
    for name, (ids, starts) in text_windows(tokenizer, texts, context, targets, windows).items():

        def nll_of(spec):
            """The NLLs of every window's targets, pooled, and the cache counters over the windows."""
            nlls, stats = [], {"device_kv_bytes": 0, "h2d_bytes": 0, "decode_steps": 0}
            for start in starts:
                ctx = ids[:, start:start + context].to(runner.device)
                tgt = ids[:, start + context:start + context + targets].to(runner.device)
                cache = runner.cache(spec, context)
                nlls.append(score(model, ctx, tgt, cache=cache, progress=progress)[0].cpu())
                window_stats = cache.stats()
                stats["device_kv_bytes"] = max(stats["device_kv_bytes"], window_stats["device_kv_bytes"])
                stats["h2d_bytes"] += window_stats["h2d_bytes"]
                stats["decode_steps"] += window_stats["decode_steps"]
            return torch.cat(nlls), stats

        def row(spec, output, reference):
            (nll, stats), (full_nll, _) = output, reference
            mean, full_mean = float(nll.mean()), float(full_nll.mean())
            return {"text": name, "context": context, "targets": targets, "windows": windows,
                    "scored_tokens": nll.numel(), "nll": mean, "ppl": math.exp(mean),
                    "ppl_delta_vs_full": math.exp(mean) - math.exp(full_mean), **paired_delta(nll, full_nll), **stats}

        rows += runner.rows(nll_of, row)
    result = {"eval": "ppl", "context": context, "targets": targets, "windows": windows, "texts": list(texts),
              "rows": rows}
    if out_dir is not None:
        result["json"] = str(write_json(result, out_dir, "ppl.json"))
    return result
