"""Cache files: what KVCache.load refuses, each with a message that names the file, and atomic writing."""

from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch

import kvtier
from kvtier import cachefile
from kvtier.generate import prefill

DOC = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def saved(tiny, tmp_path):
    """(model, path) of a prefilled `full` cache saved from a tiny llama."""
    model = tiny("llama")
    cache = kvtier.KVCache(model, method="full")
    with torch.inference_mode():
        prefill(model, cache, DOC)
    path = cache.save(tmp_path / "doc.kvc")
    return model, path


def _rewrite(path, change):
    """Rewrite the file's kvtier metadata through change(info)."""
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    info = json.loads(meta["kvtier"])
    change(info)
    safetensors.torch.save_file(tensors, str(path), metadata={**meta, "kvtier": json.dumps(info)})


def _refused(path, model, match, **kwargs):
    with pytest.raises((ValueError, FileNotFoundError), match=match) as err:
        kvtier.KVCache.load(path, model, **kwargs)
    assert str(path) in str(err.value), f"the message does not name the file: {err.value}"
    return str(err.value)


def test_round_trip_keeps_tokens_and_counters(saved):
    model, path = saved
    cache = kvtier.KVCache.load(path, model)
    assert torch.equal(cache.token_ids, DOC)
    assert cache.stats()["tokens"] == 40 and cache.method.name == "full"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_missing_file_and_folder(saved, tmp_path):
    model, _ = saved
    _refused(tmp_path / "nope.kvc", model, "cache file not found")
    _refused(tmp_path, model, "is not a file")


def test_a_file_that_is_not_ours(saved, tmp_path):
    model, _ = saved
    text = tmp_path / "notes.txt"
    text.write_text("just some notes, long enough to have eight bytes")
    _refused(text, model, "is not a kvtier cache file")
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    _refused(short, model, "is not a kvtier cache file")
    garbage = tmp_path / "garbage"
    garbage.write_bytes((10).to_bytes(8, "little") + b"not json!!" + bytes(20))
    _refused(garbage, model, "is not a kvtier cache file")
    other = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, str(other))
    _refused(other, model, "a safetensors file but not a kvtier cache file")


def test_a_truncated_file(saved, tmp_path):
    model, path = saved
    data = path.read_bytes()
    cut = tmp_path / "cut.kvc"
    cut.write_bytes(data[: len(data) // 2])
    _refused(cut, model, "is truncated")
    cut.write_bytes(data[:100])  # inside the header
    _refused(cut, model, "truncated or not a kvtier cache file")


def test_another_model(saved, tiny):
    _, path = saved
    same_shape = tiny("llama", seed=1)
    assert "same shapes but different weights" in _refused(path, same_shape, "saved from another model")
    message = _refused(path, tiny("llama", num_hidden_layers=2), "saved from another model")
    assert "num_layers: 2 here, 3 in the file" in message
    assert "family: 'qwen3' here, 'llama' in the file" in _refused(path, tiny("qwen3"), "another model")


def test_another_method(saved):
    model, path = saved
    _refused(path, model, "holds a 'full' cache, not 'offload'", method="offload")
    assert kvtier.KVCache.load(path, model, method="full").method.name == "full"


def test_another_format_or_kvtier_version(saved):
    model, path = saved
    _rewrite(path, lambda info: info.update(kvtier_version="0.0.1"))
    _refused(path, model, "saved by kvtier 0.0.1, this is kvtier")
    _rewrite(path, lambda info: info.update(format_version=99))
    _refused(path, model, "format version 99; this kvtier reads version 1")


def test_another_device(saved):
    model, path = saved
    _rewrite(path, lambda info: info.update(device="cuda"))
    _refused(path, model, "was saved on cuda, the model is on cpu")


def test_damaged_contents(saved):
    model, path = saved

    def shrink(info):
        info["storages"][0]["nbytes"] += 4

    _rewrite(path, shrink)
    _refused(path, model, "is damaged: buffer 0")
    _rewrite(path, lambda info: info["storages"][0].update(nbytes=info["storages"][0]["nbytes"] - 4))
    _rewrite(path, lambda info: info.update(state={"object": "os:system", "id": 0, "attrs": {}}))
    _refused(path, model, "damaged kvtier cache file .*not a kvtier class")
    _rewrite(path, lambda info: info.update(state={"object": "kvtier.methods.full:Full", "id": 0, "attrs": 7}))
    _refused(path, model, "damaged kvtier cache file")
    _rewrite(path, lambda info: info.pop("state"))
    _refused(path, model, r"damaged kvtier cache file \(its metadata lacks \['state'\]\)")


def test_writing_is_atomic(saved, monkeypatch):
    """A write that fails part-way (a full disk, Ctrl-C) leaves the old file as it was and no temporary file."""
    model, path = saved
    before = path.read_bytes()
    cache = kvtier.KVCache.load(path, model)

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        cache.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == [path.name]


def test_save_names_a_bad_target(saved, tmp_path):
    model, path = saved
    cache = kvtier.KVCache.load(path, model)
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        cache.save(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cache.save(tmp_path / "no" / "such.kvc")


def test_fingerprint_is_stable_and_small(tiny):
    a, b = cachefile.fingerprint(tiny("llama")), cachefile.fingerprint(tiny("llama"))
    assert a == b and a["num_layers"] == 3 and a["dtype"] == "float32"
    assert cachefile.model_mismatch(a, b) is None
