"""An interrupted step (Ctrl-C or any exception mid-forward) never leaks into later forward passes, and the
interrupted cache refuses further use.

The interrupts go through public hook points only (KVCache.update, the registered attention function, a
method's append / attend / observe), so these tests hold whatever a method does inside.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.modeling_utils import AttentionInterface

import kvtier
from kvtier.cache import ATTN_NAME, CacheBrokenError, KVCache
from kvtier.methods import METHOD_REGISTRY

# Small enough that the approximate methods select, quantize and page on a 40-token prompt (options a method no
# longer has are left out).
SMALL = {"freekv": dict(budget=32, dense_layers=0, page_size=4, sink=8, window=8),
         "specache": dict(group_size=8, residual=8, topk=4)}
LAYERS = 3  # the tiny models' depth; interrupts hit the first and the last layer
HOOKS = ("update:before", "update:after", "append:before", "append:after", "attend:before", "attend:after",
         "attention:before", "attention:after", "observe:before", "observe:after")


def options(method: str) -> dict:
    return {k: v for k, v in SMALL.get(method, {}).items() if k in METHOD_REGISTRY[method].defaults}


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


PROMPT, STEP, NEXT, PROBE = ids(40, 0), ids(1, 1), ids(1, 2), ids(8, 3)


@torch.inference_mode()
def forward(model, cache, tokens) -> torch.Tensor:
    return model(input_ids=tokens, past_key_values=cache, use_cache=True).logits[:, -1]


@torch.inference_mode()
def plain(model, how: str) -> torch.Tensor:
    """The probe's logits without a KVCache: with use_cache=False ("none"), or with a DynamicCache ("dynamic")."""
    if how == "none":
        return model(input_ids=PROBE, use_cache=False).logits
    return model(input_ids=PROBE, past_key_values=DynamicCache(), use_cache=True).logits


class Trap:
    """Wraps a hook point; raises `error` when the wrapped call is for layer `layer` (before or after it runs)."""

    def __init__(self):
        self.layer = self.error = None
        self.fired = False

    def arm(self, layer: int, error: BaseException):
        self.layer, self.error, self.fired = layer, error, False

    def disarm(self):
        self.layer = self.error = None

    def check(self, layer: int):
        if self.error is not None and layer == self.layer:
            error, self.error, self.fired = self.error, None, True
            raise error

    def wrap(self, original, layer_of, when: str):
        def wrapper(*args, **kwargs):
            if when == "before":
                self.check(layer_of(args, kwargs))
            out = original(*args, **kwargs)
            if when == "after":
                self.check(layer_of(args, kwargs))
            return out

        return wrapper


def install(monkeypatch, hook: str, method: str) -> Trap:
    point, when = hook.split(":")
    trap = Trap()
    cls = METHOD_REGISTRY[method]
    if point == "update":
        layer_of = lambda a, k: a[3] if len(a) > 3 else k["layer_idx"]  # noqa: E731 (self, key, value, layer)
        monkeypatch.setattr(KVCache, "update", trap.wrap(KVCache.update, layer_of, when))
    elif point in ("append", "attend", "observe"):
        monkeypatch.setattr(cls, point, trap.wrap(getattr(cls, point), lambda a, k: a[1], when))
    else:
        original = AttentionInterface._global_mapping[ATTN_NAME]
        monkeypatch.setitem(AttentionInterface._global_mapping, ATTN_NAME,
                            trap.wrap(original, lambda a, k: a[0].layer_idx, when))
    return trap


