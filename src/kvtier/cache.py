"""The only module that speaks transformers' cache and attention APIs.

`KVCache` is a `transformers.Cache`. The model's attention module calls `cache.update(k, v, layer)`: the
cache hands the new keys and values to the method and returns them unchanged. The model then calls its
attention function; kvtier registers its own ("kvtier"), which takes the query and asks the method for
the output. A registered mask function passes the 2D padding mask through instead of building a 4D one:
the method knows which positions it attends over, transformers does not.

The hand-off from `update` to the attention call travels on the keys themselves: `update` tags the key tensor it
returns with (a weak reference to) the cache, and the attention function serves a layer from a cache only when
its `key` argument carries that tag. Nothing outlives a forward pass outside the cache: after an exception the
next forward (any cache, or none) computes its keys afresh, untagged. A forward pass through a `KVCache` is one
step: layer 0's update to the last layer's attention. A step that stops part-way (an exception, Ctrl-C) leaves
the layers holding different tokens, so the cache is marked broken and refuses every further use.
"""

from __future__ import annotations

import contextlib
import weakref
from pathlib import Path

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from .attention import causal_attention
from .methods import MethodSpec, method_class, resolve_options
from .models import ModelSpec, attention_modules, kv_projectors

ATTN_NAME = "kvtier"

# Attribute that KVCache.update sets on the key tensor it returns: a weak reference to the cache. The attention
# call of the same layer receives that very tensor as `key`; keys of any other forward pass never carry it.
_TAG = "_kvtier_cache"


AUTO = "auto"  # KVCache(method=AUTO, device_memory=...): kvtier.auto chooses the method


def check_one_device(model) -> None:
    """kvtier keeps all of a model's KV state on one device (the one its attention reads from): a model spread over
    several devices (accelerate's device_map, with weights on several GPUs, the CPU or disk) is refused here rather
    than failing with a device mismatch deep in a decode step."""
    def name(device) -> str:  # device_map values are GPU indices, "cuda:1", "cpu" or "disk"
        device = f"cuda:{device}" if isinstance(device, int) else str(device)
        return "cuda:0" if device == "cuda" else device

    device_map = getattr(model, "hf_device_map", None)
    if isinstance(device_map, dict) and device_map:
        placed = {name(d) for d in device_map.values()}
    else:
        placed = {name(p.device) for p in model.parameters()}
    if len(placed) > 1:
        raise ValueError(f"this model is spread over several devices ({', '.join(sorted(placed))}); kvtier keeps "
                         "every layer's KV state on one device. Load it on one device (device_map={'': 0} or "
                         ".to('cuda')) and fit long contexts with method='auto', device_memory=...")


class CacheBrokenError(RuntimeError):
    """A KVCache whose step was interrupted (or misused) refuses further use: make a new one."""


def _kvtier_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    ref = getattr(key, _TAG, None)
    cache = ref() if ref is not None else None
    scaling = module.head_dim ** -0.5 if scaling is None else scaling
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        raise NotImplementedError("kvtier attention takes a 2D padding mask; custom 4D attention masks are "
                                  "not supported")
    if cache is None:
        # The model runs without a KVCache (use_cache=False, or another Cache): plain causal attention.
        n, t = key.shape[2], query.shape[2]
        return causal_attention(query, key, value, scaling, attention_mask, q_offset=n - t), None
    return cache._attend(module, query, attention_mask, scaling), None


