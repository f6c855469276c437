"""The evaluation harness must itself be trustworthy: it scores a known-good and a known-bad method correctly."""

from __future__ import annotations

import importlib
import json
import math
import random
from pathlib import Path

import pytest
import torch

from kvtier.cli import main
from kvtier.evaluation import MethodSpec, fidelity, needle_grid, parse_methods, perplexity, report, ruler
from kvtier.evaluation.common import parse_length, with_full
from kvtier.methods import resolve_options
from kvtier.evaluation.ppl import paired_delta, window_starts
from kvtier.evaluation.report import load_results

# A FreeKV cache that keeps only the first and last 32 tokens (one recalled page): it cannot hold what is buried in
# the middle of a long prompt; full can.
BAD = "freekv:budget=96:page_size=32:sink=32:window=32:dense_layers=0"
BAD_LABEL = parse_methods(BAD)[0].label


def test_parse_methods_with_options():
    specs = parse_methods("full,freekv:budget=512:page_size=8,offload")
    assert [s.method for s in specs] == ["full", "freekv", "offload"]
    assert specs[1].options == {"budget": 512, "page_size": 8}
    assert specs[1].label == "freekv:budget=512,page_size=8"
    assert with_full([MethodSpec("freekv")])[0] == MethodSpec("full")
    assert with_full(parse_methods("freekv,full")) == parse_methods("full,freekv"), "full first: the reference"
    # a method given twice ran twice, its rows repeated under one label
    assert with_full(parse_methods("offload,full,offload,freekv:budget=16:page_size=4,freekv:page_size=4:budget=16")) \
        == parse_methods("full,offload,freekv:budget=16:page_size=4")
    # values that need no model are checked as the spec is read; a share of the context, per prompt
    with pytest.raises(ValueError, match="budget 8 must cover sink"):
        parse_methods("freekv:budget=8:page_size=4")
    with pytest.raises(ValueError, match="bits must be one of"):
        parse_methods("full,specache:bits=3")
    assert resolve_options(parse_methods("freekv:budget=0.25")[0].options, 2048) == {"budget": 512}
    assert resolve_options(parse_methods("freekv:budget=300")[0].options, 2048) == {"budget": 300}
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
    # seed 1 at 1k tokens, depth 0.5: a placement the 135M model answers with the full cache (it misses some
    # placements even then, which is why every figure is set against full)
    result = needle_grid(model, tokenizer, f"full,{BAD}", lengths=["1k"], depths=[0.5], seed=1,
                         max_new_tokens=20, out_dir=tmp_path, progress=False)
    assert result["summary"]["full"]["success_rate"] == 1.0
    assert result["summary"][BAD_LABEL]["success_rate"] == 0.0
    assert result["summary"][BAD_LABEL]["agreement_with_full"] == 0.0
    saved = json.loads((tmp_path / "needle.json").read_text())
    assert len(saved["rows"]) == 2 and all(r["answer"] for r in saved["rows"])
    assert (tmp_path / "needle.png").stat().st_size > 0 and (tmp_path / "needle_full.png").is_file()
    bad = next(r for r in saved["rows"] if r["method"] == BAD_LABEL)
    assert 0.0 <= bad["correction_rate"] <= 1.0 and "correction_rate" not in saved["rows"][0]
    assert result["summary"][BAD_LABEL]["correction_rate"] == bad["correction_rate"]
    report(tmp_path)
    assert "| prefetch hit rate | correction rate |" in (tmp_path / "README.md").read_text()


def test_needle_summary_averages_speculation_rates_over_the_prompts_that_have_them():
    from kvtier.evaluation.needle import _rate

    rows = [{"success": True, "same_as_full": True, "prefetch_hit_rate": 0.5},
            {"success": False, "same_as_full": True, "prefetch_hit_rate": 1.0},
            {"success": False, "same_as_full": False}]
    rate = _rate(rows)
    assert rate["prefetch_hit_rate"] == 0.75 and "correction_rate" not in rate
    assert rate["success_rate"] == pytest.approx(1 / 3) and rate["prompts"] == 3


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