def stays_usable(hook: str, layer: int) -> bool:
    """Interrupts that leave a whole step or none: before layer 0's update, after the last layer's attention."""
    return (hook == "update:before" and layer == 0) or (hook == "attention:after" and layer == LAYERS - 1)


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("method", kvtier.METHODS)
def test_interrupt_at_every_hook_point(tiny, monkeypatch, method, hook):
    if hook.startswith("observe") and not getattr(METHOD_REGISTRY[method], "needs_layer_inputs", False):
        pytest.skip(f"{method} does not observe layer inputs")
    model = tiny("llama")
    kvtier.KVCache(model)  # the model runs kvtier attention from here on, with or without a KVCache
    reference = {how: plain(model, how) for how in ("none", "dynamic")}
    # what an uninterrupted cache gives: prompt, then two decode steps
    clean = KVCache(model, method=method, **options(method))
    clean_logits = [forward(model, clean, PROMPT), forward(model, clean, STEP), forward(model, clean, NEXT)]
    trap = install(monkeypatch, hook, method)
    case = 0
    for phase in ("prefill", "decode"):
        for layer in (0, LAYERS - 1):
            error = (KeyboardInterrupt if case % 2 else RuntimeError)(f"interrupt {case}")
            case += 1
            where = f"{method} {hook} layer {layer} during {phase}"
            cache = KVCache(model, method=method, **options(method))
            if phase == "decode":
                forward(model, cache, PROMPT)
            trap.arm(layer, error)
            with pytest.raises(type(error), match=str(error)):
                forward(model, cache, PROMPT if phase == "prefill" else STEP)
            trap.disarm()
            assert trap.fired, where

            # (1) nothing of the interrupted step leaks: the next plain forward is exact (each hook point sees
            # both kinds, across its cases)
            how = ("none", "dynamic")[case % 2]
            assert torch.equal(plain(model, how), reference[how]), f"{where}: the next forward ({how}) changed"

            # (2) the interrupted cache refuses every further use, or (a whole step or none) continues exactly
            if not stays_usable(hook, layer):
                assert cache.broken, where
                with pytest.raises(CacheBrokenError, match="Make a new KVCache"):
                    forward(model, cache, NEXT)
                with pytest.raises(CacheBrokenError, match="broken"), torch.inference_mode():
                    model.generate(NEXT, attention_mask=torch.ones_like(NEXT), past_key_values=cache,
                                   max_new_tokens=2, do_sample=False)
                with pytest.raises(CacheBrokenError, match="broken"):
                    kvtier.generate(model, PROMPT, cache=cache, max_new_tokens=2)
                assert "broken" in repr(cache)
                continue
            assert cache.broken is None, where
            done = (phase == "decode") + (hook == "attention:after")  # the steps the cache holds
            if phase == "prefill" and hook == "update:before":
                steps = [PROMPT, STEP, NEXT]
            else:
                steps = [PROMPT, STEP, NEXT][done:]
            for i, tokens in enumerate(steps, start=3 - len(steps)):
                assert torch.equal(forward(model, cache, tokens), clean_logits[i]), f"{where}: step {i} differs"


def test_stale_cache_never_serves_another_forward(tiny_pair):
    """The issue's case: an exception between KVCache.update and kvtier's attention; the model's next forward
    (no cache, or a DynamicCache) must not attend over the interrupted cache."""
    ref, model = tiny_pair("qwen3")
    cache = KVCache(model, method="offload")
    original = AttentionInterface._global_mapping[ATTN_NAME]

    def interrupted(module, *args, **kwargs):
        raise KeyboardInterrupt

    AttentionInterface._global_mapping[ATTN_NAME] = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            forward(model, cache, PROMPT)
    finally:
        AttentionInterface._global_mapping[ATTN_NAME] = original
    with torch.inference_mode():
        want = ref(input_ids=PROBE, use_cache=False).logits
    for how in ("none", "dynamic"):
        torch.testing.assert_close(plain(model, how), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(CacheBrokenError, match="stopped part-way, at layer 0"):
        forward(model, cache, PROMPT)


def test_broken_cache_refuses_reuse(tiny, monkeypatch):
    """Interrupted at layer 1 of a decode step: the layers hold [41, 41, 40] tokens; every entry point refuses,
    names the lengths and says to make a new cache; stats stay readable."""
    model = tiny("llama")
    cache = KVCache(model, method="full")
    forward(model, cache, PROMPT)
    trap = install(monkeypatch, "attend:after", "full")
    trap.arm(1, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        forward(model, cache, STEP)
    assert cache.method.lengths == [41, 41, 40]
    for use in (lambda: forward(model, cache, NEXT),
                lambda: model.generate(NEXT, attention_mask=torch.ones_like(NEXT), past_key_values=cache,
                                       max_new_tokens=2, do_sample=False),
                lambda: kvtier.generate(model, PROMPT, cache=cache, max_new_tokens=2),
                lambda: kvtier.score(model, PROMPT, STEP, cache=cache),
                lambda: cache.reserve(64)):
        with pytest.raises(CacheBrokenError) as info, torch.inference_mode():
            use()
        message = str(info.value)
        assert "[41, 41, 40]" in message and "Make a new KVCache" in message, message
    assert cache.stats()["tokens"] == 41
    # a new cache on the same model works
    fresh = KVCache(model, method="full")
    forward(model, fresh, PROMPT)
    assert fresh.broken is None
