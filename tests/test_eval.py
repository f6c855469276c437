"""The evaluation harness must itself be trustworthy: it scores a known-good and a known-bad method correctly."""

from __future__ import annotations

import json

import pytest

from kvtier.eval import MethodSpec, needle_grid, parse_methods, perplexity
from kvtier.eval.common import parse_length, with_full


def test_parse_methods_with_options():
    specs = parse_methods("full,freekv:budget=512:page_size=8,offload")
    assert [s.method for s in specs] == ["full", "freekv", "offload"]
    assert specs[1].options == {"budget": 512, "page_size": 8}
    assert specs[1].label == "freekv:budget=512,page_size=8"
    assert with_full([MethodSpec("freekv")])[0] == MethodSpec("full")
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods("nope")
    with pytest.raises(ValueError, match="key=value"):
        parse_methods("freekv:512")
    assert parse_length("2k") == 2048 and parse_length("1500") == 1500
    with pytest.raises(ValueError):
        parse_length("0")


@pytest.mark.embedded
def test_needle_harness_scores_good_and_bad_methods(embedded, tmp_path):
    model, tokenizer = embedded
    # A FreeKV cache that keeps only the first and last 32 tokens (one recalled page) cannot hold a needle
    # buried in the middle; full can.
    bad = "freekv:budget=96:page_size=32:sink=32:window=32:dense_layers=0"
    # seed 1 at 1k tokens, depth 0.5: a placement the 135M model answers with the full cache (it misses some
    # placements even then, which is why every figure is set against full)
    result = needle_grid(model, tokenizer, f"full,{bad}", lengths=["1k"], depths=[0.5], seed=1,
                         max_new_tokens=20, out_dir=tmp_path, progress=False)
    assert result["summary"]["full"]["success_rate"] == 1.0
    bad_label = parse_methods(bad)[0].label
    assert result["summary"][bad_label]["success_rate"] == 0.0
    assert result["summary"][bad_label]["agreement_with_full"] == 0.0
    saved = json.loads((tmp_path / "needle.json").read_text())
    assert len(saved["rows"]) == 2 and all(r["answer"] for r in saved["rows"])
    assert (tmp_path / "needle.png").stat().st_size > 0


@pytest.mark.embedded
def test_perplexity_harness_gives_zero_delta_for_exact_methods(embedded):
    model, tokenizer = embedded
    result = perplexity(model, tokenizer, "full,offload,freekv:budget=96:sink=32:window=32:dense_layers=0",
                        texts=["prose"], context=512, targets=32, progress=False)
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["offload"]["ppl_delta_vs_full"] == pytest.approx(0.0, abs=1e-3)
    lossy = rows["freekv:budget=96,dense_layers=0,sink=32,window=32"]
    assert lossy["ppl_delta_vs_full"] > 0.05, "dropping most of the context must cost perplexity"
    assert rows["full"]["decode_steps"] == 31
