"""kvtier's own decode loop (`generate`) and teacher-forced decode scoring (`score`, `forced_logits`).

All of them prefill in chunks (bounded activation memory, a progress bar on long prompts) and then decode one
token per forward through the method with a `Decoder`, so what they measure is what generation sees. The
benchmark (kvtier.bench.harness) times the same `Decoder.step`.

The pieces are public for the benchmark and the tests: `prefill`, `Decoder`, and the single forwards it is made
of, `positions`, `decode_step`, and SpeCache's `lookahead` and `speculative_step`.
"""

from __future__ import annotations

import contextlib
import numbers

import torch
from tqdm.auto import tqdm

from .cache import KVCache, make_cache

PREFILL_CHUNK = 2048


def _as_batch(ids, name: str) -> torch.Tensor:
    if isinstance(ids, str):
        raise TypeError(f"{name} must be token ids, got a string; tokenize it first "
                        "(tokenizer(text, return_tensors='pt').input_ids)")
    if not isinstance(ids, torch.Tensor):
        ids = torch.tensor(ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise ValueError(f"{name} must be [batch, tokens] token ids; got shape {tuple(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(ids.shape)}); give at least one token per sequence")
    return ids


def _check_model(model) -> None:
    """A causal language model: the loops read its logits (a base model without its head would fail only after the
    whole prefill)."""
    if not isinstance(model, torch.nn.Module) or getattr(model, "config", None) is None:
        raise TypeError(f"model must be a transformers model (AutoModelForCausalLM, or kvtier.load()), got "
                        f"{type(model).__name__}; the arguments are (model, input_ids, ...)")
    head = getattr(model, "get_output_embeddings", None)
    if head is None or head() is None:
        raise TypeError(f"{type(model).__name__} has no language-model head, so it gives no logits; load the model "
                        "with AutoModelForCausalLM (or kvtier.load())")


def _token_batch(model, ids, name: str) -> torch.Tensor:
    """`ids` as [batch, tokens] integer ids, each in the model's vocabulary: an id outside it would fail in the
    embedding lookup as an IndexError (on CUDA, a device-side assert that ends the process's CUDA use)."""
    ids = _as_batch(ids, name)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    vocab = model.get_input_embeddings().num_embeddings
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"{name} holds token id {low if low < 0 else high}, outside the model's vocabulary of "
                         f"{vocab} ids (0..{vocab - 1}); were they made by this model's tokenizer?")
    return ids.to(_model_device(model))


def _padding_mask(mask, ids: torch.Tensor) -> torch.Tensor:
    """The attention mask of `ids`, checked: same shape, and left padding only (a sequence whose last position is
    padding would have its next token predicted from a pad)."""
    mask = _as_batch(mask, "attention_mask").to(ids.device)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} does not match the ids {tuple(ids.shape)}")
    ends_in_padding = (mask[:, -1] == 0).nonzero().flatten().tolist()
    if ends_in_padding:
        raise ValueError(f"attention_mask ends in padding (0) for sequence(s) {ends_in_padding}: kvtier takes left "
                         "padding only (tokenizer.padding_side = 'left'), so that every sequence ends in a real token")
    return mask


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _cache_for(model, cache, method, options) -> KVCache:
    """The ready cache given, or a new one of `method` (None: "full")."""
    if cache is not None:
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a kvtier.KVCache, got {type(cache).__name__}; make one with "
                            "kvtier.KVCache(model, method=...), or give method= and no cache")
        if options:
            raise ValueError(f"options {sorted(options)} were given with a ready cache; pass them to KVCache")
        if method is not None and method != cache.method.name and not (method == "auto" and cache.auto):
            raise ValueError(f"method={method!r} was given with a ready {cache.method.name!r} cache, which decodes "
                             "with its own method; leave method out, or make the cache with that method")
        cache.check_usable()  # a cache whose step was interrupted: CacheBrokenError
        return cache
    return make_cache(model, "full" if method is None else method, **options)


def _empty(cache: KVCache) -> KVCache:
    if cache.method.lengths[0]:
        raise ValueError("the cache given already holds tokens; make a new KVCache per prompt")
    return cache


