"""`freekv`: page retrieval with speculative selection and fine-grained correction (FreeKV, arXiv 2505.13109).

A preset of the retrieval engine (`kvtier.retrieval`): pages of `page_size` tokens, min/max digests (or low-bit
keys) rank them, the previous step's query selects what a step reads, heads whose query drifted are
corrected, and pages not recalled are dropped (or, `rest="lowbit"`, read at low precision). The method is
described in docs/methods.md and docs/engine.md; measured fidelity is in docs/results/fidelity-bars.
"""

from __future__ import annotations

from ..retrieval.engine import RetrievalEngine
from ..retrieval.options import FreeKVOptions, defaults_of
from .base import register


@register
class FreeKV(RetrievalEngine):
    """Speculative page retrieval with correction. Approximate; identical to `full` when the budget covers
    the context.

    Options (see `kvtier.retrieval.options.FreeKVOptions`): budget (device tokens per layer: sink + recalled
    pages + window), page_size, sink, window (default: a sixteenth of the budget each, whole pages, at most
    128), tau (correction threshold on query cosine similarity), dense_layers (leading layers kept whole on
    the device), speculative (False: select with the current query and recall synchronously every step),
    query (overrides speculative: "previous", "current", or "speculative": select by kvtier.generate's
    speculative next token, as SpeCache does), correct (with query="speculative": reselect a head whose guess
    caught less than this share of the real token's pages), scorer ("digest": per-page min/max keys;
    "lowbit": `score_bits`-bit keys in groups of `score_group` tokens), rest ("drop", or "lowbit": pages not
    recalled are read from low-bit values; needs scorer="lowbit").

    With scorer="lowbit" the window keeps a page until its key group is quantized, so it holds up to
    max(window + page_size, score_group) tokens.
    """

    name = "freekv"
    options_class = FreeKVOptions
    defaults = defaults_of(FreeKVOptions)
