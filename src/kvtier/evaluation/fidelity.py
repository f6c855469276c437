"""Next-token fidelity along full's greedy generations: per step, does the method's top-1 token match full's,
and how far is its distribution (KL(full || method))?

`full` continues windows of real prose and code greedily; then every method decodes the same tokens teacher-
forced (`kvtier.generate.forced_logits`), so all are compared at the same positions, step by step.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..generate import forced_logits, generate
from .common import check_lengths, check_texts, plotting, text_by_name, write_json
from .runner import BesideFull


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _step_means(rows: list[dict]) -> dict:
    """Top-1 agreement and KL averaged over every step of `rows` (prompts weighted by their steps)."""
    steps = sum(r["steps"] for r in rows)
    return {key: sum(r[key] * r["steps"] for r in rows) / steps for key in ("top1_agreement", "kl_mean")}


def check_fidelity(texts, lengths, prompts: int, new_tokens: int) -> tuple[list[str], list[int]]:
    """The run's arguments checked before any work: (texts, lengths in tokens)."""
    texts, lengths = check_texts(texts), check_lengths(lengths)
    for name, value in (("prompts", prompts), ("new_tokens", new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")
    return texts, lengths


@torch.inference_mode()
def fidelity(model, tokenizer, methods, texts=("prose", "code"), lengths=("1k",), prompts: int = 1,
             new_tokens: int = 64, seed: int = 0, out_dir=None, progress: bool = True) -> dict:
    """Top-1 agreement with full and KL(full || method) at each of `new_tokens` steps of full's greedy
    continuation of `prompts` windows (random starts, from `seed`) of each text at each length.

    Returns JSON-ready rows (one per prompt and method, with the per-step KL) and a per-method summary (mean
    over every step of every prompt). Writes fidelity.json and fidelity.png if out_dir.
    """
    texts, lengths = check_fidelity(texts, lengths, prompts, new_tokens)
    runner = BesideFull(model, methods, lengths, out_dir, new_tokens=new_tokens)
    rng = random.Random(seed)
    rows = []
    cells = [(t, n, i) for t in texts for n in lengths for i in range(prompts)]
    tokens = {t: tokenizer(text_by_name(t), add_special_tokens=False, return_tensors="pt")["input_ids"] for t in texts}
    for text, length, _ in cells:  # before the first prompt runs, not after the shorter lengths' prompts
        if tokens[text].shape[1] < length:
            raise ValueError(f"text {text!r} has {tokens[text].shape[1]} tokens; a window of {length} does not fit")
    for text, length, _ in tqdm(cells, desc="fidelity", disable=not progress):
        ids = tokens[text]
        start = rng.randrange(ids.shape[1] - length + 1)
        context = ids[:, start:start + length].to(runner.device)
        targets = generate(model, context, method="full", max_new_tokens=new_tokens)[:, length:]

        def log_probs(spec):
            logits = forced_logits(model, context, targets, cache=runner.cache(spec, length))[0]
            return torch.log_softmax(logits, -1)

        def row(spec, logp, reference):
            kl = (reference.exp() * (reference - logp)).sum(-1).clamp_min(0.0)
            agree = logp.argmax(-1) == reference.argmax(-1)
            return {"text": text, "length": length, "start": start, "steps": int(targets.shape[1]),
                    "top1_agreement": float(agree.float().mean()), "kl_mean": float(kl.mean()),
                    "kl_max": float(kl.max()), "kl_per_step": kl.tolist(),
                    **({"continuation": tokenizer.decode(targets[0])} if logp is reference else {})}

        rows += runner.rows(log_probs, row)
    summary = {label: {**_step_means(mine), "kl_max": max(r["kl_max"] for r in mine),
                       "steps": sum(r["steps"] for r in mine), "prompts": len(mine),
                       "by_text": {t: _step_means([r for r in mine if r["text"] == t]) for t in texts}}
               for label, mine in runner.by_method(rows).items()}
    result = {"eval": "fidelity", "texts": list(texts), "lengths": lengths, "prompts": prompts,
              "new_tokens": new_tokens, "seed": seed, "summary": summary, "rows": rows}
    if out_dir is not None:
        result["json"] = str(write_json(result, out_dir, "fidelity.json"))
        result["plot"] = _plot(result, out_dir)
    return result


def _plot(result: dict, out_dir) -> str | None:
    """Mean KL(full || method) at each generation step, over every prompt."""
    plt = plotting()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, row in result["summary"].items():
        curves = [r["kl_per_step"] for r in result["rows"] if r["method"] == label]
        steps = min(len(c) for c in curves)
        ax.plot(range(steps), [_mean(c[i] for c in curves) for i in range(steps)],
                label=f"{label} (top-1 {row['top1_agreement']:.0%})")
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.set_xlabel("generated token")
    ax.set_ylabel("KL(full || method), nats")
    ax.set_title("Next-token fidelity along full's greedy generations", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out_dir) / "fidelity.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
