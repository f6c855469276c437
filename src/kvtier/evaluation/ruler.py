"""RULER-style synthetic tasks beyond needles, generated locally from a seed.

- `vt`, variable tracking: chains "VAR QKRTA = 48213." "VAR MZPLE = VAR QKRTA." ... scattered at increasing
  depths of real prose; the question asks every variable that holds the value; score = share of the chain's
  names in the answer.
- `cwe`, common-word extraction: a numbered list of words where `common` words appear many times and the rest
  once; the question asks the `common` most frequent; score = share of them in the answer.

Answers are greedy `kvtier.generate` outputs primed with RULER's answer prefix; every method answers the same
prompts, scored alike and compared with full token for token.
"""

from __future__ import annotations

import functools
import inspect
import random
import re
import string

import torch
from tqdm.auto import tqdm

from ..generate import generate
from .common import bar_chart, chat_ids, check_lengths, haystack_prompt, prose_text, write_json
from .runner import BesideFull

TASKS = ("vt", "cwe")


def recall(answer: str, expected) -> float:
    """Share of the `expected` strings that occur in `answer` as whole words (case-insensitive)."""
    found = [re.search(rf"\b{re.escape(e)}\b", answer, re.IGNORECASE) is not None for e in expected]
    return sum(found) / len(found)


def variable_tracking(tokenizer, length: int, rng: random.Random, hops: int = 2, chains: int = 1) -> dict:
    """A prompt of about `length` tokens; chain 0 (value then `hops` assignments) is the one asked, the other
    chains are distractors. Returns {"ids", "expected" (chain 0's names), "value"}."""
    names: list[str] = []
    while len(names) < chains * (hops + 1):
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    values = rng.sample(range(10000, 100000), chains)
    inserts = []
    for c in range(chains):
        chain = names[c * (hops + 1):(c + 1) * (hops + 1)]
        lines = [f"VAR {chain[0]} = {values[c]}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        inserts += zip(sorted(rng.random() for _ in lines), lines)
    question = (f"Memorize and track the chain of variable assignments hidden in the text above. "
                f"Question: Find all variables that are assigned the value {values[0]} in the text above.")
    prefix = (f"Answer: According to the chain of variable assignments in the text above, {hops + 1} variables "
              f"are assigned the value {values[0]}, they are: VAR")
    ids = haystack_prompt(tokenizer, length, inserts, question, answer_prefix=prefix)
    return {"ids": ids, "expected": names[:hops + 1], "value": values[0]}


@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """Distinct lowercase words of 4-10 letters from Python's help topics, sorted (so a seed fixes a sample)."""
    return tuple(sorted(set(re.findall(r"\b[a-z]{4,10}\b", prose_text()))))


def common_words(tokenizer, length: int, rng: random.Random, common: int = 3, share: float = 0.3) -> dict:
    """A numbered word list filling about `length` tokens: `common` words take `share` of the items (each as
    often as the others), every other word appears once. Returns {"ids", "expected" (the common words)}."""
    words = rng.sample(vocabulary(), len(vocabulary()))
    top, rare = words[:common], words[common:]
    order_seed = rng.random()
    question = (f"Question: What are the {common} most common words in the list above? "
                f"Name the {common} words that appear most often.")
    prefix = f"Answer: The top {common} words that appear most often in the list are:"

    def build(items: int) -> torch.Tensor:
        repeats = max(2, round(items * share / common))
        chosen = top * repeats + rare[:max(0, items - common * repeats)]
        random.Random(order_seed).shuffle(chosen)
        listing = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(chosen))
        return chat_ids(tokenizer, f"Below is a numbered list of words. Some of them appear more often than others."
                                   f"\n{listing}\n\n{question}", prefix)

    lo, hi = common * 2, length  # largest list that fits: every item takes at least one token
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if build(mid).shape[1] <= length else (lo, mid - 1)
    if build(lo).shape[1] > length:
        raise ValueError(f"length={length} is too short for the common-word task")
    return {"ids": build(lo), "expected": top}


GENERATORS = {"vt": variable_tracking, "cwe": common_words}


def _defaults(generator) -> dict:
    """A generator's task options (its keyword arguments after tokenizer, length, rng) and their defaults."""
    params = list(inspect.signature(generator).parameters.values())[3:]
    return {p.name: p.default for p in params}


