"""The hardware profiler: measuring, overriding, saving, caching, and `kvtier profile`."""

from __future__ import annotations

import json
import os
import math
import time

import pytest
import torch

from kvtier import hardware as prof
from kvtier.cli import main
from kvtier.hardware import HardwareProfile, load_profile, measure, save

OVERRIDE = {"h2d_bytes_per_s": 25e9, "matmul_flops_per_s": 300e12}


def _assert_sane(hw: HardwareProfile):
    for rate in (hw.h2d_bytes_per_s, hw.matmul_flops_per_s):
        assert isinstance(rate, float) and math.isfinite(rate) and rate > 0


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """Point the per-machine cache at a temporary folder for the test."""
    path = tmp_path / "cache"
    monkeypatch.setenv("KVTIER_CACHE_DIR", str(path))
    return path


@pytest.fixture
def fake_measure(monkeypatch):
    """Replace `measure` with a fast fake that counts its calls."""
    calls = []

    def fake(device=None, dtype=None, hidden_size=4096, kv_width=4096, tokens=4096, **kwargs):
        calls.append((str(device), dtype, hidden_size, kv_width, tokens))
        return HardwareProfile(h2d_bytes_per_s=10e9 + len(calls), matmul_flops_per_s=1e12, device="cpu (fake)",
                               dtype=str(dtype).removeprefix("torch."), shape=(tokens, hidden_size, kv_width),
                               measured_at="2025-01-01T00:00:00+00:00", source="measured")

    monkeypatch.setattr(prof, "measure", fake)
    return calls


# -- measure --------------------------------------------------------------------------------------------------
def test_measure_cpu_small_shape():
    hw = measure("cpu", "float32", hidden_size=512, kv_width=256, tokens=128, copy_mib=8, repeats=3)
    _assert_sane(hw)
    assert hw.source == "measured" and hw.dtype == "float32" and hw.device.startswith("cpu")
    assert hw.shape[1:] == (512, 256) and 1 <= hw.shape[0] <= 128
    assert hw.measured_at


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_measure_cpu_defaults_shrink_and_stay_fast(dtype):
    # float16 GEMMs on CPU can run below 1 GFLOP/s: the default 4096^3 shape would take minutes unshrunk.
    t0 = time.perf_counter()
    hw = measure("cpu", dtype)
    assert time.perf_counter() - t0 < 10
    _assert_sane(hw)
    assert hw.dtype == dtype and hw.shape[1:] == (4096, 4096) and hw.shape[0] <= 1024


@pytest.mark.parametrize("kwargs", [{"hidden_size": 0}, {"tokens": -1}, {"repeats": 0}, {"copy_mib": 1.5}])
def test_measure_rejects_bad_sizes(kwargs):
    with pytest.raises(ValueError):
        measure("cpu", "float32", **kwargs)


def test_measure_rejects_unknown_dtype_and_device():
    with pytest.raises(ValueError, match="dtype"):
        measure("cpu", "fp8")
    with pytest.raises(ValueError, match="cpu"):
        measure("meta", "float32")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measure_cuda():
    hw = measure("cuda", "bfloat16", hidden_size=4096, kv_width=1024, tokens=2048, copy_mib=64, repeats=3)
    _assert_sane(hw)
    assert hw.shape == (2048, 4096, 1024) and hw.dtype == "bfloat16"
    assert hw.device == torch.cuda.get_device_name(0)
    assert 1e9 < hw.h2d_bytes_per_s < 1e12  # PCIe / NVLink-C2C range, pinned
    assert 1e12 < hw.matmul_flops_per_s < 1e16


# -- overrides --------------------------------------------------------------------------------------------------
def test_dict_override(fake_measure, cache_dir):
    hw = load_profile(dict(OVERRIDE), device="cpu", dtype="float32", hidden_size=576, kv_width=192)
    assert hw.source == "override"
    assert hw.h2d_bytes_per_s == 25e9 and hw.matmul_flops_per_s == 300e12
    assert hw.dtype == "float32" and hw.device.startswith("cpu") and hw.shape == (4096, 576, 192)
    named = load_profile({**OVERRIDE, "device": "my A100", "source": "measured"}, device="cpu")
    assert named.device == "my A100" and named.source == "override"
    assert fake_measure == [] and not cache_dir.exists()  # an override neither measures nor caches


