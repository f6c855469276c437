"""Every user mistake through the real CLI: exit code 2, one line on stderr naming the bad value, no traceback,
and no model loaded before the error when the mistake is in the arguments."""

from __future__ import annotations

import importlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import kvtier
from kvtier.cli import _read_prompt, main

SRC = str(Path(kvtier.__file__).resolve().parents[1])


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A working folder with the probes' files; the commands run inside it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KVTIER_CACHE_DIR", str(tmp_path / "profile-cache"))
    Path("prompt.txt").write_text("What is kvtier?")
    Path("binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    Path("empty.gguf").write_bytes(b"")
    Path("notgguf.gguf").write_bytes(b"PK\x03\x04 a zip file")
    Path("corrupt.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 4)
    Path("results").mkdir()
    Path("results/needle.json").write_text("{}")
    Path("bad-json").mkdir()
    Path("bad-json/needle.json").write_text('{"eval": "needle", ')
    Path("a-file").write_text("x")
    Path("a-dir").mkdir()
    return tmp_path


class ModelLoaded(BaseException):
    """Raised by the patched loaders (a BaseException, so that no `except Exception` on the way hides it)."""


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading any model or tokenizer fails the test: the mistake must be found before."""

    def refuse(*args, **kwargs):
        raise ModelLoaded("a model or tokenizer was loaded before the argument error was reported")

    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(auto, "from_pretrained", refuse)


G = ["generate", "--prompt-file", "prompt.txt"]
N = ["eval", "needle", "--methods", "full,freekv:budget=0.25", "--out", "runs"]
R = ["eval", "ruler", "--methods", "full", "--out", "runs"]
C = ["chat", "--document", "prompt.txt"]
# argv, what the one line must name
PROBES = [
    (G + ["--model", "/no/such/dir"], "/no/such/dir"),
    (G + ["--model", "org/missing"], "hf download org/missing"),
    (G + ["--device", "tpu"], "'tpu'"),
    (G + ["--method", "unknown"], "unknown method 'unknown'"),
    (G + ["--max-new-tokens", "0"], "--max-new-tokens"),
    (G + ["--max-new-tokens", "many"], "'many'"),
    (G + ["--model", "empty.gguf"], "empty.gguf is empty"),
    (G + ["--model", "notgguf.gguf"], "not a GGUF file"),
    (G + ["--dtype", "fp8"], "'fp8'"),
    (G + ["--budget", "512"], "'full' has no token budget"),
    (G + ["--method", "freekv", "--option", "bogus=1"], "['bogus']"),
    (G + ["--method", "specache", "--option", "bits=7"], "specache option bits must be one of [1, 2], got 7"),
    (G + ["--method", "freekv", "--option", "budget=-3"], "freekv option budget must be an int >= 1, got -3"),
    (G + ["--method", "freekv", "--option", "budget=0.25"], "freekv option budget must be an int >= 1, got 0.25"),
    (G + ["--method", "freekv", "--budget", "64"], "freekv budget 64 must cover sink (32) + window (32)"),
    (G + ["--method", "kvpr", "--option", "split=-1"], "kvpr split must be 'auto' or a non-negative int"),
    (C + ["--method", "freekv", "--option", "tau=2"], "freekv option tau must be a number in [-1.0, 1.0]"),
    (["demo", "--methods", "full,specache:bits=3"], "specache option bits must be one of [1, 2], got 3"),
    (["eval", "needle", "--methods", "full,freekv:budget=0.25:scorer=best", "--out", "runs"], "freekv option scorer must be one of"),
    (["bench", "--model-config", "tiny-llama", "--methods", "freekv:rest=all"], "freekv option rest must be one of"),
    (G + ["--option", "noequals"], "KEY=VALUE"),
    (G + ["--method", "freekv", "--option", "budget=64", "--option", "budget=32"], "--option budget given more"),
    (G + ["--method", "freekv", "--budget", "64", "--option", "budget=32"], "--budget 64 and --option budget=32 both"),
    (C + ["--method", "freekv", "--option", "page_size=8", "--option", "page_size=16"], "page_size given more"),
    (["generate", "--prompt-file", "binary.txt"], "binary.txt is not UTF-8"),
    (["generate", "--prompt-file", "missing.txt"], "missing.txt: file not found"),
    (["generate", "--prompt-file", "a-dir"], "a-dir is not a file"),
    (["generate"], "--prompt-file"),
    (["demo", "--out", "a-dir"], "--out a-dir is a folder"),
    (["demo", "--methods", "freekv:bogus=1"], "['bogus']"),
    (["demo", "--methods", "freekv:budget=64:budget=32"], "method option 'budget' is given twice"),
    (["demo", "--methods", ""], "--methods: is empty"),
    (["demo", "--methods", "full,nosuch"], "unknown method 'nosuch'"),
    (["demo", "--context", "0"], "--context"),
    (["demo", "--out", "a-file/demo.json"], "a-file is a file"),
    (N + ["--lengths", ""], "--lengths: is empty"),
    (N + ["--depths", ""], "--depths: is empty"),
    (N + ["--depths", "0.5,1.5"], "depth 1.5 is outside [0, 1]"),
    (N + ["--lengths", "2x"], "'2x'"),
    (N + ["--kinds", "multikey", "--keys", "0"], "keys"),
    (N + ["--kinds", "triple"], "'triple'"),
    (["eval", "needle", "--methods", "full", "--out", "a-file"], "--out a-file is a file"),
    (["eval", "needle", "--methods", "full", "--out", "results"], "--overwrite"),
    (["eval", "needle", "--methods", "freekv:budget"], "key=value"),
    (R + ["--samples", "0"], "--samples"),
    (R + ["--task-option", "vt_hops=-1"], "vt_hops=-1"),
    (R + ["--task-option", "vt_bogus=1"], "'vt_bogus'"),
    (R + ["--tasks", "qa"], "'qa'"),
    (["eval", "fidelity", "--methods", "full", "--texts", "no-such-text", "--out", "runs"], "'no-such-text'"),
    (["eval", "ppl", "--methods", "full", "--texts", "", "--out", "runs"], "--texts and --text-file"),
    (["eval", "ppl", "--methods", "full", "--windows", "0", "--out", "runs"], "--windows"),
    (["eval", "sweep", "--values", "1,2", "--option", "bogus", "--out", "runs"], "['bogus']"),
    (["eval", "sweep", "--method", "freekv:budget=512", "--values", "1,2", "--out", "runs"], "'budget' is swept"),
    (["eval", "sweep", "--values", "", "--out", "runs"], "--values: is empty"),
    (["eval", "report", "--dir", "bad-json"], "bad-json/needle.json is not valid JSON"),
    (["eval", "report", "--dir", "nowhere"], "nowhere: folder not found"),
    (["profile", "--out", "a-dir"], "--out a-dir is a folder"),
    (["profile", "--device", "tpu"], "'tpu'"),
    (["profile", "--hidden-size", "0"], "--hidden-size"),
    (["bench", "--model-config", "tiny-llama", "--batch", "0"], "--batch"),
    (["bench", "--model-config", "tiny-llama", "--contexts", ""], "--contexts: is empty"),
    (["bench", "--model-config", "tiny-llama", "--profile", "none.json"], "none.json: file not found"),
    (["bench", "--model-config", "tiny-llama", "--out", "a-file"], "--out a-file is a file"),
    (["chat"], "give the document: --document FILE"),
    (["chat", "--document", "missing.txt"], "--document missing.txt: file not found"),
    (["chat", "--document", "binary.txt"], "--document binary.txt is not UTF-8"),
    (["chat", "--document", "-"], "--document - reads the document from standard input"),
    (C + ["--question", " "], "--question is empty"),
    (C + ["--method", "nosuch"], "unknown method 'nosuch'"),
    (C + ["--budget", "512"], "'full' has no token budget"),
    (C + ["--method", "freekv", "--option", "bogus=1"], "['bogus']"),
    (C + ["--temperature", "0.5"], "--temperature is for sampling: add --do-sample"),
    (C + ["--do-sample", "--temperature", "0"], "--temperature must be > 0"),
    (C + ["--do-sample", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (C + ["--max-new-tokens", "0"], "--max-new-tokens"),
    (C + ["--save-cache", "a-dir"], "--save-cache a-dir is a folder"),
    (C + ["--save-cache", "nowhere/doc.kvc"], "folder nowhere does not exist"),
    (C + ["--save-cache", "x.kvc", "--load-cache", "y.kvc"], "not allowed with argument"),
    (C + ["--model", "/no/such/dir"], "/no/such/dir"),
    (C + ["--method", "auto"], "--method auto needs --device-memory"),
    (C + ["--device-memory", "lots"], "--device-memory"),
    (["chat", "--load-cache", "missing.kvc"], "cache file not found: missing.kvc"),
    (["chat", "--load-cache", "prompt.txt"], "prompt.txt is not a kvtier cache file"),
    (["chat", "--load-cache", "a-dir"], "a-dir is not a file"),
    (["nosuchcommand"], "nosuchcommand"),
    ([], "required"),
]
if not torch.cuda.is_available():
    PROBES.append((G + ["--device", "cuda"], "device 'cuda' asked for"))


@pytest.mark.parametrize("argv, names", PROBES, ids=[" ".join(a) or "(none)" for a, _ in PROBES])
def test_mistake_is_one_line_and_exit_2(files, no_model_load, capsys, monkeypatch, argv, names):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"{argv}: expected one line, got:\n{err}"
    assert lines[0].startswith("kvtier"), lines[0]
    assert names in lines[0], f"{argv}: {names!r} not in: {lines[0]}"
    assert "Traceback" not in err and not out


def test_existing_results_are_kept_unless_overwrite(files, no_model_load, capsys):
    """--overwrite lifts the refusal (the run then goes on, here to the model load the fixture refuses)."""
    argv = ["eval", "needle", "--methods", "full", "--out", "results"]
    assert main(argv) == 2
    assert "already holds needle.json" in capsys.readouterr().err
    with pytest.raises(ModelLoaded):
        main(argv + ["--overwrite"])
    # other evaluations may write into the same folder
    with pytest.raises(ModelLoaded):
        main(["eval", "ruler", "--methods", "full", "--out", "results"])


def test_chat_checks_a_cache_file_against_its_arguments(files, tiny, capsys, monkeypatch):
    """--load-cache: the file fixes the method and its options; a file saved from another model is refused after
    the model is loaded, naming the file."""
    from kvtier.generate import prefill

    model = tiny("llama")
    cache = kvtier.KVCache(model, method="full")
    with torch.inference_mode():
        prefill(model, cache, torch.tensor([[5, 6, 7, 8]]))
    cache.save("doc.kvc")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _refuse_load)
    for argv, names in [(["--method", "offload"], "holds a 'full' cache, not 'offload'"),
                        (["--option", "page_size=8"], "the file fixes the method and its options"),
                        (["--budget", "64"], "the file fixes the method and its options"),
                        (["--device-memory", "1GiB"], "the file fixes the method and its options")]:
        assert main(["chat", "--load-cache", "doc.kvc", "--question", "q"] + argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and names in err and "doc.kvc" in err, err
    monkeypatch.setattr(kvtier, "load", lambda *a, **k: (tiny("llama", seed=1), None))
    assert main(["chat", "--load-cache", "doc.kvc", "--question", "q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "doc.kvc was saved from another model (same shapes but different weights)" in err, err


class _FakeTokenizer:
    chat_template = None

    def __call__(self, text, return_tensors=None):
        return {"input_ids": torch.full((1, 10), 5)}


def test_generate_names_a_prompt_beyond_the_models_positions(files, tiny, capsys, monkeypatch):
    # with --device-memory it was "max_length must be an int in [1, 64] ..., got 70", a value never given
    monkeypatch.setattr(kvtier, "load", lambda *a, **k: (tiny("llama", max_position_embeddings=64), _FakeTokenizer()))
    for extra in (["--method", "offload", "--device-memory", "1GiB"], []):
        assert main(["generate", "--prompt-file", "prompt.txt", "--max-new-tokens", "60"] + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith("the prompt is 10 tokens; with --max-new-tokens 60 that exceeds the model's maximum of 64 "
                            "positions: shorten it, or ask for fewer new tokens"), err
    with pytest.raises(ValueError, match=r"max_length=70 \(prompt \+ new tokens\) exceeds the model's maximum of 64"):
        kvtier.KVCache(tiny("llama", max_position_embeddings=64), max_length=70)


def _refuse_load(*args, **kwargs):
    raise ModelLoaded("a model was loaded before the argument error was reported")


def test_corrupt_gguf_is_named(files, capsys):
    """Valid magic, garbage after it: found while reading the file, reported with its name."""
    assert main(G + ["--model", "corrupt.gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "corrupt.gguf" in err and "truncated or corrupt" in err, err


def test_stdin_prompt(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("a prompt from a pipe\n".encode())))
    assert _read_prompt("-") == "a prompt from a pipe\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe\x00")))
    with pytest.raises(ValueError, match="standard input is not UTF-8"):
        _read_prompt("-")


def test_debug_shows_the_traceback(files, no_model_load):
    with pytest.raises(ValueError, match="keys"):
        main(["--debug", "eval", "needle", "--methods", "full", "--kinds", "multikey", "--keys", "0"])
    with pytest.raises(FileNotFoundError, match="/no/such/dir"):
        main(G + ["--model", "/no/such/dir", "--debug"])


def test_version_and_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # help lines unwrapped
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"kvtier {kvtier.__version__}"
    with pytest.raises(SystemExit):
        main(["eval", "needle", "--help"])
    text = capsys.readouterr().out
    assert "(default: 1k,2k)" in text and "examples:" in text and "--overwrite" in text


def test_profile_says_when_the_cache_was_not_written(files, capsys, monkeypatch):
    monkeypatch.setenv("KVTIER_CACHE_DIR", str(files / "a-file" / "cache"))  # below a file: cannot be made
    with pytest.warns(UserWarning, match="could not write the profile cache"):
        assert main(["profile", "--device", "cpu", "--hidden-size", "64", "--kv-width", "64"]) == 0
    out = capsys.readouterr().out
    assert "NOT cached" in out and "cached at" not in out


def test_profile_save_leaves_no_temporary_file(files, monkeypatch):
    from kvtier import hardware

    hw = hardware.HardwareProfile(h2d_bytes_per_s=1e9, matmul_flops_per_s=1e12, device="cpu", dtype="float32")
    with pytest.raises(IsADirectoryError):
        hardware.save(hw, files / "a-dir")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(hardware.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        hardware.save(hw, files / "p.json")
    assert not list(files.glob(".*.tmp")) and not list((files / "a-dir").glob(".*.tmp"))


@pytest.mark.parametrize("argv, names", [
    (["generate", "--prompt-file", "prompt.txt", "--model", "/no/such/dir"], "/no/such/dir"),
    (["eval", "needle", "--methods", "full", "--depths", "0.5,1.5"], "1.5"),
])
def test_real_process_prints_one_line(files, argv, names):
    """The installed entry point as a user runs it: no traceback reaches stderr."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-m", "kvtier.cli", *argv], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 2, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and names in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def _needle_json(folder: Path) -> None:
    rate = {"success_rate": 1.0, "agreement_with_full": 1.0, "prompts": 1}
    rows = [{"method": "full", "kind": "single", "length": 1024, "depth": 0.5, "success": True,
             "same_as_full": True}]
    folder.mkdir(exist_ok=True)
    (folder / "needle.json").write_text(json.dumps({
        "eval": "needle", "kinds": ["single"], "keys": 4, "lengths": [1024], "depths": [0.5], "seed": 0,
        "rows": rows, "summary": {"full": {**rate, "kinds": {"single": rate}}}}))


def test_report_links_only_pictures_it_wrote(tmp_path, monkeypatch):
    # the module (kvtier.evaluation.report is the function)
    report_module = importlib.import_module("kvtier.evaluation.report")

    _needle_json(tmp_path / "plain")
    monkeypatch.setattr(report_module, "plotting", lambda: None)  # as without matplotlib
    result = report_module.report(tmp_path / "plain")
    readme = (tmp_path / "plain" / "README.md").read_text()
    assert result["plot"] is None
    assert ".png" not in readme, "no picture was written, so none may be named or linked"
    monkeypatch.undo()
    _needle_json(tmp_path / "drawn")
    (tmp_path / "drawn" / "needle.png").write_bytes(b"png")
    result = report_module.report(tmp_path / "drawn")
    readme = (tmp_path / "drawn" / "README.md").read_text()
    assert result["plot"] and "![summary](summary.png)" in readme and "`needle.png`" in readme
    assert "needle_<method>.png" not in readme
