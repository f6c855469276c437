"""`specache`: a low-bit copy of every key and value on the device scores importance; the top-k full-precision
pairs are fetched from host memory; a speculative next token predicts what the next step will need
(SpeCache, ICML 2025, arXiv 2503.16163).

A preset of the retrieval engine (`kvtier.retrieval`), described in docs/methods.md and docs/engine.md: single
tokens as pages, low-bit keys score them, the tokens not fetched are read from their low-bit copy, and under
kvtier.generate the guessed token of the two-token step selects what the next step reads.
"""

from __future__ import annotations

from ..retrieval.engine import RetrievalEngine
from ..retrieval.options import SpeCacheOptions, defaults_of
from .base import register


@register
class SpeCache(RetrievalEngine):
    """Low-bit device copy + top-k full-precision fetch + speculative-token prefetch. Approximate.

    Options (see `kvtier.retrieval.options.SpeCacheOptions`): bits (1 or 2), group_size (tokens per key
    group, and channels per value group unless value_group says otherwise), value_group, residual (newest
    tokens kept in full precision: between residual and residual + group_size - 1), topk (full-precision
    pairs per KV head), speculative (use the two-token step in kvtier.generate; False selects by the current
    query everywhere), correct (beyond the paper; 0: off): in the speculative step, a KV head whose prefetched
    top-k holds less than this share of the real token's top-k is reselected and fetched before attending.
    """

    name = "specache"
    options_class = SpeCacheOptions
    defaults = defaults_of(SpeCacheOptions)