def _kvtier_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """The padding mask over the kv_length positions [kv_offset, kv_offset + kv_length), or None without one.

    A mask of all ones is passed on too: checking would read it back to the host in every decode step."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, kv_offset:kv_offset + kv_length].to(torch.bool)
    if mask.shape[1] != kv_length:
        raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions but the cache and input "
                         f"span {kv_offset + kv_length}; pass the mask of the whole sequence so far")
    return mask


AttentionInterface.register(ATTN_NAME, _kvtier_attention)
AttentionMaskInterface.register(ATTN_NAME, _kvtier_mask)


def _observe_attention_input(module, args, kwargs):
    """Forward pre-hook on attention modules: hands the layer input to methods that recompute KV from it."""
    cache = kwargs.get("past_key_values")
    if isinstance(cache, KVCache) and cache._observes_inputs:
        layer = module.layer_idx
        cache._enter(layer)
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        with cache._guard(f"observing layer {layer}'s input"):
            cache.method.observe(layer, hidden, cos, sin)


def _refuse_broken_cache(module, args, kwargs):
    """Forward pre-hook on the model: a forward pass starts between steps, where a step left open means the last
    one stopped part-way. Refuses before the model does any work (model.generate would otherwise slice its input
    by the broken cache's length)."""
    cache = kwargs.get("past_key_values")
    if isinstance(cache, KVCache):
        cache.check_usable()
        ids = kwargs["input_ids"] if "input_ids" in kwargs else (args[0] if args else None)
        cache._check_feed(ids, kwargs)
        # the ids this step feeds; the cache keeps them when the step completes (None: fed embeddings)
        cache._incoming = ids


def _install_model_hook(model) -> None:
    if not getattr(model, "_kvtier_model_hook", False):
        model.register_forward_pre_hook(_refuse_broken_cache, with_kwargs=True)
        model._kvtier_model_hook = True
    if callable(getattr(type(model), "_prefill", None)) and not isinstance(model.__dict__.get("_prefill"),
                                                                           _PrefillCheck):
        model._prefill = _PrefillCheck(model)


class _PrefillCheck:
    """model.generate's first step (transformers' GenerationMixin._prefill), which sees the whole input_ids. Given a
    KVCache holding tokens, transformers feeds only the tokens past the cache's length: input_ids must start with the
    cached ones (a cache reused for another prompt answered from the old one, silently). As transformers does, ids
    are the whole sequence when they are as long as the attention mask; shorter, they are the new tokens only.

    An object holding its model, not a closure or a bound method: a deepcopy, or a pickle (torch.save), of the model
    carries it along, bound to the copy."""

    def __init__(self, model):
        self.model = model

    def __call__(self, input_ids, generation_config, model_kwargs, *args, **kwargs):
        cache = model_kwargs.get("past_key_values")
        if (isinstance(cache, KVCache) and model_kwargs.get("inputs_embeds") is None
                and isinstance(input_ids, torch.Tensor)):
            mask = model_kwargs.get("attention_mask")
            mask_length = mask.shape[-1] if mask is not None else getattr(generation_config, "_mask_length", None)
            if mask_length == input_ids.shape[-1]:
                cache.check_usable()  # a broken cache says so first: its tokens are not what it holds
                cache.check_prefix(input_ids)
        return type(self.model)._prefill(self.model, input_ids, generation_config, model_kwargs, *args, **kwargs)


def _install_input_hooks(modules: dict) -> None:
    for module in modules.values():
        if not getattr(module, "_kvtier_input_hook", False):
            module.register_forward_pre_hook(_observe_attention_input, with_kwargs=True)
            module._kvtier_input_hook = True


class _LayerView(CacheLayerMixin):
    """What transformers sees of one layer: its length. The data lives in the method."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: "KVCache", layer: int):
        super().__init__()
        self._cache = weakref.proxy(cache)
        self.layer = layer
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("KVCache layers are updated through KVCache.update")

    def get_seq_length(self) -> int:
        return self._cache.method.lengths[self.layer]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self):
        raise NotImplementedError("a KVCache cannot be reset; make a new one")


class KVCache(Cache):
    """A transformers `Cache` whose keys and values are placed and moved by a kvtier method.

        cache = kvtier.KVCache(model, method="offload")
        model.generate(input_ids, attention_mask=mask, past_key_values=cache, max_new_tokens=64)
        cache.stats()

    Constructing it registers kvtier's attention function and switches `model` to it (the function falls
    back to plain attention when the model runs without a KVCache). One cache serves one model and one
    batch of sequences; make a new cache for a new prompt. A forward pass through the cache that stops part-way
    (an exception or Ctrl-C between layer 0's update and the last layer's attention) marks it broken: every
    later use raises `CacheBrokenError`; make a new cache.

    `method="auto"` with `device_memory=` ("6GiB", "40MiB", bytes) and `max_length=` chooses the method and options
    whose device KV state fits that budget for `batch` sequences (default 1; `kvtier.auto`), and `repr` and
    `stats()` say what and why. With a named method, `device_memory=` checks it against the budget. Either way the
    cache then refuses a larger batch or a longer sequence than it planned for. A model spread over several
    devices is refused.
    """

    def __init__(self, model, method: str = "full", max_length: int | None = None, device_memory=None,
                 batch: int | None = None, **options):
        if method != AUTO:
            method_class(method)  # unknown method: ValueError listing the valid ones
        self.spec = ModelSpec.from_model(model)  # unsupported family: NotImplementedError
        check_one_device(model)
        if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool)
                                       or max_length < 1):
            raise ValueError(f"max_length must be an int >= 1 (prompt + new tokens), got {max_length!r}")
        if max_length is not None and max_length > self.spec.max_positions:
            raise ValueError(f"max_length={max_length} (prompt + new tokens) exceeds the model's maximum of "
                             f"{self.spec.max_positions} positions (max_position_embeddings): shorten the prompt or "
                             "ask for fewer new tokens")
        self.auto, self.device_memory, self.predicted = None, None, None
        self.planned_batch, self.max_length = batch, max_length
        if method == AUTO or device_memory is not None or batch is not None:
            method, options = self._plan(method, device_memory, max_length, batch, options)
        cls = method_class(method)
        self.method = cls(self.spec, **options)  # unknown option: ValueError listing the valid ones
        if max_length is not None:  # buffers sized once, as kvtier.generate does from its own arguments
            self.method.reserve(max_length)
        self._config = model.config
        modules = attention_modules(model)
        self._modules = {layer: id(module) for layer, module in modules.items()}
        self._observes_inputs = getattr(cls, "needs_layer_inputs", False)
        if self._observes_inputs:
            self.method.attach(kv_projectors(model))
            _install_input_hooks(modules)
        _install_model_hook(model)
        if model.config._attn_implementation != ATTN_NAME:
            model.set_attn_implementation(ATTN_NAME)
        # The step's progress: the layer whose update comes next, and the layer updated whose attention has not
        # run yet. A step starts at layer 0 with nothing pending and ends when the last layer's attention ran.
        self._expect = 0
        self._pending: int | None = None
        self._broken: str | None = None  # why this cache refuses further use
        # The token ids the cache holds, as (ids, how many of them were kept) per forward: a step keeps a
        # reference to its input and nothing else (no op in the step); `token_ids` joins them when asked.
        self._token_chunks: list[tuple[torch.Tensor, int]] = []
        self._tokens_known = True  # False once a forward fed embeddings instead of ids
        self._incoming = None
        self._model = weakref.ref(model)  # for the fingerprint `save` writes
        super().__init__(layers=[_LayerView(self, i) for i in range(self.spec.num_layers)])

    def _plan(self, method: str, device_memory, max_length, batch, options: dict) -> tuple[str, dict]:
        """method="auto" (choose within device_memory), or an explicit method checked against device_memory."""
        from .auto import choose
        from .predict import predict
        from .sizes import format_bytes, parse_bytes

        what = "method='auto'" if method == AUTO else "device_memory="
        if device_memory is None:
            raise ValueError(f"{what} needs device_memory=, the device bytes the KV state may take (such as "
                             "'6GiB', '40MiB' or an int of bytes)" if method == AUTO else
                             "batch= is what device_memory= plans for: give device_memory= too, or leave batch out")
        if max_length is None:
            raise ValueError(f"{what} needs max_length= (prompt + new tokens) to know how much KV to plan for")
        self.device_memory = parse_bytes(device_memory, "device_memory")
        if batch is None:
            batch = 1
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1 (the sequences the cache will hold), got {batch!r}")
        if max_length < 3:
            raise ValueError(f"device_memory= plans for a generation: max_length must be >= 3, got {max_length}")
        self.planned_batch = batch
        if method == AUTO:
            profile = options.pop("profile", None)  # kvpr's hardware profile: lets auto weigh recomputation
            if options:
                raise ValueError(f"method='auto' chooses the method's options itself; got {sorted(options)}: give a "
                                 "method by name to set them")
            self.auto = choose(self.spec, self.device_memory, max_length, batch, profile=profile)
            self.predicted = self.auto.prediction
            chosen = dict(self.auto.options)
            if self.auto.method == "kvpr":
                chosen["profile"] = profile
            return self.auto.method, chosen
        self.predicted = predict(self.spec, method, options, max_length, batch)
        if self.predicted.device_bytes > self.device_memory:
            raise ValueError(f"{self.predicted.label} needs {format_bytes(self.predicted.device_bytes)} of device KV "
                             f"state for {batch} sequence(s) of {max_length} tokens, more than device_memory="
                             f"{format_bytes(self.device_memory)}; use method='auto', or a smaller budget or length")
        return method, options

    def _check_plan(self, batch: int, new_tokens: int) -> None:
        """With device_memory= the cache holds what it planned for: at most `batch` sequences, and max_length - 1
        tokens (the last new token of a generation is returned, never fed)."""
        if self.device_memory is None:
            return
        if batch > self.planned_batch:
            raise ValueError(f"this cache planned its device memory for a batch of {self.planned_batch}, got "
                             f"{batch} sequences; make it with batch={batch}")
        total = self.method.lengths[0] + new_tokens
        if total >= self.max_length:
            raise ValueError(f"this cache planned its device memory for max_length={self.max_length} (prompt + new "
                             f"tokens, so at most {self.max_length - 1} fed), and this forward would hold {total}; "
                             "make it with a larger max_length")

    def _check_feed(self, ids, kwargs: dict) -> None:
        """Refuse, before the model does any work, the forwards of model.generate that would store tokens wrongly:
        transformers slices its input_ids by the cache's length, and gets it wrong when they do not extend it."""
        if kwargs.get("use_cache") is False:
            # the model still stores into a cache it is given, and model.generate then feeds the whole sequence
            # at every step: every token would be stored again
            raise ValueError("use_cache=False was given with a KVCache: the model would still store every token it "
                             "is fed into the cache; leave use_cache at True, or leave past_key_values out")
        n = self.method.lengths[0]
        if not n or not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return
        if ids.shape[1] == 0:
            raise ValueError(f"this forward feeds no token: the cache already holds {n} tokens and input_ids holds "
                             f"no more (model.generate was given {n} or fewer?). Give the whole sequence: the "
                             "cached tokens (cache.token_ids) and then at least one new token")
        position = kwargs.get("position_ids")
        # Without padding (no mask), the fed tokens go after the n cached ones. Positions that end before n mean
        # model.generate was given no more tokens than the cache holds and fed them again. Checked on prompts only
        # (more than one token fed): a decode step reads nothing back to the host.
        if (kwargs.get("attention_mask") is None and isinstance(position, torch.Tensor) and ids.shape[1] > 1
                and int(position[..., -1].max()) < n):
            raise ValueError(f"input_ids ({ids.shape[1]} tokens fed at positions up to {int(position[..., -1].max())}) "
                             f"do not extend the {n} tokens the cache holds: they would be stored after them at "
                             "earlier positions (model.generate does this when its input_ids has no token past the "
                             "cache's). Give the whole sequence: the cached tokens (cache.token_ids) and then at least "
                             "one new token")

    def _check_inference_mode(self) -> None:
        """A cache used under torch.inference_mode() holds inference tensors, which torch lets nothing but
        inference mode update in place: say so before a forward outside it fails deep in a step."""
        if torch.is_inference_mode_enabled():
            self._inference_tensors = True
        elif self.__dict__.get("_inference_tensors"):
            raise RuntimeError("this KVCache was used under torch.inference_mode() (kvtier.generate, kvtier.prefill "
                               "and kvtier chat run there), so torch lets only inference mode update its buffers: "
                               "run this forward under `with torch.inference_mode():` too (model.generate included), "
                               "or save the cache and KVCache.load it (a loaded cache works in either mode)")

    # -- transformers Cache API -----------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self._enter(layer_idx)
        if self._config._attn_implementation != ATTN_NAME:
            if layer_idx:
                self._break(f"the model's attention implementation changed during a forward pass at layer "
                            f"{layer_idx}")
            raise RuntimeError(f"the model's attention implementation was changed to "
                               f"{self._config._attn_implementation!r}; KVCache needs {ATTN_NAME!r} "
                               f"(model.set_attn_implementation('{ATTN_NAME}'))")
        if layer_idx == 0:
            self._check_inference_mode()  # refuses before anything is stored: the cache stays usable
            self._check_length(key_states.shape[2])
            self._check_plan(key_states.shape[0], self.method.stored_count(key_states.shape[2]))
        self._pending = layer_idx  # from here on, stopping before this layer's attention breaks the cache
        with self._guard(f"storing layer {layer_idx}'s keys and values"):
            self.method.append(layer_idx, key_states, value_states)
        setattr(key_states, _TAG, weakref.ref(self))
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.method.lengths[layer_idx]

    def crop(self, max_length: int):
        raise NotImplementedError("KVCache cannot be cropped (assisted or speculative decoding through "
                                  "model.generate is not supported); use plain greedy or sampling")

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("beam search is not supported by KVCache; use num_beams=1")

    def batch_repeat_interleave(self, repeats: int):
        raise NotImplementedError("KVCache holds one batch of sequences; use num_return_sequences=1 or "
                                  "repeat the prompt in the batch")

    def batch_select_indices(self, indices):
        raise NotImplementedError("KVCache cannot drop sequences from its batch")

    def reset(self):
        raise NotImplementedError("a KVCache cannot be reset; make a new one")

    # -- kvtier -------------------------------------------------------------------------------------
    def _attend(self, module, query, padding_mask, scaling):
        layer = module.layer_idx
        if self._broken is not None:
            raise CacheBrokenError(self._broken_message())
        if self._pending != layer:
            self._break(f"attention for layer {layer} came without its cache update (pending: {self._pending})")
            raise CacheBrokenError(self._broken_message())
        if self._modules.get(layer) != id(module):
            self._break("a different model ran a forward pass through it")
            raise ValueError("this KVCache was made for a different model; make one KVCache per model")
        with self._guard(f"attention of layer {layer}"):
            out = self.method.attend(layer, query, padding_mask, scaling)
        if layer == self.spec.num_layers - 1:
            self._keep_tokens()
        self._expect = (layer + 1) % self.spec.num_layers
        self._pending = None  # last: an interrupt before it leaves the step open, and the cache is refused
        return out

    # -- the step's bookkeeping ---------------------------------------------------------------------------
    @property
    def broken(self) -> str | None:
        """Why this cache refuses further use (a step that stopped part-way), or None while it is usable.
        Asked between forward passes; an interrupt outside the cache's own calls shows as a step left open."""
        if self._broken is None and (self._pending is not None or self._expect != 0):
            self._break(self._stopped_at())
        return self._broken

    def check_usable(self) -> None:
        """Raise CacheBrokenError if a step through this cache stopped part-way (call it between forward passes)."""
        if self.broken is not None:
            raise CacheBrokenError(self._broken_message())

    def _stopped_at(self) -> str:
        at = self._pending if self._pending is not None else self._expect
        return f"a forward pass through it stopped part-way, at layer {at} of {self.spec.num_layers}"

    def _broken_message(self) -> str:
        return (f"this KVCache ({self.method.name}) is broken and cannot be used again: {self._broken}; its "
                f"layers hold {list(self.method.lengths)} tokens. Make a new KVCache and run the prompt again")

    def _break(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason

    @contextlib.contextmanager
    def _guard(self, what: str):
        """Any exception (Ctrl-C included) inside the block leaves the step half done: the cache is broken."""
        try:
            yield
        except BaseException as err:
            self._break(f"{what} was interrupted ({type(err).__name__}: {err})" if str(err) else
                        f"{what} was interrupted ({type(err).__name__})")
            raise

    def _enter(self, layer: int) -> None:
        """Check that `layer`'s update is the step's next event; anything else means a step stopped part-way."""
        if self._broken is not None:
            raise CacheBrokenError(self._broken_message())
        if self._pending is None and layer == self._expect:
            return
        if self._pending is not None and layer == self._pending + 1:
            # The last update's attention never reached kvtier: the model calling us runs another attention
            # function, so it would attend over the new tokens only. Refuse rather than answer wrongly.
            self._break(f"layer {self._pending} was stored by a model that does not run kvtier attention")
            raise ValueError(f"KVCache.update for layer {layer} came before kvtier attention ran for layer "
                             f"{self._pending}: this cache is used by a model that does not run kvtier attention "
                             "(a different model than the one it was made for?); make one KVCache per model")
        at = self._pending if self._pending is not None else self._expect
        if layer == 0:
            self._break(self._stopped_at())
        else:
            self._break(f"layer {layer} came when layer {at} was due")
        raise CacheBrokenError(self._broken_message())

    def _keep_tokens(self) -> None:
        ids, self._incoming = self._incoming, None
        if ids is None or not isinstance(ids, torch.Tensor):
            self._tokens_known = False
            self._token_chunks = []
        elif self._tokens_known:
            self._token_chunks.append((ids, self.method.stored_count(ids.shape[1])))

    @property
    def token_ids(self) -> torch.Tensor | None:
        """The token ids this cache holds, [batch, tokens] (None if a forward fed embeddings instead of ids).
        `kvtier.generate` checks a new prompt against them: the cached tokens must be its prefix."""
        if not self._tokens_known:
            return None
        if not self._token_chunks:
            return torch.zeros((self.method.batch or 1, 0), dtype=torch.long)
        if len(self._token_chunks) > 1 or self._token_chunks[0][1] != self._token_chunks[0][0].shape[1]:
            ids = torch.cat([ids[:, :keep].to("cpu", torch.long) for ids, keep in self._token_chunks], dim=1)
            self._token_chunks = [(ids, ids.shape[1])]
        return self._token_chunks[0][0].to("cpu", torch.long).clone()  # a copy: changing it changes no cache

    def check_prefix(self, input_ids: torch.Tensor) -> int:
        """How many leading tokens of `input_ids` (the whole sequence: cached tokens, then new ones) the cache holds.
        ValueError when they are not the cache's tokens, or nothing new is left to feed."""
        n = self.method.lengths[0]
        if n == 0:
            return 0
        cached = self.token_ids
        if cached is None:
            raise ValueError(f"the cache holds {n} tokens fed as embeddings, not ids, so input_ids cannot be checked "
                             "against them; prefill the cache with token ids (kvtier.generate or model(input_ids=...))")
        if input_ids.shape[0] != cached.shape[0]:
            raise ValueError(f"input_ids has {input_ids.shape[0]} sequences but the cache holds {cached.shape[0]}")
        if input_ids.shape[1] <= n:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens and the cache already holds {n}: give the "
                             f"whole sequence, the cached {n} tokens (cache.token_ids) and then at least one new token")
        differ = (input_ids[:, :n].cpu() != cached).any(0).nonzero()
        if len(differ):
            i = int(differ[0])
            raise ValueError(f"input_ids do not continue the cache: token {i} is {input_ids[:, i].tolist()} in "
                             f"input_ids but {cached[:, i].tolist()} in the cache; input_ids must start with the "
                             f"cache's {n} tokens (cache.token_ids), or use a new KVCache")
        return n

    def _check_length(self, new_tokens: int) -> None:
        total = self.method.lengths[0] + new_tokens
        if total > self.spec.max_positions:
            raise ValueError(f"sequence of {total} tokens exceeds the model's maximum of "
                             f"{self.spec.max_positions} positions (max_position_embeddings)")

    @contextlib.contextmanager
    def prefilling(self):
        """Forwards inside this block extend the prompt (chunked prefill); they are not decode steps."""
        self.method.in_prefill = True
        try:
            yield self
        finally:
            self.method.in_prefill = False

    @contextlib.contextmanager
    def feeding(self, mode: str):
        """Forwards in this block keep their tokens as `mode` says: "store", "lookahead" (keep none) or
        "speculative" (keep all but the last). The last two are for methods with a speculative decode step."""
        if mode not in ("store", "lookahead", "speculative"):
            raise ValueError(f"unknown feed mode {mode!r}; use store, lookahead or speculative")
        if mode != "store" and not self.method.supports_speculation:
            raise NotImplementedError(f"method {self.method.name!r} has no speculative decode step")
        self.method.feed_mode = mode
        try:
            yield self
        finally:
            self.method.feed_mode = "store"

    def reserve(self, tokens: int) -> None:
        """Size buffers once for a sequence that will reach `tokens` tokens."""
        self.check_usable()
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"reserve takes an int >= 1 (the tokens the sequence will reach), got {tokens!r}")
        if self.device_memory is not None and tokens > self.max_length:
            raise ValueError(f"this cache planned its device memory for max_length={self.max_length} (prompt + new "
                             f"tokens), not {tokens}; make it with max_length={tokens}")
        # no sequence gets past the model's positions: larger buffers could only exhaust memory
        self.method.reserve(min(tokens, self.spec.max_positions))

    def stats(self) -> dict:
        """Counters: device_kv_bytes (peak), host_kv_bytes, h2d_bytes, d2h_bytes, decode_steps, tokens, ...; with
        device_memory=, the budget and the predicted device bytes; with method="auto", what it chose and why."""
        out = self.method.stats()
        if self.device_memory is not None:
            out["device_memory"] = self.device_memory
            out["predicted_device_kv_bytes"] = self.predicted.device_bytes
        if self.auto is not None:
            out["auto_choice"] = self.auto.label
            out["auto_reason"] = self.auto.reason
        return out

    # -- prefix reuse: fork, save, load ---------------------------------------------------------------------
    def fork(self) -> "KVCache":
        """A cache holding what this one holds, that goes on independently: several forks of one prefilled
        document answer different questions. Host pages are shared, not copied (each side appends past them
        on its own, `store.ForkShare`); device state is copied. Counters carry on from this cache's."""
        self.check_usable()
        twin = KVCache.__new__(KVCache)
        twin.__dict__.update(self.__dict__)  # the model binding (config, modules, hooks) is the same
        twin.method = self.method.fork()
        twin._inference_tensors = self.__dict__.get("_inference_tensors", False) or torch.is_inference_mode_enabled()
        twin._token_chunks = list(self._token_chunks)
        twin._incoming = None
        Cache.__init__(twin, layers=[_LayerView(twin, i) for i in range(self.spec.num_layers)])
        return twin

    def save(self, path) -> Path:
        """Write this cache to `path` (one safetensors file, format in docs/cache-file.md) atomically: the file
        is complete or absent. `KVCache.load(path, model)` reads it back, in this or another process."""
        from . import __version__, cachefile

        self.check_usable()
        model = self._model()
        if model is None:
            raise RuntimeError("the model this cache was made for is gone; a cache file names its model")
        graph, storages, counters = self.method.snapshot()
        tensors, layout = {}, []
        for i, storage in enumerate(storages):
            layout.append({"nbytes": storage.nbytes(), "device": storage.device.type,
                           "pinned": storage.device.type == "cpu" and storage.is_pinned()})
            if storage.nbytes():  # empty buffers are rebuilt from their size alone
                tensors[f"storage.{i}"] = cachefile.storage_bytes(storage)
        ids = self.token_ids
        if ids is not None:
            tensors["token_ids"] = ids.contiguous()
        info = {"format_version": cachefile.FORMAT_VERSION, "kvtier_version": __version__,
                "model": cachefile.fingerprint(model), "device": self.spec.device.type,
                "method": self.method.name, "options": self.method.options, "tokens": self.method.lengths[0],
                "batch": self.method.batch, "tokens_known": ids is not None, "link": counters,
                "storages": layout, "state": graph}
        return cachefile.write(path, info, tensors)

    @classmethod
    def load(cls, path, model, method: str | None = None) -> "KVCache":
        """The cache `save` wrote to `path`, for `model` (the one it was saved from: checked by its fingerprint)
        and, when given, `method` (checked too). Continue it with `kvtier.generate(model, ids, cache=...)`, where
        ids start with `cache.token_ids`."""
        from . import __version__, cachefile

        info = cachefile.read_info(path, kvtier_version=__version__)
        if method is not None and method != info["method"]:
            raise cachefile.CacheFileError(f"{path} holds a {info['method']!r} cache, not {method!r}; load it "
                                           f"with method={info['method']!r} or prefill again with {method!r}")
        differs = cachefile.model_mismatch(info["model"], cachefile.fingerprint(model))
        if differs:
            raise cachefile.CacheFileError(f"{path} was saved from another model ({differs}); load it with the "
                                           "model it was saved from, or prefill again")
        cache = cls(model, method=info["method"], **info["options"])
        if info["device"] != cache.spec.device.type:
            raise cachefile.CacheFileError(f"{path} was saved on {info['device']}, the model is on "
                                           f"{cache.spec.device.type}; load the model on {info['device']}")
        tensors = cachefile.read_tensors(path)
        storages = []
        for i, entry in enumerate(info["storages"]):
            data = tensors.get(f"storage.{i}", torch.empty(0, dtype=torch.uint8))
            if data.numel() != entry["nbytes"]:
                raise cachefile.CacheFileError(f"{path} is damaged: buffer {i} has {data.numel()} bytes, "
                                               f"{entry['nbytes']} expected; save the cache again")
            if entry["device"] != "cpu":
                data = data.to(cache.spec.device)
            elif entry["pinned"] and torch.cuda.is_available():
                data = data.pin_memory()
            storages.append(data.untyped_storage())
        try:
            cache.method = cache.method.restore(info["state"], storages, info["link"])
        except Exception as err:  # the header checked out, so its state does not describe a method of ours
            raise cachefile.CacheFileError(f"{path} is a damaged kvtier cache file ({type(err).__name__}: {err}); "
                                           "save the cache again") from None
        if info["tokens_known"]:
            ids = tensors["token_ids"]
            cache._token_chunks = [(ids, ids.shape[1])]
        else:
            cache._tokens_known = False
        return cache

    def __repr__(self):
        broken = ", broken" if self._broken is not None else ""
        name = repr(self.method.name) if self.auto is None else f"'auto' -> {self.auto.label!r}"
        auto = "" if self.auto is None else f", why={self.auto.reason!r}"
        return f"KVCache(method={name}, tokens={self.method.lengths[0]}{broken}{auto})"