def cached_prefix(cache: KVCache, input_ids: torch.Tensor) -> int:
    """How many leading tokens of `input_ids` the cache already holds (transformers' prefix reuse: input_ids is
    the whole sequence). ValueError when they are not the cache's tokens or nothing new is left to feed."""
    return cache.check_prefix(input_ids)


@torch.inference_mode()
def prefill(model, cache: KVCache, input_ids, attention_mask=None, chunk: int | None = None,
            progress: bool = False, past: int = 0) -> torch.Tensor:
    """Run the prompt through the model into `cache` (a KVCache, or any transformers Cache) in chunks of `chunk`
    tokens (default PREFILL_CHUNK); returns the last position's logits [b, vocab]. The first `past` tokens of
    input_ids are in the cache already (a prefix reused) and are not fed again."""
    _check_model(model)
    input_ids = _token_batch(model, input_ids, "input_ids")
    if attention_mask is not None:
        attention_mask = _padding_mask(attention_mask, input_ids)
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be an int >= 1 (tokens per forward) or None, got {chunk!r}")
    return _prefill(model, cache, input_ids, attention_mask, chunk or PREFILL_CHUNK, progress, past)


def _prefill(model, cache, input_ids: torch.Tensor, attention_mask, chunk: int, progress: bool,
             past: int) -> torch.Tensor:
    """`prefill` of ids and mask already checked (generate and score check them once, before any work)."""
    n = input_ids.shape[1]
    kvtier_cache = isinstance(cache, KVCache)  # any other transformers Cache (the benchmark's baselines) works too
    held = cache.method.lengths[0] if kvtier_cache else cache.get_seq_length()
    if past != held or past >= n:
        # feeding from another token than the cache's next would store tokens at the wrong positions, silently
        raise ValueError(f"the cache holds {held} tokens and past={past!r}, with input_ids of {n} tokens: give the "
                         f"whole sequence as input_ids and past={held} (the cache's tokens, not fed again), with at "
                         "least one token after them; or use a new cache")
    logits = None
    name = cache.method.name if kvtier_cache else type(cache).__name__
    bar = tqdm(total=n - past, desc=f"prefill ({name})", unit="tok", disable=not progress, leave=False)
    with cache.prefilling() if kvtier_cache else contextlib.nullcontext():
        for start in range(past, n, chunk):
            stop = min(n, start + chunk)
            mask = None if attention_mask is None else attention_mask[:, :stop]
            out = model(input_ids=input_ids[:, start:stop], attention_mask=mask, past_key_values=cache,
                        position_ids=positions(attention_mask, start, stop, input_ids.device), use_cache=True,
                        logits_to_keep=1)
            logits = out.logits[:, -1].float()
            bar.update(stop - start)
    bar.close()
    return logits


def positions(attention_mask, start: int, stop: int, device) -> torch.Tensor:
    """Position ids [b, stop - start] of tokens start..stop-1, as transformers' generate computes them: left
    padding (zeros in `attention_mask`) does not advance positions; no mask means no padding."""
    if attention_mask is None:
        return torch.arange(start, stop, device=device).unsqueeze(0)
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 1)
    return pos[:, start:stop]


def speculates(cache) -> bool:
    """Whether kvtier.generate decodes through `cache` with the two-token speculative step (SpeCache's)."""
    return isinstance(cache, KVCache) and cache.method.supports_speculation


def decode_step(model, cache, token, mask, position):
    """Feed one token per sequence (`token` [b]) after the cache's tokens; `mask` is the attention mask so far
    (None: no padding) and `position` the positions [b, 1] of the last token fed. Returns the next logits
    [b, vocab] (float32) and the mask and positions extended by this token."""
    if mask is not None:
        mask = _extended(mask)
    position = position + 1
    out = model(input_ids=token[:, None], attention_mask=mask, past_key_values=cache, position_ids=position,
                use_cache=True)
    return out.logits[:, -1].float(), mask, position


