"""RULER-style generators, scorers, multi-key prompts and the report, without a model (a character tokenizer)."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from kvtier.evaluation.needle import multikey_prompt
from kvtier.evaluation.report import report
from kvtier.evaluation.ruler import common_words, recall, ruler, variable_tracking


class CharTokenizer:
    """One token per character: exact decode, no chat template (prompts are plain text)."""

    chat_template = None

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = [ord(c) for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(int(i)) for i in ids)


def text_of(ids) -> str:
    return CharTokenizer().decode(ids[0])


def test_variable_tracking_is_seeded_sized_and_in_order():
    tok = CharTokenizer()
    a, b = variable_tracking(tok, 3000, random.Random(5)), variable_tracking(tok, 3000, random.Random(5))
    assert torch.equal(a["ids"], b["ids"]) and a["expected"] == b["expected"]
    assert not torch.equal(a["ids"], variable_tracking(tok, 3000, random.Random(6))["ids"])
    assert 2700 < a["ids"].shape[1] <= 3000
    text = text_of(a["ids"])
    first, *rest = a["expected"]
    assert len(a["expected"]) == 3 and len(set(a["expected"])) == 3
    lines = [f"VAR {first} = {a['value']}."] + [f"VAR {y} = VAR {x}." for x, y in zip(a["expected"], rest)]
    positions = [text.index(line) for line in lines]
    assert positions == sorted(positions), "a chain reads in order"
    assert text.rstrip().endswith(f"assigned the value {a['value']}, they are: VAR")
    more = variable_tracking(tok, 3000, random.Random(5), hops=3, chains=2)
    assert len(more["expected"]) == 4
    assert len(re.findall(r"^VAR [A-Z]{5} = ", text_of(more["ids"]), re.MULTILINE)) == 8, "2 chains of 4"


def test_common_words_counts_and_size():
    tok = CharTokenizer()
    a = common_words(tok, 4000, random.Random(1), common=3, share=0.3)
    assert torch.equal(a["ids"], common_words(tok, 4000, random.Random(1), common=3, share=0.3)["ids"])
    assert 3800 < a["ids"].shape[1] <= 4000
    words = re.findall(r"^\d+\. (\w+)$", text_of(a["ids"]), re.MULTILINE)
    counts = {w: words.count(w) for w in set(words)}
    top = sorted(counts, key=counts.get, reverse=True)[:3]
    assert sorted(top) == sorted(a["expected"])
    assert len({counts[w] for w in a["expected"]}) == 1 and counts[a["expected"][0]] > 2
    assert all(n == 1 for w, n in counts.items() if w not in a["expected"])
    with pytest.raises(ValueError, match="too short"):
        common_words(tok, 50, random.Random(1))


def test_recall_scores_hand_made_answers():
    names = ["XZKUG", "PMLPS", "IHPMX"]
    assert recall("PMLPS = VAR XZKUG.", names) == pytest.approx(2 / 3)
    assert recall("xzkug, pmlps and IHPMX", names) == 1.0
    assert recall("XZKUGA PMLP", names) == 0.0, "whole words only"
    assert recall("1. soft\n2. trace\n3. introduced", ["introduced", "soft", "subtle"]) == pytest.approx(2 / 3)


def test_ruler_refuses_unknown_tasks_and_options():
    with pytest.raises(ValueError, match="unknown ruler tasks"):
        ruler(None, None, "full", tasks=["qa"])
    with pytest.raises(ValueError, match="valid: vt_hops, vt_chains"):
        ruler(None, None, "full", tasks=["vt"], vt_depth=3)


def test_multikey_prompt_holds_every_key_and_asks_one():
    tok = CharTokenizer()
    ids, value, distractors = multikey_prompt(tok, 3000, 0.5, random.Random(2), keys=4)
    again = multikey_prompt(tok, 3000, 0.5, random.Random(2), keys=4)
    assert torch.equal(ids, again[0]) and value == again[1]
    text = text_of(ids)
    assert len(distractors) == 3 and value not in distractors
    assert all(text.count(v) == 1 for v in [value, *distractors])
    asked = re.search(r"passphrase of the (\w+) project\? ", text).group(1)
    assert f"The secret passphrase of the {asked} project is {value}." in text
    needle_at = text.index(value) / len(text)
    assert 0.4 < needle_at < 0.6, "the asked needle sits at the requested depth"


def _write(path, data):
    path.write_text(json.dumps(data))


def test_report_writes_tables_with_full_beside_each_number(tmp_path):
    lossy = "freekv:budget=0.25"
    needle_rows = [{"method": m, "kind": k, "length": 1024, "depth": 0.5, "success": ok, "same_as_full": m == "full"}
                   for k in ("single", "multikey") for m, ok in (("full", True), (lossy, False))]
    rate = {"success_rate": 1.0, "agreement_with_full": 1.0, "prompts": 1}
    bad = {"success_rate": 0.0, "agreement_with_full": 0.0, "prompts": 1}
    _write(tmp_path / "needle.json", {
        "eval": "needle", "kinds": ["single", "multikey"], "keys": 4, "lengths": [1024], "depths": [0.5], "seed": 0,
        "rows": needle_rows, "summary": {"full": {**rate, "kinds": {"single": rate, "multikey": rate}},
                                         lossy: {**bad, "kinds": {"single": bad, "multikey": bad}}}})
    _write(tmp_path / "ruler.json", {
        "eval": "ruler", "tasks": ["vt", "cwe"], "lengths": [1024], "samples": 1, "seed": 0, "task_options": {},
        "summary": {"full": {"vt": {"score": 0.67, "agreement_with_full": 1.0}, "cwe": {"score": 0.33,
                                                                                       "agreement_with_full": 1.0}},
                    lossy: {"vt": {"score": 0.0, "agreement_with_full": 0.0}, "cwe": {"score": 0.0,
                                                                                      "agreement_with_full": 0.0}}}})
    by_text = {"prose": {"top1_agreement": 0.5, "kl_mean": 1.3}}
    _write(tmp_path / "fidelity.json", {
        "eval": "fidelity", "texts": ["prose"], "lengths": [1024], "prompts": 1, "new_tokens": 16, "seed": 0,
        "summary": {"full": {"top1_agreement": 1.0, "kl_mean": 0.0, "kl_max": 0.0,
                             "by_text": {"prose": {"top1_agreement": 1.0, "kl_mean": 0.0}}},
                    lossy: {"top1_agreement": 0.5, "kl_mean": 1.3, "kl_max": 5.6, "by_text": by_text}}})
    _write(tmp_path / "ppl.json", {"eval": "ppl", "context": 1024, "targets": 256, "texts": ["prose"], "rows": [
        {"method": "full", "text": "prose", "context": 1024, "ppl": 9.0, "ppl_delta_vs_full": 0.0},
        {"method": lossy, "text": "prose", "context": 1024, "ppl": 9.7, "ppl_delta_vs_full": 0.7}]})
    result = report(tmp_path, command="bash scripts/report.sh")
    readme = (tmp_path / "README.md").read_text()
    assert "bash scripts/report.sh" in readme.split("## ")[0], "the command is written at the top"
    for line in ("| freekv:budget=0.25 | 0% (full 100%) | 0% |", "0% (full 67%), 0% identical",
                 "| freekv:budget=0.25 | prose | 1024 | 256 | 9.700 | 9.000 | +0.7000 |"):
        assert line in readme
    assert set(result["panels"]) == {"needle found", "RULER score", "top-1 agreement with full",
                                     "perplexity - full's"}
    if result["plot"]:  # matplotlib (the plot extra) installed
        assert (tmp_path / "summary.png").stat().st_size > 0
    with pytest.raises(ValueError, match="no evaluation JSON"):
        report(tmp_path / "empty")
