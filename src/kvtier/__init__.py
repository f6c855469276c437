"""kvtier: long-context LLM inference with the KV cache in host memory.

    model, tokenizer = kvtier.load()
    cache = kvtier.KVCache(model, method="offload")
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=64)
"""

__version__ = "0.1.0"

from .cache import CacheBrokenError, KVCache
from .cachefile import CacheFileError
from .generate import generate, prefill, score
from .methods import METHOD_REGISTRY
from .models import DEFAULT_MODEL, ModelSpec, load

METHODS = tuple(METHOD_REGISTRY)

__all__ = ["CacheBrokenError", "CacheFileError", "KVCache", "METHODS", "ModelSpec", "DEFAULT_MODEL", "generate", "load",
           "prefill", "score", "__version__"]