class Decoder:
    """Decoding after a prefill of `prompt` ([b, n] ids): `step(token)` feeds one token per sequence ([b]) and
    returns the logits [b, vocab] (float32) that predict the next.

    The one decode loop of generate, score, forced_logits and the benchmark. Through a method that speculates
    (SpeCache; `speculate=None` asks the cache) each step feeds the token beside a guess of the next one and keeps
    only the token (`speculative_step`); the first step begins with the lookahead pass that makes the first
    guess. Teacher forcing passes speculate=False: it knows the next token, so a guess would measure nothing.
    """

    def __init__(self, model, cache, prompt: torch.Tensor, attention_mask=None, speculate: bool | None = None):
        self.model, self.cache = model, cache
        self.speculative = speculates(cache) if speculate is None else speculate
        if self.speculative and attention_mask is None:  # the two-token step extends a mask
            attention_mask = torch.ones_like(prompt)
        self.mask = attention_mask
        self.position = positions(attention_mask, prompt.shape[1] - 1, prompt.shape[1], prompt.device)
        self.guess = None  # SpeCache's guess of the token after the next one fed

    def step(self, token: torch.Tensor) -> torch.Tensor:
        if not self.speculative:
            logits, self.mask, self.position = decode_step(self.model, self.cache, token, self.mask, self.position)
            return logits
        position = self.position + 1
        if self.guess is None:
            self.guess = lookahead(self.model, self.cache, token, self.mask, position)
        logits, self.guess = _speculative_forward(self.model, self.cache, token, self.guess, self.mask, position)
        self.mask, self.position = _extended(self.mask), position
        return logits


def _extended(mask: torch.Tensor) -> torch.Tensor:
    """The attention mask with one more attended token."""
    return torch.cat((mask, mask.new_ones((mask.shape[0], 1))), dim=1)


def _eos_and_pad(model, eos_token_id, pad_token_id, device) -> tuple[torch.Tensor, int]:
    """The ids that end a sequence and the id that pads it afterwards, as model.generate takes them: given, else
    the model's generation config; without a pad id, the first end id (else 0)."""
    gen_config = getattr(model, "generation_config", None)
    eos = eos_token_id if eos_token_id is not None else getattr(gen_config, "eos_token_id", None)
    eos = _id_list(eos, "eos_token_id")
    pad = pad_token_id if pad_token_id is not None else getattr(gen_config, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    else:
        pad = _id_list(pad, "pad_token_id")
        if len(pad) != 1:
            raise ValueError(f"pad_token_id must be one token id, got {pad_token_id!r}")
        pad = pad[0]
    return torch.tensor(eos, dtype=torch.long, device=device), pad


def _id_list(value, name: str) -> list[int]:
    """A token id, or a list or tensor of them (None: none), as a list of ints."""
    if value is None:
        return []
    items = value.flatten().tolist() if isinstance(value, torch.Tensor) else value
    items = [items] if isinstance(items, (numbers.Integral, str)) else items
    try:
        items = list(items)
    except TypeError:
        items = [items]
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in items):
        raise ValueError(f"{name} must be a token id (an int) or a list of them, got {value!r}")
    return [int(v) for v in items]


