"""Needle in a haystack: passphrases hidden at a depth of a long real text; does each method recall the one asked?

Two kinds, as RULER has them: "single" (one passphrase, the prompt the demo asks too) and "multikey" (`keys`
passphrases of different projects spread over the text, one asked: the others are distractors).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..generate import generate
from .common import check_lengths, haystack_prompt, plotting, safe_name, write_json
from .runner import BesideFull

WORDS = ("amber", "violet", "cobalt", "maple", "granite", "harbor", "lantern", "meadow", "orbit", "quartz",
         "raven", "saffron", "timber", "willow", "zephyr", "copper", "falcon", "juniper")
PROJECTS = ("Atlas", "Beacon", "Cedar", "Dynamo", "Ember", "Fjord", "Glacier", "Horizon", "Ivory", "Jasper",
            "Kestrel", "Lotus", "Monsoon", "Nimbus", "Onyx", "Pioneer")
KINDS = ("single", "multikey")
NEEDLE = "The secret passphrase of the kvtier demo is {value}."
QUESTION = "What is the secret passphrase of the kvtier demo? Answer with the passphrase only."
MULTIKEY_NEEDLE = "The secret passphrase of the {key} project is {value}."
MULTIKEY_QUESTION = "What is the secret passphrase of the {key} project? Answer with the passphrase only."


def passphrase(rng: random.Random) -> str:
    return f"{rng.choice(WORDS)}-{rng.choice(WORDS)}-{rng.randint(1000, 9999)}"


def needle_prompt(tokenizer, context_tokens: int, depth: float, value: str) -> torch.Tensor:
    """Chat-formatted prompt of about `context_tokens` tokens with the needle at `depth` (0..1) of the text."""
    return haystack_prompt(tokenizer, context_tokens, [(depth, NEEDLE.format(value=value))], QUESTION)


def multikey_prompt(tokenizer, length: int, depth: float, rng: random.Random, keys: int = 4):
    """`keys` passphrases of distinct projects; the asked one at `depth`, the others at random depths.
    Returns (ids, asked value, distractor values)."""
    names = rng.sample(PROJECTS, keys)
    values = [passphrase(rng) for _ in names]
    depths = [depth] + [rng.random() for _ in names[1:]]
    inserts = [(d, MULTIKEY_NEEDLE.format(key=k, value=v)) for d, k, v in zip(depths, names, values)]
    ids = haystack_prompt(tokenizer, length, inserts, MULTIKEY_QUESTION.format(key=names[0]))
    return ids, values[0], values[1:]


# How well a method's guess of the next step held, from its stats: SpeCache's speculative top-k against the real
# token's, FreeKV's share of (layer, KV head, step) checks whose query drifted and forced a synchronous recall.
SPECULATION_RATES = ("prefetch_hit_rate", "correction_rate")


def _rate(rows: list[dict]) -> dict:
    out = {"success_rate": sum(r["success"] for r in rows) / len(rows),
           "agreement_with_full": sum(r["same_as_full"] for r in rows) / len(rows), "prompts": len(rows)}
    for name in SPECULATION_RATES:
        values = [r[name] for r in rows if r.get(name) is not None]
        if values:
            out[name] = sum(values) / len(values)
    return out


def check_grid(lengths, depths, kinds, keys: int = 4) -> tuple[list[int], list[float], list[str]]:
    """The grid's axes checked before any work: (lengths in tokens, depths, kinds); ValueError naming a bad one."""
    lengths = check_lengths(lengths)
    depths = [depths] if isinstance(depths, (int, float, str)) else list(depths)
    if not depths:
        raise ValueError("depths is empty; give at least one depth in [0, 1], such as 0.5")
    try:
        depths = [float(d) for d in depths]
    except (TypeError, ValueError):
        raise ValueError(f"depths must be numbers in [0, 1], got {depths}") from None
    if bad := [d for d in depths if not 0.0 <= d <= 1.0]:
        raise ValueError(f"depths must be in [0, 1] (0 = start of the text, 1 = end), got {bad}")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    if not kinds:
        raise ValueError(f"kinds is empty; give {' or '.join(KINDS)}")
    if unknown := set(kinds) - set(KINDS):
        raise ValueError(f"unknown needle kinds {sorted(unknown)}; valid: {', '.join(KINDS)}")
    if "multikey" in kinds and (isinstance(keys, bool) or not isinstance(keys, int) or not 1 <= keys <= len(PROJECTS)):
        raise ValueError(f"keys (passphrases per multikey prompt) must be 1..{len(PROJECTS)}, got {keys!r}")
    return lengths, depths, kinds


