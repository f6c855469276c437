"""Predicted bytes (kvtier.predict) against what the ledger and the link measure, byte for byte.

Each case runs kvtier.generate to `length` tokens through a cache made with max_length=length, as the prediction
assumes, and compares: the ledger's peak (stats()["device_kv_bytes"]) and host_kv_bytes exactly; the host->device
bytes of the last decode step exactly for the exact methods, and every decode forward's bytes against the bound
for freekv and specache (what they recall depends on the data).
"""

from __future__ import annotations

import pytest
import torch

import kvtier
from kvtier.models import ModelSpec
from kvtier.predict import predict

from conftest import FAMILIES, padded_batch

PROFILE = {"h2d_bytes_per_s": 1e9, "matmul_flops_per_s": 2e11}
CASES = {
    "full": ("full", {}),
    "offload": ("offload", {}),
    "kvpr": ("kvpr", {"profile": PROFILE}),
    "freekv": ("freekv", {"budget": 128}),
    "freekv-default": ("freekv", {}),
    "freekv-lowbit-rest": ("freekv", {"budget": 128, "page_size": 8, "scorer": "lowbit", "rest": "lowbit",
                                      "tau": 0.9}),
    "freekv-current": ("freekv", {"budget": 160, "page_size": 16, "speculative": False, "dense_layers": 0}),
    "specache": ("specache", {}),
    "specache-g16-1bit": ("specache", {"bits": 1, "group_size": 16, "topk": 8, "correct": 0.5}),
    "specache-current": ("specache", {"speculative": False, "group_size": 32}),
}


def run(model, method, options, prompt: int, new: int, batch: int = 1):
    """kvtier.generate through KVCache(max_length=prompt + new); returns (stats, h2d bytes of every forward)."""
    ids, mask = padded_batch([prompt] + [prompt - 3] * (batch - 1), vocab_size=model.config.vocab_size)
    cache = kvtier.KVCache(model, method=method, max_length=prompt + new, **options)
    forwards = []
    append = cache.method.append

    def counting_append(layer, k, v):  # the h2d counter at the start of every forward
        if layer == 0:
            forwards.append(cache.method.stats()["h2d_bytes"])
        return append(layer, k, v)

    cache.method.append = counting_append
    kvtier.generate(model, ids, cache=cache, attention_mask=mask if batch > 1 else None, max_new_tokens=new,
                    eos_token_id=[])
    stats = cache.stats()
    forwards.append(stats["h2d_bytes"])
    return stats, [b - a for a, b in zip(forwards, forwards[1:])]


def check(model, name: str, prompt: int, new: int, batch: int = 1):
    method, options = CASES[name]
    stats, per_forward = run(model, method, options, prompt, new, batch)
    pred = predict(ModelSpec.from_model(model), method, options, prompt + new, batch, profile=PROFILE)
    assert stats["tokens"] == prompt + new - 1
    assert stats["device_kv_bytes"] == pred.device_bytes, (name, pred.parts, stats.get("device_workspace_bytes"))
    assert stats["host_kv_bytes"] == pred.host_bytes, name
    decode = per_forward[1:]  # the prompt fits one prefill chunk here
    assert decode, "at least one decode step"
    if pred.h2d_exact:
        assert decode[-1] == pred.h2d_step_bytes, (name, decode)
    else:
        assert max(decode) <= pred.h2d_step_bytes, (name, decode, pred.h2d_step_bytes)
    return stats, pred


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(CASES))
def test_prediction_equals_measurement_every_family(tiny, family, name):
    torch.manual_seed(0)
    model = tiny(family, num_key_value_heads=4) if name == "kvpr" else tiny(family)
    check(model, name, prompt=300, new=5)


@pytest.mark.parametrize("name", ["full", "offload", "freekv", "freekv-lowbit-rest", "specache",
                                  "specache-g16-1bit"])
@pytest.mark.parametrize("prompt,new,batch", [(40, 4, 1), (129, 3, 2), (700, 6, 1)])
def test_prediction_equals_measurement_lengths(tiny, name, prompt, new, batch):
    check(tiny("llama"), name, prompt, new, batch)


def test_kvpr_recomputing_prediction(tiny):
    """On a multi-head model kvpr recomputes: its X staging, RoPE tables and X in host memory are predicted too."""
    model = tiny("llama", num_key_value_heads=4)
    stats, pred = check(model, "kvpr", prompt=400, new=4)
    assert stats["stores_activations"] and "x_staging" in pred.parts
    from kvtier.predict import predict_offload

    assert pred.h2d_step_bytes < predict_offload(ModelSpec.from_model(model), 404, 1).h2d_step_bytes


def test_prediction_scales_to_real_shapes():
    from kvtier.predict import predict_full

    spec = ModelSpec("llama", 32, 32, 8, 128, 4096, 131072, torch.bfloat16, torch.device("cuda"))
    full = predict_full(spec, 131072, 4)
    assert full.device_bytes == 64 * 2 ** 30  # 128 KiB per token of Llama-3.1-8B in bfloat16
    fk = predict(spec, "freekv", {"budget": 4096}, 131072, 4)
    assert "recall_staging" not in fk.parts  # CUDA: the kernel copies from the pinned pool directly
    assert fk.device_bytes < full.device_bytes / 8  # its one dense layer is 1/32 of full


@pytest.mark.parametrize("name", ["freekv", "freekv-lowbit-rest", "specache", "freekv-current"])
def test_prediction_with_pytorch_references(tiny, monkeypatch, name):
    """KVTIER_KERNELS=torch: the references dequantize a layer into the step's workspace and gather recalled rows
    into a staging buffer; both are predicted."""
    monkeypatch.setenv("KVTIER_KERNELS", "torch")
    stats, pred = check(tiny("llama"), name, prompt=300, new=5)
    assert "recall_staging" in pred.parts


@pytest.mark.parametrize("name", ["freekv-lowbit-rest", "specache"])
def test_prediction_where_the_c_scorer_declines_the_head_dim(tiny, name):
    """Heads of 12 channels: the C scorer reads eight at a time and declines, so the reference dequantizes a layer
    of low-bit keys (and values) into the step's workspace; measured and predicted alike."""
    stats, pred = check(tiny("llama", head_dim=12), name, prompt=300, new=5)
    dequantized_keys = 4 * 2 * 305 * 12  # float32, 2 KV heads, every token of the sequence, 12 channels
    assert pred.parts["step_workspace"] > dequantized_keys


@pytest.mark.parametrize("name", ["freekv", "freekv-lowbit-rest", "specache"])
def test_prediction_with_kernels(tiny, monkeypatch, name):
    """Where Triton kernels run (here through triton's interpreter) no layer is dequantized into a workspace and the
    recall copies from the host pool without a gather buffer: the prediction follows."""
    monkeypatch.setenv("KVTIER_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    stats, pred = check(tiny("llama"), name, prompt=130, new=3)
    assert "recall_staging" not in pred.parts


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["full", "offload", "freekv", "freekv-lowbit-rest", "specache"])
def test_prediction_equals_measurement_on_cuda(name):
    from kvtier.models import tiny_random_model

    model = tiny_random_model("llama", dtype=torch.bfloat16, device="cuda")
    check(model, name, prompt=300, new=5)
