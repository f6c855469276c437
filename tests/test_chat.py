"""A 2,000-token document read once and asked three questions, on the embedded SmolLM2-135M (float32, CPU).

Exact methods: the answer from a fork of the prefilled document, or from its cache saved and loaded, is token
for token the answer of a fresh prefill of document + question (the same ids). Approximate methods: the answer
after the round trip through a file is the one the same cache gives without it. And `kvtier chat` end to end.
"""

from __future__ import annotations

import io
import json
import sys

import pydoc_data.topics
import pytest
import torch

import kvtier
from kvtier.chat import DocumentChat, document_ids, question_ids
from kvtier.cli import main

pytestmark = pytest.mark.embedded

NEW = 10
QUESTIONS = ("What does the else clause of a for loop do?", "What does the pass statement do?",
             "When does a finally clause run?")


def build_document(tokenizer, target: int) -> str:
    """Python's documentation of its statements, whole topics, up to `target` tokens."""
    text = ""
    first = ("for", "while", "if", "try", "pass", "break", "continue", "return", "assert", "del")
    for name in first + tuple(sorted(set(pydoc_data.topics.topics) - set(first))):
        candidate = text + pydoc_data.topics.topics[name].strip() + "\n\n"
        n = len(tokenizer(candidate).input_ids)
        if n > target:
            continue  # too long; a later, shorter topic may fit
        text = candidate
        if n > target - 100:
            break
    return text.strip()


@pytest.fixture(scope="module")
def document(embedded):
    model, tokenizer = embedded
    text = build_document(tokenizer, 1950)
    assert 1500 <= document_ids(tokenizer, text).shape[1] <= 2048
    return text


def test_the_prompt_in_two_parts_is_the_prompt_at_once(embedded, document):
    """Document ids, then question ids: the ids `kvtier generate` makes of "document\n\nquestion" in one go."""
    _, tokenizer = embedded
    for question in QUESTIONS + ("x", "  Why?  "):
        whole = tokenizer.apply_chat_template([{"role": "user", "content": document + "\n\n" + question.strip()}],
                                              add_generation_prompt=True, return_tensors="pt",
                                              return_dict=True)["input_ids"]
        parts = torch.cat((document_ids(tokenizer, document + "\n"), question_ids(tokenizer, question)), 1)
        assert torch.equal(parts, whole), question


def _fresh(model, ids, method="full"):
    return kvtier.generate(model, ids, method=method, max_new_tokens=NEW)


def test_exact_answers_from_a_fork_or_a_file_are_a_fresh_prefills(embedded, document, tmp_path):
    model, tokenizer = embedded
    doc = document_ids(tokenizer, document)
    fresh = [_fresh(model, torch.cat((doc, question_ids(tokenizer, q)), 1)) for q in QUESTIONS]
    for method in ("full", "offload"):
        chat = DocumentChat.prefill(model, tokenizer, document, method=method, max_new_tokens=NEW)
        path = chat.save(tmp_path / f"{method}.kvc")
        loaded = DocumentChat.load(path, model, tokenizer, method=method, document=document)
        for question, expected in zip(QUESTIONS, fresh):
            answer = chat.ask(question, max_new_tokens=NEW)
            assert answer.reused_tokens == doc.shape[1]
            assert torch.equal(answer.ids, expected[0, doc.shape[1] + answer.question_tokens:]), (method, question)
            assert torch.equal(loaded.ask(question, max_new_tokens=NEW).ids, answer.ids), (method, question)


@pytest.mark.parametrize("method, options", [("freekv", {"budget": 512}), ("specache", {})])
def test_approximate_answers_survive_the_round_trip(embedded, document, tmp_path, method, options):
    model, tokenizer = embedded
    chat = DocumentChat.prefill(model, tokenizer, document, method=method, max_new_tokens=NEW, **options)
    loaded = DocumentChat.load(chat.save(tmp_path / "doc.kvc"), model, tokenizer)
    ids = torch.cat((chat.ids, question_ids(tokenizer, QUESTIONS[0])), 1)
    own = kvtier.generate(model, ids, cache=chat.cache, max_new_tokens=NEW)  # no fork, no file
    assert torch.equal(loaded.ask(QUESTIONS[0], max_new_tokens=NEW).ids, own[0, ids.shape[1]:])