def _count(minimum: int):
    def check(value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            return f"an integer >= {minimum}"
        return None

    return check


def _share(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        return "a number between 0 and 1 (exclusive)"
    return None


# What each task option must be (a description of the valid values, or None when the value is fine).
OPTION_CHECKS = {"vt": {"hops": _count(1), "chains": _count(1)}, "cwe": {"common": _count(1), "share": _share}}


def check_ruler(tasks, lengths, samples: int, task_options: dict) -> tuple[list[str], list[int], dict]:
    """The run's arguments checked before any work: (tasks, lengths in tokens, {task: generator options}).
    ValueError naming a bad task, length, sample count, task option or option value."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError(f"tasks is empty; give {' and/or '.join(TASKS)}")
    if unknown := set(tasks) - set(TASKS):
        raise ValueError(f"unknown ruler tasks {sorted(unknown)}; valid: {', '.join(TASKS)}")
    lengths = check_lengths(lengths)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples (prompts per task and length) must be >= 1, got {samples!r}")
    options = {t: _defaults(GENERATORS[t]) for t in tasks}
    for key, value in task_options.items():
        task, _, name = key.partition("_")
        if name not in options.get(task, {}):
            valid = [f"{t}_{k}" for t in tasks for k in options[t]]
            raise ValueError(f"unknown task option {key!r}; valid: {', '.join(valid)}")
        if (want := OPTION_CHECKS[task][name](value)) is not None:
            raise ValueError(f"task option {key}={value!r}: must be {want}")
        options[task][name] = value
    return tasks, lengths, options


@torch.inference_mode()
def ruler(model, tokenizer, methods, tasks=TASKS, lengths=("1k",), samples: int = 2, seed: int = 0,
          max_new_tokens: int = 32, out_dir=None, progress: bool = True, **task_options) -> dict:
    """Every method on `samples` prompts per (task, length); score = recall of the expected answers.

    `task_options` go to the generators by name prefix: vt_hops=2, vt_chains=1, cwe_common=3, cwe_share=0.3.
    Returns JSON-ready results: a row per prompt and method (answer, score, same tokens as full) and a summary
    per method and task (mean score, agreement with full). Writes ruler.json and ruler.png if out_dir.
    """
    tasks, lengths, options = check_ruler(tasks, lengths, samples, task_options)
    runner = BesideFull(model, methods, lengths, out_dir)
    rows = []
    cells = [(t, n, i) for t in tasks for n in lengths for i in range(samples)]
    # all built before the first method runs: a length too short for its task fails before any work
    prompts = [GENERATORS[task](tokenizer, length, random.Random(f"{task}:{seed}:{length}:{sample}"), **options[task])
               for task, length, sample in cells]
    for (task, length, sample), prompt in tqdm(list(zip(cells, prompts)), desc="ruler", disable=not progress):
        ids = prompt["ids"].to(runner.device)

        def ask(spec):
            out = generate(model, ids, cache=runner.cache(spec, length), max_new_tokens=max_new_tokens)
            return out[0, ids.shape[1]:]

        def row(spec, new, reference):
            answer = tokenizer.decode(new, skip_special_tokens=True).strip()
            return {"task": task, "length": length, "sample": sample, "prompt_tokens": int(ids.shape[1]),
                    "expected": prompt["expected"], "answer": answer, "score": recall(answer, prompt["expected"]),
                    "same_as_full": bool(torch.equal(new, reference))}

        rows += runner.rows(ask, row)
    summary = {}
    for label, mine in runner.by_method(rows).items():
        summary[label] = {}
        for task in tasks:
            of_task = [r for r in mine if r["task"] == task]
            summary[label][task] = {"score": sum(r["score"] for r in of_task) / len(of_task),
                                    "agreement_with_full": sum(r["same_as_full"] for r in of_task) / len(of_task),
                                    "prompts": len(of_task)}
    result = {"eval": "ruler", "tasks": tasks, "lengths": lengths, "samples": samples, "seed": seed,
              "task_options": options, "summary": summary, "rows": rows}
    if out_dir is not None:
        result["json"] = str(write_json(result, out_dir, "ruler.json"))
        groups = {task: {label: summary[label][task]["score"] for label in summary} for task in tasks}
        result["plot"] = bar_chart(groups, out_dir, "ruler.png", "score (recall)", "RULER-style tasks")
    return result