@pytest.mark.embedded
def test_multikey_needle_scores_good_and_bad_methods(embedded):
    model, tokenizer = embedded
    # seed 0, 1k tokens, asked needle at depth 0.5 among 4: full answers it; the tiny FreeKV cache does not
    result = needle_grid(model, tokenizer, f"full,{BAD}", lengths=["1k"], depths=[0.5], kinds=["multikey"], seed=0,
                         max_new_tokens=20, progress=False)
    assert [r["kind"] for r in result["rows"]] == ["multikey", "multikey"]
    assert result["summary"]["full"]["kinds"]["multikey"]["success_rate"] == 1.0
    assert result["summary"][BAD_LABEL]["kinds"]["multikey"]["success_rate"] == 0.0


@pytest.mark.embedded
def test_ruler_scores_good_and_bad_methods(embedded):
    model, tokenizer = embedded
    # 512 tokens, seed 0: full recovers the whole 2-hop chain and one of the 3 common words; the tiny cache nothing
    result = ruler(model, tokenizer, f"full,{BAD}", lengths=[512], samples=1, seed=0, progress=False)
    full, bad = result["summary"]["full"], result["summary"][BAD_LABEL]
    assert full["vt"]["score"] == 1.0 and full["cwe"]["score"] > 0
    assert bad["vt"]["score"] < full["vt"]["score"] and bad["cwe"]["score"] < full["cwe"]["score"]
    assert bad["vt"]["agreement_with_full"] == 0.0
    assert all(r["answer"] for r in result["rows"])


@pytest.mark.embedded
def test_fidelity_is_exact_for_exact_methods_and_not_for_a_lossy_one(embedded):
    model, tokenizer = embedded
    result = fidelity(model, tokenizer, f"full,offload,{BAD}", texts=["prose"], lengths=[512], new_tokens=16,
                      progress=False)
    s = result["summary"]
    assert s["full"]["top1_agreement"] == 1.0 and s["full"]["kl_max"] == pytest.approx(0.0, abs=1e-9)
    assert s["offload"]["top1_agreement"] == 1.0 and s["offload"]["kl_max"] < 1e-6
    assert s[BAD_LABEL]["kl_mean"] > 1e-2 and s[BAD_LABEL]["top1_agreement"] < 1.0
    assert s["full"]["steps"] == 16 and len(result["rows"][0]["kl_per_step"]) == 16