def test_chat_command_prefills_once(embedded, document, tmp_path, monkeypatch, capsys):
    model, tokenizer = embedded
    monkeypatch.setattr(kvtier, "load", lambda *args, **kwargs: (model, tokenizer))
    short = document[:1500]
    (tmp_path / "doc.txt").write_text(short)
    argv = ["chat", "--document", str(tmp_path / "doc.txt"), "--question", QUESTIONS[0], "--question",
            QUESTIONS[1], "--max-new-tokens", "8", "--method", "offload"]
    assert main(argv + ["--json", "--save-cache", str(tmp_path / "doc.kvc")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["document_prefills"] == 1 and len(result["answers"]) == 2
    assert all(a["reused_tokens"] == result["document_tokens"] for a in result["answers"])
    # streamed: each answer, then its stats line on stderr; from the saved cache, no prefill at all
    assert main(["chat", "--load-cache", str(tmp_path / "doc.kvc"), "--question", QUESTIONS[0],
                 "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == result["answers"][0]["answer"].strip()
    assert "document prefills: 0" in err and "cached document tokens reused" in err and "device KV" in err
    # without --question, the questions come one per line from standard input, until its end or /exit
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTIONS[0]}\n\n/exit\n{QUESTIONS[1]}\n"))
    assert main(["chat", "--load-cache", str(tmp_path / "doc.kvc"), "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == result["answers"][0]["answer"].strip() and err.count("document prefills: 0") == 1


def test_chat_command_with_method_auto(embedded, document, tmp_path, monkeypatch, capsys):
    """--method auto --device-memory: the cache plans for the document, a question and the answer."""
    model, tokenizer = embedded
    monkeypatch.setattr(kvtier, "load", lambda *args, **kwargs: (model, tokenizer))
    (tmp_path / "doc.txt").write_text(document[:1500])
    assert main(["chat", "--document", str(tmp_path / "doc.txt"), "--question", QUESTIONS[0], "--max-new-tokens",
                 "4", "--method", "auto", "--device-memory", "4MiB", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] != "full" and result["document_prefills"] == 1 and len(result["answers"]) == 1


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_at_the_prompt_a_failing_question_does_not_end_the_chat(embedded, document, tmp_path, monkeypatch, capsys):
    """Interactive chat: a question that fails (or is interrupted) says why and the next one is answered from the
    same prefill; questions piped from a script still stop at the first failure, with its error."""
    model, tokenizer = embedded
    monkeypatch.setattr(kvtier, "load", lambda *args, **kwargs: (model, tokenizer))
    (tmp_path / "doc.txt").write_text(document[:1500])
    real_ask = DocumentChat.ask

    def ask(self, question, **kwargs):
        if question == "break":
            raise ValueError("this question cannot be answered")
        if question == "stop":
            raise KeyboardInterrupt
        return real_ask(self, question, **kwargs)

    monkeypatch.setattr(DocumentChat, "ask", ask)
    argv = ["chat", "--document", str(tmp_path / "doc.txt"), "--max-new-tokens", "4", "--method", "offload"]
    monkeypatch.setattr(sys, "stdin", _Terminal(f"break\nstop\n{QUESTIONS[0]}\n"))
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "error: this question cannot be answered; ask again" in err and "interrupted; ask again" in err
    assert "1 answer(s) from 1 prefill(s)" in err
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"break\n{QUESTIONS[0]}\n"))
    assert main(argv) == 2
    assert "kvtier chat: error: this question cannot be answered" in capsys.readouterr().err