class HFBaselineCache(DynamicCache):
    """transformers' own `DynamicCache`, the peer the benchmark sets kvtier against, with byte counters.

    `offloading=True` is `DynamicCache(offloading=True)`: before each layer runs, its past keys and values are
    copied in from host memory (prefetched on a side stream), and after it the whole layer is copied out.
    `h2d_bytes` / `d2h_bytes` add up the sizes of those copies (counted from the tensors, not observed on the
    link). Offloading needs CUDA; on CPU the cache stays in main memory and the counters say what offloading
    would copy. Building one switches the model back to `attn_implementation` (a KVCache had set it to kvtier's).
    """

    def __init__(self, model, offloading: bool = False, attn_implementation: str = "sdpa"):
        on_cuda = next(model.parameters()).device.type == "cuda"
        super().__init__(config=model.config, offloading=offloading and on_cuda)
        self.counts_offload = offloading
        self.h2d_bytes = self.d2h_bytes = 0
        if model.config._attn_implementation == ATTN_NAME:
            model.set_attn_implementation(attn_implementation)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.counts_offload and layer_idx < len(self.layers) and self.layers[layer_idx].is_initialized:
            self.h2d_bytes += self.layer_bytes(layer_idx)
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.counts_offload:
            self.d2h_bytes += keys.nbytes + values.nbytes
        return keys, values

    def layer_bytes(self, layer_idx: int) -> int:
        """Bytes of one layer's keys and values (0 before the layer's first update)."""
        layer = self.layers[layer_idx]
        return layer.keys.nbytes + layer.values.nbytes if layer.is_initialized else 0

    def kv_bytes(self) -> int:
        """Bytes of keys and values held, wherever they are."""
        return sum(self.layer_bytes(i) for i in range(len(self.layers)))


HF_BASELINES = {"hf-dynamic": False, "hf-offload": True}  # name -> HFBaselineCache(offloading=...)


def make_cache(model, method: str | MethodSpec = "full", context_tokens: int | None = None, **options):
    """The cache of a method and its options (a name and keyword options, or a MethodSpec): a KVCache, or one of
    the benchmark's Hugging Face baselines (HF_BASELINES, which take no options). With `context_tokens`, a budget
    given as a fraction ("budget=0.25") becomes that share of the context."""
    if isinstance(method, MethodSpec):
        method, options = method.method, {**method.options, **options}
    if method in HF_BASELINES:
        if options:
            raise ValueError(f"{method} takes no options, got {sorted(options)}")
        return HFBaselineCache(model, offloading=HF_BASELINES[method])
    return KVCache(model, method=method, **resolve_options(options, context_tokens))