@torch.inference_mode()
def needle_grid(model, tokenizer, methods, lengths=("1k", "2k"), depths=(0.0, 0.25, 0.5, 0.75, 1.0),
                seed: int = 0, max_new_tokens: int = 24, kinds=("single",), keys: int = 4, out_dir=None,
                progress: bool = True) -> dict:
    """Every method on every (kind, length, depth) prompt; success = the asked passphrase appears in the answer.

    Returns JSON-ready results: one row per prompt and method (kind, answer, success, same tokens as full) and
    a per-method summary (success rate, agreement with full; overall and per kind). A fractional budget
    ("freekv:budget=0.25") is that share of each length. Writes needle.json and heatmaps if out_dir.
    """
    lengths, depths, kinds = check_grid(lengths, depths, kinds, keys)
    runner = BesideFull(model, methods, lengths, out_dir)
    rows = []
    cells = [(kind, n, d) for kind in kinds for n in lengths for d in depths]
    # one generator per kind, so a kind's prompts do not depend on which other kinds run
    rngs = {kind: random.Random(seed if kind == "single" else f"{kind}:{seed}") for kind in kinds}
    prompts = []  # all built before the first method runs: a length too short for its prompt fails before any work
    for kind, length, depth in cells:
        if kind == "single":
            value, distractors = passphrase(rngs[kind]), []
            prompts.append((needle_prompt(tokenizer, length, depth, value), value, distractors))
        else:
            prompts.append(multikey_prompt(tokenizer, length, depth, rngs[kind], keys))
    for (kind, length, depth), (ids, value, distractors) in tqdm(list(zip(cells, prompts)), desc="needle grid",
                                                                 disable=not progress):
        ids = ids.to(runner.device)

        def ask(spec):
            cache = runner.cache(spec, length)
            out = generate(model, ids, cache=cache, max_new_tokens=max_new_tokens)
            return out[0, ids.shape[1]:], cache.stats()

        def row(spec, output, reference):
            new, stats = output
            answer = tokenizer.decode(new, skip_special_tokens=True)
            return {"kind": kind, "length": length, "prompt_tokens": int(ids.shape[1]), "depth": depth,
                    "needle": value, "answer": answer.strip(), "success": value in answer,
                    "answered_distractor": any(v in answer for v in distractors),
                    "same_as_full": bool(torch.equal(new, reference[0])),
                    "device_kv_bytes": stats["device_kv_bytes"], "h2d_bytes": stats["h2d_bytes"],
                    **{k: stats[k] for k in SPECULATION_RATES if stats.get(k) is not None}}

        rows += runner.rows(ask, row)
    summary = {label: {**_rate(mine), "kinds": {k: _rate([r for r in mine if r["kind"] == k]) for k in kinds}}
               for label, mine in runner.by_method(rows).items()}
    result = {"eval": "needle", "kinds": kinds, "keys": keys, "lengths": lengths, "depths": depths, "seed": seed,
              "summary": summary, "rows": rows}
    if out_dir is not None:
        result["json"] = str(write_json(result, out_dir, "needle.json"))
        result["plots"] = _heatmaps(result, out_dir)
    return result


def _heatmap(ax, result: dict, label: str, kind: str) -> None:
    lengths, depths = result["lengths"], result["depths"]
    grid = [[next(r["success"] for r in result["rows"] if r["method"] == label and r["kind"] == kind
                  and r["length"] == n and r["depth"] == d) for n in lengths] for d in depths]
    ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    ax.set_xlabel("context tokens")
    ax.set_ylabel("needle depth")
    rate = result["summary"][label]["kinds"][kind]["success_rate"]
    ax.set_title(f"{label}\n{kind}: {rate:.0%} found", fontsize=8)


def _heatmaps(result: dict, out_dir) -> list[str]:
    """needle.png: every method (columns) x kind (rows); needle_<method>.png: one method's kinds."""
    plt = plotting()
    if plt is None:
        return []
    kinds, labels = result["kinds"], list(result["summary"])
    figures = {"needle.png": labels}
    figures.update({f"needle_{safe_name(label)}.png": [label] for label in labels})
    paths = []
    for name, shown in figures.items():
        fig, axes = plt.subplots(len(kinds), len(shown), figsize=(3.2 * len(shown), 3.2 * len(kinds)),
                                 squeeze=False)
        for row, kind in zip(axes, kinds):
            for ax, label in zip(row, shown):
                _heatmap(ax, result, label, kind)
        fig.tight_layout()
        path = Path(out_dir) / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths

