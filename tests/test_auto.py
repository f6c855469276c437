"""method="auto" and device_memory=: sizes, the choice and its reason, the limits a planned cache keeps, the needle
at 40 MiB on the embedded model, and models spread over several devices."""

from __future__ import annotations

import pytest
import torch

import kvtier
from kvtier.auto import LADDER, choose
from kvtier.models import ModelSpec
from kvtier.predict import predict
from kvtier.sizes import format_bytes, parse_bytes

from conftest import padded_batch

MiB = 2 ** 20


@pytest.mark.parametrize("text,expected", [("40MiB", 40 * MiB), ("6GiB", 6 * 2 ** 30), ("2GB", 2 * 10 ** 9),
                                           ("1048576", 2 ** 20), (4096, 4096), ("1.5 GiB", 3 * 2 ** 29),
                                           ("512kb", 512_000), (" 3 TiB ", 3 * 2 ** 40), ("100B", 100)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["6G", "lots", "", "-1GiB", "0", 0, -5, 1.5, True, "GiB", "1e9", "2 GiBs"])
def test_parse_bytes_refuses(text):
    with pytest.raises(ValueError, match="size|positive|int of bytes"):
        parse_bytes(text, "device_memory")


def test_format_bytes():
    assert format_bytes(1536) == "1.50 KiB" and format_bytes(100) == "100 B" and format_bytes(40 * MiB) == "40.00 MiB"


def run(model, cache, prompt=300, new=5, batch=1):
    ids, mask = padded_batch([prompt] * batch, vocab_size=model.config.vocab_size)
    kvtier.generate(model, ids, cache=cache, max_new_tokens=new, eos_token_id=[])
    return cache.stats()


def test_auto_full_when_it_fits_then_offload(tiny):
    model = tiny("llama")
    full = predict(ModelSpec.from_model(model), "full", {}, 305, 1).device_bytes
    cache = kvtier.KVCache(model, method="auto", device_memory=full, max_length=305)
    assert cache.method.name == "full" and "nothing moves" in repr(cache)
    stats = run(model, cache)
    assert stats["device_kv_bytes"] == stats["predicted_device_kv_bytes"] == full
    assert stats["auto_choice"] == "full" and stats["device_memory"] == full

    cache = kvtier.KVCache(model, method="auto", device_memory=full - 1, max_length=305)
    stats = run(model, cache)
    assert stats["method"] == "offload" and "exact" in stats["auto_reason"]
    assert stats["device_kv_bytes"] == stats["predicted_device_kv_bytes"] <= full - 1


def test_auto_weighs_kvpr_with_a_profile_on_a_multi_head_model(tiny):
    """Given a hardware profile, auto runs kvpr where its cost model recomputes (it then holds more than offload)."""
    model = tiny("llama", num_key_value_heads=4, num_hidden_layers=6)  # full outgrows kvpr's two staged layers
    profile = {"h2d_bytes_per_s": 1e9, "matmul_flops_per_s": 2e11}
    spec = ModelSpec.from_model(model)
    kvpr = predict(spec, "kvpr", {}, 305, 1, profile=profile)
    assert kvpr.device_bytes > predict(spec, "offload", {}, 305, 1).device_bytes
    cache = kvtier.KVCache(model, method="auto", device_memory=kvpr.device_bytes, max_length=305, profile=profile)
    stats = run(model, cache)
    assert stats["method"] == "kvpr" and stats["stores_activations"]
    assert stats["device_kv_bytes"] == kvpr.device_bytes
    cache = kvtier.KVCache(model, method="auto", device_memory=kvpr.device_bytes - 1, max_length=305, profile=profile)
    assert cache.method.name == "offload"


def test_auto_approximate_when_no_exact_method_fits(tiny):
    """12 layers at 1,500 tokens: offload's two layers of staging outgrow FreeKV with a small budget."""
    model = tiny("llama", num_hidden_layers=12)
    spec = ModelSpec.from_model(model)
    offload = predict(spec, "offload", {}, 1500, 1).device_bytes
    cache = kvtier.KVCache(model, method="auto", device_memory=offload - 1, max_length=1500)
    assert not cache.method.exact
    assert "approximate: no exact method fits" in cache.stats()["auto_reason"]
    stats = run(model, cache, prompt=1490, new=10)
    assert stats["device_kv_bytes"] == stats["predicted_device_kv_bytes"] <= offload - 1


def test_auto_too_small_names_the_smallest_budget(tiny):
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"too small .* give device_memory >= (\d+) bytes") as err:
        kvtier.KVCache(model, method="auto", device_memory="10KiB", max_length=305)
    smallest = int(err.value.args[0].split("device_memory >= ")[1].split()[0])
    cache = kvtier.KVCache(model, method="auto", device_memory=smallest, max_length=305)  # that budget works
    assert run(model, cache)["device_kv_bytes"] <= smallest