def _sampler(model, do_sample: bool, temperature, top_k, top_p, seed, device):
    """The function that picks each sequence's next token from logits [b, vocab]: argmax, or with `do_sample` a
    draw after temperature, top-k and top-p, as model.generate does (unset values: the model's generation
    config, else transformers' defaults 1.0, 50, 1.0). `seed` makes the draws reproducible."""
    if not do_sample:
        given = [f"{k}={v!r}" for k, v in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                                           ("seed", seed)) if v is not None]
        if given:  # they would be ignored: the answer is greedy
            raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for sampling: add "
                             "do_sample=True (without it decoding is greedy)")
        return lambda logits: logits.argmax(-1)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    config = getattr(model, "generation_config", None)
    defaults = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
    given = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    value = {k: v if v is not None else (getattr(config, k, None) if getattr(config, k, None) is not None
                                          else defaults[k]) for k, v in given.items()}
    if isinstance(value["temperature"], bool) or not isinstance(value["temperature"], (int, float)) \
            or value["temperature"] <= 0:
        raise ValueError(f"temperature must be a number > 0, got {value['temperature']!r} (do_sample=False for greedy)")
    if isinstance(value["top_k"], bool) or not isinstance(value["top_k"], int) or value["top_k"] < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: off), got {value['top_k']!r}")
    if isinstance(value["top_p"], bool) or not isinstance(value["top_p"], (int, float)) or not 0 < value["top_p"] <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {value['top_p']!r}")
    warpers = LogitsProcessorList()
    if value["temperature"] != 1.0:
        warpers.append(TemperatureLogitsWarper(float(value["temperature"])))
    if value["top_k"]:
        warpers.append(TopKLogitsWarper(value["top_k"]))
    if value["top_p"] < 1.0:
        warpers.append(TopPLogitsWarper(float(value["top_p"])))
    generator = None
    if seed is not None:  # without a seed, torch's global generator draws, as in model.generate
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))

    def sample(logits):
        probs = torch.softmax(warpers(None, logits), dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return sample


@torch.inference_mode()
def generate(model, input_ids, method: str | None = None, max_new_tokens: int = 64, attention_mask=None,
             cache: KVCache | None = None, progress: bool = False, eos_token_id=None, pad_token_id=None,
             do_sample: bool = False, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, streamer=None, **options) -> torch.Tensor:
    """Decoding through a kvtier method; returns input_ids + new ids, like `model.generate`.

    Greedy, or with `do_sample` sampled after `temperature`, `top_k` and `top_p` (`seed` for reproducible
    draws). `streamer` (a transformers streamer, e.g. TextStreamer) gets input_ids, then each new token.
    Sequences stop at the end-of-sequence token (then padded with the pad token) as in `model.generate`;
    `method` (default "full") and extra keyword arguments, the method's options (`budget=...`), make a new cache;
    a ready `cache` decodes with its own.

    `cache` may already hold tokens (prefilled, forked or loaded): then input_ids is the whole sequence, as with
    transformers' prefix reuse, and must start with the cache's tokens (`cache.token_ids`), which are not fed
    again; attention_mask, when given, covers the whole sequence too.
    """
    _check_model(model)
    input_ids = _token_batch(model, input_ids, "input_ids")
    if not isinstance(max_new_tokens, numbers.Integral) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    if attention_mask is not None:
        attention_mask = _padding_mask(attention_mask, input_ids)
    pick = _sampler(model, do_sample, temperature, top_k, top_p, seed, input_ids.device)
    cache = _cache_for(model, cache, method, options)
    past = cached_prefix(cache, input_ids)
    total = input_ids.shape[1] + max_new_tokens
    if total > cache.spec.max_positions:
        raise ValueError(f"prompt of {input_ids.shape[1]} tokens + {max_new_tokens} new tokens exceeds the "
                         f"model's maximum of {cache.spec.max_positions} positions")
    cache.reserve(total)
    eos, pad = _eos_and_pad(model, eos_token_id, pad_token_id, input_ids.device)

    if streamer is not None:
        streamer.put(input_ids.cpu())
    try:
        logits = _prefill(model, cache, input_ids, attention_mask, PREFILL_CHUNK, progress, past)
        decoder = Decoder(model, cache, input_ids, attention_mask)
        tokens = [input_ids]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        desc = f"decode ({cache.method.name}{', speculative' if decoder.speculative else ''})"
        for step in tqdm(range(max_new_tokens), desc=desc, unit="tok", disable=not progress, leave=False):
            nxt = pick(logits)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)  # a finished sequence is padded
            tokens.append(nxt[:, None])
            if streamer is not None:
                streamer.put(nxt.cpu())
            if eos.numel():
                done |= torch.isin(nxt, eos)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            logits = decoder.step(nxt)
        return torch.cat(tokens, dim=1)
    finally:
        if streamer is not None:
            streamer.end()


