"""Needle in a haystack: a passphrase hidden at a depth of a long real text; does each method recall it?"""

from __future__ import annotations

import random

import torch
from tqdm.auto import tqdm

from ..cache import KVCache
from ..demo import needle_prompt
from ..generate import generate
from .common import parse_length, parse_methods, plotting, with_full, write_json

WORDS = ("amber", "violet", "cobalt", "maple", "granite", "harbor", "lantern", "meadow", "orbit", "quartz",
         "raven", "saffron", "timber", "willow", "zephyr", "copper", "falcon", "juniper")


def passphrase(rng: random.Random) -> str:
    return f"{rng.choice(WORDS)}-{rng.choice(WORDS)}-{rng.randint(1000, 9999)}"


@torch.inference_mode()
def needle_grid(model, tokenizer, methods, lengths=("1k", "2k"), depths=(0.0, 0.25, 0.5, 0.75, 1.0),
                seed: int = 0, max_new_tokens: int = 24, out_dir=None, progress: bool = True) -> dict:
    """Every method on every (length, depth) prompt; success = the passphrase appears in the answer.

    Returns JSON-ready results: one row per prompt and method (answer, success, same tokens as full) and a
    per-method summary (success rate, agreement with full). Writes needle.json and heatmaps if out_dir.
    """
    specs = with_full(parse_methods(methods))
    lengths = [parse_length(x) for x in lengths]
    depths = [float(d) for d in depths]
    rng = random.Random(seed)
    device = next(model.parameters()).device
    rows = []
    cells = [(n, d) for n in lengths for d in depths]
    for length, depth in tqdm(cells, desc="needle grid", disable=not progress):
        value = passphrase(rng)
        ids = needle_prompt(tokenizer, length, depth, value).to(device)
        reference = None
        for spec in specs:
            cache = KVCache(model, method=spec.method, **spec.options)
            out = generate(model, ids, cache=cache, max_new_tokens=max_new_tokens)
            new = out[0, ids.shape[1]:]
            if reference is None:
                reference = new
            answer = tokenizer.decode(new, skip_special_tokens=True)
            stats = cache.stats()
            rows.append({"method": spec.label, "length": length, "prompt_tokens": int(ids.shape[1]),
                         "depth": depth, "needle": value, "answer": answer.strip(), "success": value in answer,
                         "same_as_full": bool(torch.equal(new, reference)),
                         "device_kv_bytes": stats["device_kv_bytes"], "h2d_bytes": stats["h2d_bytes"]})
    summary = {}
    for spec in specs:
        mine = [r for r in rows if r["method"] == spec.label]
        summary[spec.label] = {"success_rate": sum(r["success"] for r in mine) / len(mine),
                               "agreement_with_full": sum(r["same_as_full"] for r in mine) / len(mine),
                               "prompts": len(mine)}
    result = {"eval": "needle", "lengths": lengths, "depths": depths, "seed": seed, "summary": summary, "rows": rows}
    if out_dir is not None:
        result["json"] = str(write_json(result, out_dir, "needle.json"))
        result["plots"] = _heatmaps(result, out_dir)
    return result


def _heatmaps(result: dict, out_dir) -> list[str]:
    plt = plotting()
    if plt is None:
        return []
    from pathlib import Path

    lengths, depths = result["lengths"], result["depths"]
    labels = list(result["summary"])
    fig, axes = plt.subplots(1, len(labels), figsize=(3.2 * len(labels), 3.2), squeeze=False)
    for ax, label in zip(axes[0], labels):
        grid = [[next(r["success"] for r in result["rows"] if r["method"] == label and r["length"] == n
                      and r["depth"] == d) for n in lengths] for d in depths]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        ax.set_xlabel("context tokens")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{label}\n{result['summary'][label]['success_rate']:.0%} found", fontsize=9)
    fig.tight_layout()
    path = Path(out_dir) / "needle.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]