def test_ladder_ranks_freekv_budgets_by_what_fits():
    """A real shape: each freekv rung gets the largest budget that fits; a larger budget never fits less."""
    spec = ModelSpec("llama", 32, 32, 8, 128, 4096, 131072, torch.bfloat16, torch.device("cuda"))
    offload = predict(spec, "offload", {}, 131072, 4)
    choice = choose(spec, offload.device_bytes - 1, 131072, 4)
    assert choice.method == "freekv" and choice.prediction.device_bytes < offload.device_bytes
    budget = choice.options["budget"]
    bigger = predict(spec, "freekv", {**choice.options, "budget": budget + choice.options.get("page_size", 32)},
                     131072, 4)
    assert bigger.device_bytes > offload.device_bytes - 1
    assert [r.method for r in LADDER][:2] == ["freekv", "specache"]


def test_explicit_method_checked_against_device_memory(tiny):
    model = tiny("llama")
    with pytest.raises(ValueError, match="needs .* more than device_memory"):
        kvtier.KVCache(model, method="full", device_memory="100KiB", max_length=305)
    cache = kvtier.KVCache(model, method="offload", device_memory="1MiB", max_length=305, batch=2)
    assert run(model, cache, batch=2)["device_kv_bytes"] == cache.stats()["predicted_device_kv_bytes"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="auto", max_length=305), "needs device_memory="),
    (dict(method="auto", device_memory="1MiB"), "needs max_length="),
    (dict(method="auto", device_memory="1MiB", max_length=305, budget=64), "chooses the method's options"),
    (dict(method="auto", device_memory="6G", max_length=305), "is not a size"),
    (dict(method="auto", device_memory="1MiB", max_length=305, batch=0), "batch must be"),
    (dict(method="full", batch=2), "give device_memory= too"),
    (dict(method="autox", device_memory="1MiB", max_length=305), "unknown method"),
])
def test_auto_arguments(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        kvtier.KVCache(tiny("llama"), **kwargs)


def test_planned_cache_keeps_its_batch_and_length(tiny):
    model = tiny("llama")
    cache = kvtier.KVCache(model, method="auto", device_memory="1MiB", max_length=20)
    ids, _ = padded_batch([12, 12], vocab_size=256)
    with pytest.raises(ValueError, match="batch of 1, got 2"):
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    assert cache.broken is None  # refused before anything was stored
    cache = kvtier.KVCache(model, method="auto", device_memory="1MiB", max_length=20)
    with pytest.raises(ValueError, match="max_length=20 .* not 25"):  # refused before the prompt runs
        kvtier.generate(model, padded_batch([15], vocab_size=256)[0], cache=cache, max_new_tokens=10)
    assert cache.stats()["tokens"] == 0
    cache = kvtier.KVCache(model, method="auto", device_memory="1MiB", max_length=20)
    ids = padded_batch([19], vocab_size=256)[0]
    with pytest.raises(ValueError, match="at most 19 fed"):  # model.generate past max_length - 1 fed tokens
        model(input_ids=torch.cat((ids, ids[:, :1]), 1), past_key_values=cache, use_cache=True)


def test_model_on_several_devices_is_refused(tiny):
    model = tiny("llama")
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": "cpu"}
    with pytest.raises(ValueError, match=r"spread over several devices \(cpu, cuda:0, cuda:1\)"):
        kvtier.KVCache(model, method="offload")
    model.hf_device_map = {"": "cpu"}  # one device: fine
    kvtier.KVCache(model, method="offload")


@pytest.mark.embedded
def test_auto_finds_the_needle_in_40_mib(embedded):
    """The issue's bar: a 3k-token needle prompt on the embedded model (full: about 132 MiB) with 40 MiB of device
    memory; auto answers with the passphrase and stays within the budget."""
    from kvtier.evaluation.needle import needle_prompt

    model, tokenizer = embedded
    ids = needle_prompt(tokenizer, 3000, 0.5, "violet-anchor-4127")
    new = 24
    length = ids.shape[1] + new
    full = predict(ModelSpec.from_model(model), "full", {}, length, 1).device_bytes
    assert full > 120 * MiB
    cache = kvtier.KVCache(model, method="auto", device_memory="40MiB", max_length=length)
    out = kvtier.generate(model, ids, cache=cache, max_new_tokens=new)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    stats = cache.stats()
    assert "violet-anchor-4127" in answer, answer
    assert stats["device_kv_bytes"] <= 40 * MiB
    assert stats["device_kv_bytes"] == stats["predicted_device_kv_bytes"]
    assert stats["auto_choice"] in ("offload", "kvpr")  # exact methods come first