@pytest.mark.parametrize("bad, match", [
    ({}, "missing"),
    ({"h2d_bytes_per_s": 25e9}, "matmul_flops_per_s"),
    ({"matmul_flops_per_s": 1e12}, "h2d_bytes_per_s"),
    ({**OVERRIDE, "bandwidth": 1e9}, "valid keys"),
    ({"B": 25e9, "F": 1e12}, "unknown"),
    ({**OVERRIDE, "h2d_bytes_per_s": 0}, "h2d_bytes_per_s"),
    ({**OVERRIDE, "h2d_bytes_per_s": -1e9}, "h2d_bytes_per_s"),
    ({**OVERRIDE, "matmul_flops_per_s": float("nan")}, "matmul_flops_per_s"),
    ({**OVERRIDE, "matmul_flops_per_s": float("inf")}, "matmul_flops_per_s"),
    ({**OVERRIDE, "matmul_flops_per_s": "300e12"}, "matmul_flops_per_s"),
    ({**OVERRIDE, "h2d_bytes_per_s": True}, "h2d_bytes_per_s"),
])
def test_bad_override_raises(bad, match, fake_measure):
    with pytest.raises(ValueError, match=match):
        load_profile(bad, device="cpu")
    assert fake_measure == []


def test_unknown_key_message_lists_valid_keys():
    with pytest.raises(ValueError) as err:
        load_profile({**OVERRIDE, "bandwidth": 1}, device="cpu")
    for key in ("h2d_bytes_per_s", "matmul_flops_per_s", "device", "dtype", "shape", "measured_at", "source"):
        assert key in str(err.value)


def test_profile_of_the_wrong_type_raises():
    with pytest.raises(ValueError):
        load_profile(25e9, device="cpu")


def test_hardware_profile_is_returned_as_is():
    hw = HardwareProfile(1e9, 1e12, "x", "float32", (1, 2, 3), "2025-01-01", "measured")
    assert load_profile(hw) is hw


# -- save / load ------------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path, fake_measure):
    hw = HardwareProfile(h2d_bytes_per_s=23.5e9, matmul_flops_per_s=612.25e12, device="NVIDIA H100 80GB HBM3",
                         dtype="bfloat16", shape=(4096, 4096, 1024), measured_at="2025-06-01T12:00:00+00:00",
                         source="measured")
    assert HardwareProfile.from_dict(hw.to_dict()) == hw
    path = save(hw, tmp_path / "deep" / "h100.json")
    assert json.loads(path.read_text())["h2d_bytes_per_s"] == 23.5e9
    for given in (path, str(path)):
        back = load_profile(given, device="cpu")
        assert back.source == "override"
        assert (back.h2d_bytes_per_s, back.matmul_flops_per_s) == (23.5e9, 612.25e12)
        assert (back.device, back.dtype, back.shape, back.measured_at) == (
            hw.device, hw.dtype, hw.shape, hw.measured_at)
    assert fake_measure == []


def test_load_missing_or_broken_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_profile(tmp_path / "nope.json", device="cpu")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        load_profile(broken, device="cpu")
    hand = tmp_path / "hand.json"
    hand.write_text(json.dumps({"h2d_bytes_per_s": 1e9, "flops": 1e12}))
    with pytest.raises(ValueError, match="valid keys"):
        load_profile(hand, device="cpu")


