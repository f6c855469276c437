"""Measure prefix reuse on the embedded model, in one run, and write JSON + a short markdown summary.

1. `kvtier chat --document F --question a --question b --question c` against three `kvtier generate` runs of the
   same document + question, each command timed end to end (model load included) in its own process.
2. A cache of a 4,096-token prompt: one process prefills it and saves it; a new process loads it. Both answer the
   same continuation, which must agree token for token.

    python scripts/chat_bench.py --out docs/results/chat [--method offload] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pydoc_data.topics

QUESTIONS = ("What does the else clause of a for loop do?", "What does the pass statement do?",
             "When does a finally clause run?")
TOPICS = ("for", "while", "if", "try", "pass", "break", "continue", "return", "assert", "del", "import", "with")


def document(chars: int) -> str:
    """Python's documentation of its statements, whole topics, up to about `chars` characters."""
    text = ""
    for name in TOPICS + tuple(sorted(set(pydoc_data.topics.topics) - set(TOPICS))):
        topic = pydoc_data.topics.topics[name].strip()
        if len(text) + len(topic) <= chars:
            text += topic + "\n\n"
    return text.strip()


def run(argv: list[str]) -> tuple[float, str]:
    """Run a command; (wall seconds, stdout). Fails loudly with its stderr."""
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def chat_against_generate(work: Path, method: str, new: int) -> dict:
    kvtier = [sys.executable, "-m", "kvtier.cli"]
    doc = document(8000)
    (work / "doc.txt").write_text(doc)
    argv = kvtier + ["chat", "--document", str(work / "doc.txt"), "--method", method, "--max-new-tokens", str(new),
                     "--json"]
    for q in QUESTIONS:
        argv += ["--question", q]
    chat_s, out = run(argv)
    chat = json.loads(out)
    runs = []
    for i, q in enumerate(QUESTIONS):
        prompt = work / f"prompt{i}.txt"
        prompt.write_text(doc + "\n\n" + q)  # the same text as chat's one user message
        seconds, out = run(kvtier + ["generate", "--prompt-file", str(prompt), "--method", method,
                                     "--max-new-tokens", str(new), "--json"])
        result = json.loads(out)
        same = result["answer"] == chat["answers"][i]["answer"]
        runs.append({"question": q, "seconds": seconds, "prompt_tokens": result["prompt_tokens"],
                     "answer": result["answer"], "same_answer_as_chat": same})
    generate_s = sum(r["seconds"] for r in runs)
    return {"command": " ".join(argv[2:]), "method": method, "max_new_tokens": new,
            "document_tokens": chat["document_tokens"], "document_prefills": chat["document_prefills"],
            "chat_seconds": chat_s, "chat_prefill_seconds": chat["prefill_seconds"],
            "chat_answer_seconds": [a["seconds"] for a in chat["answers"]], "chat_answers": chat["answers"],
            "generate_runs": runs, "generate_seconds": generate_s, "speedup": generate_s / chat_s}


def prefill_and_save(path: str, method: str, tokens: int, new: int) -> dict:
    """In its own process: prefill `tokens` tokens, save the cache, answer the continuation from a fork."""
    import torch

    import kvtier
    from kvtier.generate import prefill

    model, tokenizer = kvtier.load(device="cpu", dtype="float32")
    ids = tokenizer(document(10 ** 6), return_tensors="pt")["input_ids"][:, :tokens]
    cache = kvtier.KVCache(model, method=method, max_length=tokens + 64)
    start = time.perf_counter()
    with torch.inference_mode():
        prefill(model, cache, ids)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    cache.save(path)
    save_s = time.perf_counter() - start
    question = tokenizer("\n\nQuestion: what is this text about? Answer:", add_special_tokens=False,
                         return_tensors="pt")["input_ids"]
    start = time.perf_counter()
    out = kvtier.generate(model, torch.cat((ids, question), 1), cache=cache.fork(), max_new_tokens=new)
    return {"tokens": tokens, "prefill_seconds": prefill_s, "save_seconds": save_s,
            "answer_after_prefill_seconds": time.perf_counter() - start,
            "file_bytes": Path(path).stat().st_size, "answer_ids": out[0, -new:].tolist()}


def load_and_answer(path: str, new: int) -> dict:
    """In a new process: load the saved cache and answer the same continuation."""
    import torch

    import kvtier

    model, tokenizer = kvtier.load(device="cpu", dtype="float32")
    start = time.perf_counter()
    cache = kvtier.KVCache.load(path, model)
    load_s = time.perf_counter() - start
    question = tokenizer("\n\nQuestion: what is this text about? Answer:", add_special_tokens=False,
                         return_tensors="pt")["input_ids"]
    start = time.perf_counter()
    out = kvtier.generate(model, torch.cat((cache.token_ids, question), 1), cache=cache, max_new_tokens=new)
    return {"load_seconds": load_s, "answer_after_load_seconds": time.perf_counter() - start,
            "answer_ids": out[0, -new:].tolist()}


