"""`kvtier plan`: real shapes on the meta device, what fits, what auto picks, host memory, argument errors."""

from __future__ import annotations

import json

import pytest
import torch

from kvtier import plan as plan_module
from kvtier.cli import main
from kvtier.models import ModelSpec
from kvtier.predict import predict

GiB = 2 ** 30


@pytest.fixture(scope="module")
def llama8b():
    return plan_module.model_shape("llama-3.1-8b")


def test_llama_8b_at_128k_batch_4_on_80_gib(llama8b, tmp_path, capsys):
    """The issue's bar: full does not fit, and the table says what does (offload, exact, is what auto picks)."""
    out = tmp_path / "plan.json"
    code = main(["plan", "--model-config", "llama-3.1-8b", "--context", "128k", "--batch", "4",
                 "--device-memory", "80GiB", "--host-memory", "512GiB", "--bandwidth", "25GB/s", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    case = json.loads(out.read_text())["cases"][0]
    rows = {r["label"]: r for r in case["rows"]}
    assert case["context"] == 131072 and case["batch"] == 4
    assert not rows["full"]["fits"] and rows["full"]["device_bytes"] > case["kv_budget"]
    assert rows["full"]["device_bytes"] == 4 * (131072 + 256) * 128 * 1024  # 128 KiB per token in bfloat16
    assert rows["offload"]["fits"] and rows["offload"]["auto"] and case["auto"] == "offload"
    assert [label for label, r in rows.items() if r["auto"]] == ["offload"]
    assert any(r["fits"] and not r["exact"] for r in rows.values())  # approximate methods that fit are listed too
    assert rows["offload"]["transfer_floor_s"] == pytest.approx(rows["offload"]["h2d_step_bytes"] / 25e9)
    assert "full" in text and "no: device" in text and "<- auto" in text and "KV budget" in text
    # the KV budget: 0.9 of the device, less the weights (8.03B parameters in bfloat16) and one chunk's activations
    assert case["kv_budget"] == int(0.9 * 80 * GiB) - llama8b.weight_bytes - case["activation_bytes"]
    assert 14.9 * GiB < llama8b.weight_bytes < 15 * GiB


def test_plan_rows_are_the_predictions(llama8b):
    spec = llama8b.spec
    result = plan_module.plan(llama8b, [32768], [1], 24 * GiB, host_memory=64 * GiB)
    case = result["_cases"][0]
    for row in case.rows:
        p = row.prediction
        assert p.device_bytes == predict(spec, p.method, p.options, 32768 + 256, 1).device_bytes
    # 24 GiB: 0.9 x 24 - 15 GiB of weights leaves about 6 GiB; full (4 GiB at 32k) fits, auto takes it
    assert case.auto == "full"


def test_plan_says_when_host_memory_is_short(llama8b):
    result = plan_module.plan(llama8b, [131072], [4], 80 * GiB, host_memory=32 * GiB)
    case = result["_cases"][0]
    offload = next(r for r in case.rows if r.prediction.label == "offload")
    assert offload.fits_device and not offload.fits_host and not offload.fits
    assert "host memory" in case.auto_reason and "32.00 GiB" in case.auto_reason
    assert "no: host RAM" in plan_module.format_plan(result)


def test_plan_when_nothing_fits(llama8b):
    result = plan_module.plan(llama8b, [32768], [1], 16 * GiB)
    case = result["_cases"][0]
    assert case.auto == "nothing fits" and "no device memory for KV" in case.auto_reason
    assert not any(r.fits for r in case.rows)


def test_plan_of_a_model_folder_reads_only_its_config(tmp_path, capsys):
    from kvtier.bench.shapes import model_config

    config = model_config("tiny-llama")
    config.save_pretrained(tmp_path / "m")
    assert main(["plan", "--model", str(tmp_path / "m"), "--context", "1k", "--device-memory", "1GiB",
                 "--device", "cpu", "--dtype", "float32"]) == 0
    assert "auto: full" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    ([], "give either --model-config"),
    (["--model-config", "llama-3.1-8b", "--model", "x"], "give either --model-config"),
    (["--model-config", "nope"], "unknown; valid"),
    (["--model", "no/such-model-here"], "not in the Hugging Face cache"),
    (["--model-config", "llama-3.1-8b", "--device-memory", "6G"], "is not a size"),
    (["--model-config", "llama-3.1-8b", "--host-memory", "lots"], "is not a size"),
    (["--model-config", "llama-3.1-8b", "--bandwidth", "fast"], "is not a bandwidth"),
    (["--model-config", "llama-3.1-8b", "--utilization", "0"], "utilization must be"),
    (["--model-config", "llama-3.1-8b", "--dtype", "float33"], "unknown dtype"),
    (["--model-config", "llama-3.1-8b", "--device", "tpu"], "plan for cuda or cpu"),
    (["--model-config", "llama-3.1-8b", "--context", "200k"], "exceeds llama-3.1-8b's 135168 positions"),
    (["--model-config", "llama-3.1-8b", "--json", "."], "is a folder"),
])
def test_plan_argument_errors_before_any_work(monkeypatch, capsys, args, message):
    def refuse(*a, **k):
        raise AssertionError("the model was built before the argument error")

    monkeypatch.setattr(plan_module, "model_shape", refuse)
    if "--device-memory" not in args:
        args = args + ["--device-memory", "24GiB"]
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_generate_auto_arguments(capsys):
    assert main(["generate", "--prompt-file", "x.txt", "--method", "auto"]) == 2
    assert "--method auto needs --device-memory" in capsys.readouterr().err
    assert main(["generate", "--prompt-file", "x.txt", "--method", "auto", "--device-memory", "1GiB",
                 "--budget", "64"]) == 2
    assert "chooses the method's options itself" in capsys.readouterr().err
    assert main(["generate", "--prompt-file", "x.txt", "--method", "full", "--device-memory", "6G"]) == 2
    assert "is not a size" in capsys.readouterr().err


@pytest.mark.embedded
def test_generate_auto_runs(embedded, tmp_path, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text("What is the capital of France?")
    assert main(["generate", "--prompt-file", str(prompt), "--method", "auto", "--device-memory", "1MiB",
                 "--max-new-tokens", "4", "--json", "--device", "cpu", "--dtype", "float32"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["method"] == "offload" and stats["device_kv_bytes"] <= 2 ** 20
    assert stats["device_kv_bytes"] == stats["predicted_device_kv_bytes"]