# -- the per-machine cache -------------------------------------------------------------------------------------
def test_cache_is_used_the_second_time(fake_measure, tmp_path):
    first = load_profile(device="cpu", dtype="float32", hidden_size=576, kv_width=192, cache_dir=tmp_path)
    assert first.source == "measured" and len(fake_measure) == 1
    path = prof.cache_file("cpu", "float32", 576, 192, cache_dir=tmp_path)
    assert path.is_file() and "float32" in path.name and "576x192" in path.name
    second = load_profile(device="cpu", dtype="float32", hidden_size=576, kv_width=192, cache_dir=tmp_path)
    assert second.source == "cache" and len(fake_measure) == 1
    assert second.h2d_bytes_per_s == first.h2d_bytes_per_s and second.shape == first.shape
    # another dtype or shape is another entry
    load_profile(device="cpu", dtype="bfloat16", hidden_size=576, kv_width=192, cache_dir=tmp_path)
    load_profile(device="cpu", dtype="float32", hidden_size=4096, kv_width=1024, cache_dir=tmp_path)
    assert len(fake_measure) == 3
    # force measures again and refreshes the entry
    again = load_profile(device="cpu", dtype="float32", hidden_size=576, kv_width=192, cache_dir=tmp_path,
                         force=True)
    assert again.source == "measured" and len(fake_measure) == 4
    assert load_profile(device="cpu", dtype="float32", hidden_size=576, kv_width=192,
                        cache_dir=tmp_path).h2d_bytes_per_s == again.h2d_bytes_per_s


def test_cache_dir_from_environment(fake_measure, cache_dir):
    load_profile(device="cpu")
    assert len(list(cache_dir.glob("profile-*.json"))) == 1
    assert load_profile(device="cpu").source == "cache"
    assert len(fake_measure) == 1


def test_broken_cache_is_measured_again(fake_measure, tmp_path):
    path = prof.cache_file("cpu", "float32", cache_dir=tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("garbage")
    with pytest.warns(UserWarning, match="cache"):
        hw = load_profile(device="cpu", dtype="float32", cache_dir=tmp_path)
    assert hw.source == "measured" and len(fake_measure) == 1
    assert load_profile(device="cpu", dtype="float32", cache_dir=tmp_path).source == "cache"


# -- kvtier profile -----------------------------------------------------------------------------------------------
def test_cli_profile_measures_caches_and_writes_json(cache_dir, tmp_path, capsys):
    out = tmp_path / "hw.json"
    args = ["profile", "--device", "cpu", "--hidden-size", "1024", "--kv-width", "256"]
    assert main(args + ["--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "GB/s" in text and "TFLOP/s" in text and "measured now" in text and "CPU numbers" in text
    saved = json.loads(out.read_text())
    assert saved["shape"][1:] == [1024, 256] and saved["h2d_bytes_per_s"] > 0
    assert len(list(cache_dir.glob("profile-*1024x256.json"))) == 1

    assert main(args) == 0
    assert "from the cache" in capsys.readouterr().out
    assert main(args + ["--force"]) == 0
    assert "measured now" in capsys.readouterr().out


def test_cli_profile_bad_dtype_is_a_clear_error(cache_dir, capsys):
    assert main(["profile", "--device", "cpu", "--dtype", "fp8"]) == 2
    assert "dtype" in capsys.readouterr().err


def test_steady_cpu_gemm_sets_mkl_mode_unless_the_user_did(monkeypatch):
    monkeypatch.delenv("MKL_CBWR", raising=False)
    assert prof.steady_cpu_gemm() == "AUTO"
    assert os.environ["MKL_CBWR"] == "AUTO"
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    assert prof.steady_cpu_gemm() == "COMPATIBLE"
    monkeypatch.setenv("MKL_CBWR", "")  # empty: MKL's own dispatch, kept as the user asked
    assert prof.steady_cpu_gemm() is None
    assert os.environ["MKL_CBWR"] == ""


def test_cli_sets_the_mkl_mode_before_anything_else(monkeypatch):
    monkeypatch.delenv("MKL_CBWR", raising=False)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert os.environ["MKL_CBWR"] == "AUTO"
    from kvtier.models import environment_summary

    assert environment_summary()["mkl_cbwr"] == "AUTO"