def save_against_prefill(work: Path, method: str, new: int) -> dict:
    path = str(work / "4k.kvc")
    me = [sys.executable, __file__]
    _, out = run(me + ["--part", "save", "--cache", path, "--method", method, "--max-new-tokens", str(new)])
    saved = json.loads(out)
    _, out = run(me + ["--part", "load", "--cache", path, "--max-new-tokens", str(new)])
    loaded = json.loads(out)
    return {"method": method, **saved, "load_seconds": loaded["load_seconds"],
            "answer_after_load_seconds": loaded["answer_after_load_seconds"],
            "save_plus_load_seconds": saved["save_seconds"] + loaded["load_seconds"],
            "same_answer_after_load": saved["answer_ids"] == loaded["answer_ids"]}


def markdown(result: dict) -> str:
    c, s = result["chat"], result["save_load"]
    lines = [
        "# Prefix reuse on the embedded model (CPU)", "",
        f"`{result['command']}` ({result['date']}, {result['machine']}; CPU times, one run).", "",
        f"## `kvtier chat` against three `kvtier generate` runs ({c['method']}, {c['max_new_tokens']} new tokens)", "",
        f"Document: {c['document_tokens']:,} tokens; document prefills in the chat run: {c['document_prefills']}.",
        "", "| command | wall s (model load included) |", "| --- | --- |",
        f"| `kvtier chat` with 3 questions | {c['chat_seconds']:.1f} |",
    ]
    for r in c["generate_runs"]:
        lines.append(f"| `kvtier generate` ({r['prompt_tokens']:,} tokens): {r['question']!r} | {r['seconds']:.1f} |")
    lines += [f"| the three `kvtier generate` runs | {c['generate_seconds']:.1f} |", "",
              f"Chat is {c['speedup']:.2f}x faster. Its prefill took {c['chat_prefill_seconds']:.1f} s; its answers "
              f"{', '.join(f'{x:.1f}' for x in c['chat_answer_seconds'])} s; the other "
              f"{c['chat_seconds'] - c['chat_prefill_seconds'] - sum(c['chat_answer_seconds']):.1f} s are the "
              "model load (GGUF dequantization) and start-up, which every command pays. Same answer text as "
              "`generate`: "
              f"{sum(r['same_answer_as_chat'] for r in c['generate_runs'])} of 3 (the same ids: chat cuts the prompt "
              "where the tokenizer never merges, see `kvtier/chat.py`).", "",
              f"## Save a {s['tokens']:,}-token cache, load it in a new process ({s['method']})", "",
              "| step | s |", "| --- | --- |",
              f"| prefill (what loading replaces) | {s['prefill_seconds']:.2f} |",
              f"| save ({s['file_bytes'] / 2**20:,.1f} MiB file) | {s['save_seconds']:.2f} |",
              f"| load, in a new process | {s['load_seconds']:.2f} |",
              f"| the same {len(s['answer_ids'])}-token answer after the prefill (a fork) / after the load | "
              f"{s['answer_after_prefill_seconds']:.2f} / {s['answer_after_load_seconds']:.2f} |", "",
              f"Save + load: {s['save_plus_load_seconds']:.2f} s against {s['prefill_seconds']:.2f} s of prefill "
              f"({s['prefill_seconds'] / s['save_plus_load_seconds']:.0f}x). The continuation after the load is "
              f"token-identical to the one from the prefilled cache: {s['same_answer_after_load']}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/chat-bench", help="folder for chat_bench.json and README.md")
    parser.add_argument("--method", default="offload")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=4096, help="prompt tokens of the saved cache")
    parser.add_argument("--part", choices=("save", "load"), help=argparse.SUPPRESS)  # the two processes of 2.
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part == "save":
        print(json.dumps(prefill_and_save(args.cache, args.method, args.tokens, args.max_new_tokens)))
        return
    if args.part == "load":
        print(json.dumps(load_and_answer(args.cache, args.max_new_tokens)))
        return
    import platform
    import tempfile

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"command": "python scripts/chat_bench.py " + " ".join(sys.argv[1:]),
                  "date": time.strftime("%Y-%m-%d", time.gmtime()),
                  "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}",
                  "chat": chat_against_generate(Path(tmp), args.method, args.max_new_tokens),
                  "save_load": save_against_prefill(Path(tmp), args.method, args.max_new_tokens)}
    (out / "chat_bench.json").write_text(json.dumps(result, indent=2))
    (out / "README.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