class ByteTokenizer:
    """One token per byte of ASCII text: ids < 256 fit the tiny models' vocabulary, and slicing the text slices
    its ids."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = list(text.encode("ascii"))
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


def _text_file(path, n: int, seed: int = 0):
    rng = random.Random(seed)
    path.write_text("".join(rng.choice("abcdefghij klmnop\n") for _ in range(n)))
    return str(path)


# a FreeKV cache far smaller than the 48-token context: lossy on the tiny model
TINY_LOSSY = "freekv:budget=16:page_size=4:sink=4:window=4:dense_layers=0"


def test_paired_delta_matches_a_hand_computation():
    full = torch.tensor([2.0, 1.0, 3.0, 0.5])
    method = torch.tensor([2.5, 1.0, 3.5, 1.5])  # differences 0.5, 0, 0.5, 1
    out = paired_delta(method, full)
    mean = 0.5
    std = math.sqrt(((0.5 - mean) ** 2 * 2 + (0 - mean) ** 2 + (1 - mean) ** 2) / 3)  # sample std, n - 1
    se = std / math.sqrt(4)
    base = (2.0 + 1.0 + 3.0 + 0.5) / 4
    assert out["nll_delta_vs_full"] == pytest.approx(mean)
    assert out["nll_delta_se"] == pytest.approx(se)
    assert out["ppl_delta_ci95"] == pytest.approx([math.exp(base + mean - 1.96 * se) - math.exp(base),
                                                   math.exp(base + mean + 1.96 * se) - math.exp(base)])
    same = paired_delta(full, full)
    assert same["nll_delta_vs_full"] == 0 and same["nll_delta_se"] == 0 and same["ppl_delta_ci95"] == [0, 0]
    # a constant shift has no spread: the paired interval collapses onto the point estimate
    shifted = paired_delta(full.double() + 0.1, full.double())
    assert shifted["nll_delta_se"] == pytest.approx(0, abs=1e-12)
    assert shifted["ppl_delta_ci95"][0] == pytest.approx(math.exp(base + 0.1) - math.exp(base))


def test_window_starts_are_spread_disjoint_and_checked():
    assert window_starts(100, 30, 1) == [0]
    assert window_starts(100, 30, 3) == [0, 33, 66]
    assert window_starts(90, 30, 3) == [0, 30, 60]
    with pytest.raises(ValueError, match="fit 3 disjoint window"):
        window_starts(100, 30, 4)


def test_perplexity_pools_windows_at_their_offsets(tiny, tmp_path):
    model = tiny("llama")
    tok = ByteTokenizer()
    path = _text_file(tmp_path / "a.txt", 200)
    text = open(path).read()
    second = tmp_path / "b.txt"
    second.write_text(text[100:])  # where the second of two windows over 200 tokens starts
    kwargs = dict(texts=[path], context=48, targets=16, progress=False)
    two = perplexity(model, tok, f"full,offload,{TINY_LOSSY}", windows=2, **kwargs)
    assert two["windows"] == 2 and two["targets"] == 16
    rows = {r["method"]: r for r in two["rows"]}
    assert all(r["scored_tokens"] == 32 and r["windows"] == 2 for r in rows.values())
    one = {r["method"]: r for r in perplexity(model, tok, "full", windows=1, **kwargs)["rows"]}
    later = {r["method"]: r
             for r in perplexity(model, tok, "full", windows=1, **{**kwargs, "texts": [str(second)]})["rows"]}
    assert one["full"]["nll"] != pytest.approx(later["full"]["nll"]), "the two windows score different tokens"
    assert rows["full"]["nll"] == pytest.approx((one["full"]["nll"] + later["full"]["nll"]) / 2, rel=1e-5)
    assert rows["full"]["ppl_delta_ci95"] == [0, 0] and rows["full"]["nll_delta_se"] == 0
    assert rows["full"]["decode_steps"] == 2 * 15, "counters add up over windows"
    lossy = rows[parse_methods(TINY_LOSSY)[0].label]
    low, high = lossy["ppl_delta_ci95"]
    assert lossy["nll_delta_se"] > 0 and low < lossy["ppl_delta_vs_full"] < high
    assert lossy["nll_delta_vs_full"] == pytest.approx(lossy["nll"] - rows["full"]["nll"], abs=1e-5)


def test_perplexity_refuses_a_text_too_short_for_the_windows(tiny, tmp_path):
    path = _text_file(tmp_path / "a.txt", 150)
    with pytest.raises(ValueError, match="150 tokens fit 2 disjoint window"):
        perplexity(tiny("llama"), ByteTokenizer(), "full", texts=[path], context=48, targets=16, windows=3,
                   progress=False)


def test_lengths_beyond_the_model_are_refused_before_any_work(tiny, tmp_path, monkeypatch):
    """The shorter lengths' prompts (or, in a sweep, the whole needle grid) used to run before the longest one
    failed in its own generation."""
    fidelity_module = importlib.import_module("kvtier.evaluation.fidelity")  # the package exports the functions
    sweep_module = importlib.import_module("kvtier.evaluation.sweep")

    def no_work(*args, **kwargs):
        raise AssertionError("work began before the lengths were checked")

    monkeypatch.setattr(fidelity_module, "generate", no_work)
    monkeypatch.setattr(sweep_module, "needle_grid", no_work)
    model, tok = tiny("llama", max_position_embeddings=64), ByteTokenizer()
    path = _text_file(tmp_path / "a.txt", 300)
    with pytest.raises(ValueError, match="length 62 \\+ 4 tokens after it exceeds the model's maximum of 64 "
                                         "positions; use lengths up to 60"):
        fidelity(model, tok, "full", texts=[path], lengths=[16, 62], new_tokens=4, progress=False)
    with pytest.raises(ValueError, match="length 100 exceeds the model's maximum of 64 positions"):
        ruler(model, tok, "full", lengths=[32, 100], samples=1, progress=False)
    with pytest.raises(ValueError, match="length 48 \\+ 17 tokens after it exceeds"):
        sweep_module.budget_sweep(model, tok, "freekv:page_size=4:sink=4:window=4", budgets=[16], lengths=[32],
                                  texts=[path], context=48, targets=17, progress=False)


class Utf8Tokenizer:
    """One token per UTF-8 byte (ids < 256: the tiny models' vocabulary), with decode: enough for the haystack
    prompts of the needle and RULER tasks, without a chat template."""

    chat_template = None

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = list(text.encode())
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) for i in ids).decode(errors="ignore")


def test_a_length_too_short_for_its_prompt_fails_before_any_work(tiny, tmp_path, monkeypatch):
    """Prompts are built at each cell: the longer lengths' prompts all ran before a short one failed."""
    def no_work(*args, **kwargs):
        raise AssertionError("work began before every prompt was built")

    for name in ("needle", "ruler", "fidelity"):
        monkeypatch.setattr(importlib.import_module(f"kvtier.evaluation.{name}"), "generate", no_work)
    model, tok = tiny("llama"), Utf8Tokenizer()
    with pytest.raises(ValueError, match="context_tokens=50 is too short for this prompt"):
        needle_grid(model, tok, "full", lengths=[1000, 50], depths=[0.5], progress=False)
    with pytest.raises(ValueError, match="context_tokens=50 is too short for this prompt"):
        ruler(model, tok, "full", tasks=["vt"], lengths=[1000, 50], samples=1, progress=False)
    path = _text_file(tmp_path / "a.txt", 200)
    with pytest.raises(ValueError, match="has 200 tokens; a window of 300 does not fit"):
        fidelity(model, ByteTokenizer(), "full", texts=[path], lengths=[100, 300], new_tokens=4, progress=False)
    # perplexity: a second text too short for the windows; a sweep: that, before its needle grid
    longer = _text_file(tmp_path / "b.txt", 400)
    monkeypatch.setattr(importlib.import_module("kvtier.evaluation.ppl"), "score", no_work)
    monkeypatch.setattr(importlib.import_module("kvtier.evaluation.sweep"), "needle_grid", no_work)
    with pytest.raises(ValueError, match="text '.*a.txt': 200 tokens fit 1 disjoint window"):
        perplexity(model, ByteTokenizer(), "full", texts=[longer, path], context=80, targets=40, windows=2,
                   progress=False)
    with pytest.raises(ValueError, match="text '.*a.txt': 200 tokens fit 1 disjoint window"):
        importlib.import_module("kvtier.evaluation.sweep").budget_sweep(
            model, tok, "freekv:page_size=4:sink=4:window=4", budgets=[16], lengths=[1000], texts=[longer, path],
            context=80, targets=40, windows=2, progress=False)


def test_cli_ppl_windows(tiny, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "ppl", "--methods", "full", "--windows", "0"])
    assert exit_info.value.code == 2
    assert "--windows: must be >= 1, got 0" in capsys.readouterr().err
    import kvtier

    monkeypatch.setattr(kvtier, "load", lambda *args, **kwargs: (tiny("llama"), ByteTokenizer()))
    path = _text_file(tmp_path / "a.txt", 200)
    assert main(["eval", "ppl", "--methods", "full,offload", "--texts", "", "--text-file", path, "--context", "48",
                 "--targets", "16", "--windows", "2", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "95% CI" in out and "[+0.0000, +0.0000]" in out
    saved = json.loads((tmp_path / "out" / "ppl.json").read_text())
    assert saved["windows"] == 2 and saved["rows"][1]["scored_tokens"] == 32


def test_report_shows_the_interval_when_rows_have_it(tmp_path):
    rows = [{"method": "full", "text": "prose", "context": 1024, "ppl": 9.0, "ppl_delta_vs_full": 0.0,
             "ppl_delta_ci95": [0.0, 0.0]},
            {"method": "offload", "text": "prose", "context": 1024, "ppl": 9.5, "ppl_delta_vs_full": 0.5,
             "ppl_delta_ci95": [0.31, 0.72]}]
    (tmp_path / "ppl.json").write_text(json.dumps({"eval": "ppl", "context": 1024, "targets": 256, "windows": 4,
                                                   "texts": ["prose"], "rows": rows}))
    report(tmp_path)
    readme = (tmp_path / "README.md").read_text()
    assert "| delta | 95% CI |" in readme and "scored tokens = targets x windows" in readme
    assert "| offload | prose | 1024 | 256 | 9.500 | 9.000 | +0.5000 | [+0.3100, +0.7200] |" in readme


def test_report_merges_perplexity_runs_from_subfolders(tmp_path):
    """One perplexity JSON per context (or per text run side by side) land in one table, each row with its own
    context and scored tokens."""
    for context, windows, delta in ((2048, 4, 0.05), (4096, 3, 0.08)):
        rows = [{"method": m, "text": "code", "context": context, "targets": 256, "windows": windows,
                 "scored_tokens": 256 * windows, "ppl": 5.0 + d, "ppl_delta_vs_full": d,
                 "ppl_delta_ci95": [d / 2, 2 * d]} for m, d in (("full", 0.0), ("specache", delta))]
        folder = tmp_path / f"ppl-{context}"
        folder.mkdir()
        (folder / "ppl.json").write_text(json.dumps({"eval": "ppl", "context": context, "targets": 256,
                                                     "windows": windows, "texts": ["code"], "rows": rows}))
    found = load_results(tmp_path)
    assert len(found["ppl"]["rows"]) == 4 and "ppl-2048/ppl.json" in found["ppl"]["file"]
    report(tmp_path)
    readme = (tmp_path / "README.md").read_text()
    assert "| specache | code | 2048 | 1024 | 5.050 | 5.000 | +0.0500 |" in readme
    assert "| specache | code | 4096 | 768 | 5.080 | 5.000 | +0.0800 |" in readme


def _needle_grid(methods, full_answer="It is orbit-falcon-1.", seed=0):
    rows, summary = [], {}
    for method in methods:
        found = method != "blind"
        rows += [{"method": method, "kind": "single", "length": 2048, "depth": d, "success": found,
                  "answer": full_answer if method == "full" else "x", "same_as_full": method == "full"}
                 for d in (0.1, 0.9)]
        summary[method] = {"success_rate": float(found), "kinds": {"single": {"success_rate": float(found),
                                                                              "agreement_with_full": 1.0}}}
    return {"eval": "needle", "kinds": ["single"], "lengths": [2048], "depths": [0.1, 0.9], "seed": seed,
            "keys": 4, "summary": summary, "rows": rows}


def test_report_merges_needle_grids_against_one_baseline(tmp_path):
    for folder, methods in (("a", ["full", "specache"]), ("b", ["full", "blind"])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "needle.json").write_text(json.dumps(_needle_grid(methods)))
    found = load_results(tmp_path)
    assert list(found["needle"]["summary"]) == ["full", "specache", "blind"]
    assert [r["method"] for r in found["needle"]["rows"]].count("full") == 2  # the baseline once per prompt
    report(tmp_path)
    readme = (tmp_path / "README.md").read_text()
    assert "| blind | 0% (full 100%) |" in readme and "`a/needle.json`, `b/needle.json`" in readme


@pytest.mark.parametrize("second", [dict(full_answer="It is maple-9."), dict(seed=1)])
def test_report_refuses_needle_grids_without_one_baseline(tmp_path, second):
    for folder, grid in (("a", _needle_grid(["full", "specache"])), ("b", _needle_grid(["full", "blind"], **second))):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "needle.json").write_text(json.dumps(grid))
    with pytest.raises(ValueError, match="disagree on full|differ in seed"):
        load_results(tmp_path)


def test_budget_sweep_holds_the_methods_own_options_at_every_point(embedded, tmp_path):
    from kvtier.evaluation import budget_sweep

    model, tokenizer = embedded
    fixed = "freekv:page_size=32:sink=32:window=32:dense_layers=0"
    result = budget_sweep(model, tokenizer, fixed, budgets=[96, 4096], lengths=["1k"], depths=[0.5],
                          texts=("code",), context="512", targets=16, out_dir=tmp_path, progress=False)
    assert [p["label"] for p in result["points"]] == [f"freekv:budget={b},dense_layers=0,page_size=32,sink=32,window=32"
                                                      for b in (96, 4096)]
    assert result["options"] == {"page_size": 32, "sink": 32, "window": 32, "dense_layers": 0}
    covering = result["points"][1]  # a budget beyond the context: full, up to the order of float sums
    assert abs(covering["ppl_delta_max"]) < 1e-3 and covering["needle_agreement_with_full"] == 1.0
    assert json.loads(Path(result["json"]).read_text())["points"][0]["budget"] == 96
    with pytest.raises(ValueError, match="swept"):
        budget_sweep(model, tokenizer, "freekv:budget=512", budgets=[256], progress=False)
    with pytest.raises(ValueError, match="one method"):
        budget_sweep(model, tokenizer, "freekv,specache", budgets=[256], progress=False)