def lookahead(model, cache, real, mask, position):
    """SpeCache's lookahead pass: feed x_1 (`real` [b]) alone at `position`, storing nothing, which starts the
    fetch for it; returns the guess x^_2 [b] (the argmax) that the first speculative_step feeds beside x_1."""
    with cache.feeding("lookahead"):
        out = model(input_ids=real[:, None], attention_mask=_extended(mask), past_key_values=cache,
                    position_ids=position, use_cache=True)
    return out.logits[:, -1].argmax(-1)


def _speculative_forward(model, cache, real, guess, mask, position):
    """Feed [x_t, x^_{t+1}] at `position` and the next, keep x_t; returns the logits of x_{t+1} [b, vocab] and the
    next guess (always the argmax: it only chooses what to fetch)."""
    with cache.feeding("speculative"):
        out = model(input_ids=torch.stack((real, guess), 1), attention_mask=_extended(_extended(mask)),
                    past_key_values=cache, position_ids=torch.cat((position, position + 1), 1), use_cache=True)
    return out.logits[:, -2].float(), out.logits[:, -1].float().argmax(-1)


def speculative_step(model, cache, real, guess, mask, position):
    """SpeCache's greedy two-token step: feed [x_t, x^_{t+1}] (`real`, `guess`) at `position`, keep x_t; returns
    x_{t+1}, the next guess, and the extended mask and positions, in the order it takes them (a loop can feed them
    back)."""
    logits, guess = _speculative_forward(model, cache, real, guess, mask, position)
    return logits.argmax(-1), guess, _extended(mask), position + 1


def _teacher_forced(model, context_ids, target_ids, method, attention_mask, cache, progress, options):
    """Yields, for each target in turn, the logits [b, vocab] that predict it; feeds the target after."""
    _check_model(model)
    context_ids = _token_batch(model, context_ids, "context_ids")
    target_ids = _token_batch(model, target_ids, "target_ids")
    if target_ids.shape[0] != context_ids.shape[0]:
        raise ValueError(f"context batch {context_ids.shape[0]} != target batch {target_ids.shape[0]}")
    cache = _empty(_cache_for(model, cache, method, options))
    total = context_ids.shape[1] + target_ids.shape[1]
    if total > cache.spec.max_positions:
        raise ValueError(f"context + targets = {total} tokens exceeds the model's maximum of "
                         f"{cache.spec.max_positions} positions")
    cache.reserve(total)
    mask = None if attention_mask is None else _padding_mask(attention_mask, context_ids)
    logits = _prefill(model, cache, context_ids, mask, PREFILL_CHUNK, progress, 0)
    decoder = Decoder(model, cache, context_ids, mask, speculate=False)
    n_targets = target_ids.shape[1]
    for i in tqdm(range(n_targets), desc=f"score ({cache.method.name})", unit="tok", disable=not progress,
                  leave=False):
        yield logits, target_ids[:, i]
        if i < n_targets - 1:
            logits = decoder.step(target_ids[:, i])


@torch.inference_mode()
def score(model, context_ids, target_ids, method: str | None = None, attention_mask=None,
          cache: KVCache | None = None, progress: bool = False, **options) -> torch.Tensor:
    """Teacher-forced negative log-likelihoods of `target_ids` after `context_ids`, decoded one token at a time.

    Returns float32 [batch, targets]: entry i is -log p(target_i | context, target_<i) as the method sees it.
    """
    steps = _teacher_forced(model, context_ids, target_ids, method, attention_mask, cache, progress, options)
    return torch.stack([torch.nn.functional.cross_entropy(logits, target, reduction="none")
                        for logits, target in steps], dim=1)


@torch.inference_mode()
def forced_logits(model, context_ids, target_ids, method: str | None = None, attention_mask=None,
                  cache: KVCache | None = None, progress: bool = False, **options) -> torch.Tensor:
    """The float32 logits [batch, targets, vocab] that predict each target, teacher-forced as `score` is."""
    steps = _teacher_forced(model, context_ids, target_ids, method, attention_mask, cache, progress, options)
    return torch.stack([logits for logits, _ in steps], dim=1)


__all__ = ["Decoder", "generate", "score", "forced_logits", "prefill", "cached_prefix", "positions", "decode_step",
           "lookahead", "speculative_step", "speculates"]
