"""`freekv`: page retrieval with speculative selection and fine-grained correction (FreeKV, arXiv 2505.13109).

Every page of the cache goes to the host pool when it fills. The device keeps, per layer, the sink (first
`sink` tokens), the recent window (last `window` tokens plus the page being filled), min/max key digests of
every page (or, with scorer="lowbit", a low-bit copy of every key), and `budget - sink - window` tokens of
slots for recalled pages; `dense_layers` leading layers keep everything on the device.

Decode step t, layer l: attention runs over the pages selected with the previous step's query (recalled in
the background since then). Before it, the cosine similarity of q_t and q_{t-1} is checked per KV head
(averaged over its query heads); heads below `tau` are corrected: reselected with q_t and their missing
pages recalled synchronously. After attention, selection with q_t for step t+1 is launched at once and
overlaps the rest of this step and the next step's earlier layers. Recall copies only pages that are not
resident, into the slots of the lowest-scoring resident pages, double-buffered per KV head (`store`).
Prefill attends densely over the prompt; chunked prefill and multi-token forwards read the whole cache.
"""

from __future__ import annotations

import math

import torch

from ..attention import attend, causal_attention
from ..quant import LowBitKeys, LowBitValues
from ..select import lowbit_page_probs, page_digest, query_similarity, select_pages, top_pages
from ..store import DevicePool, HostPool, RecallStaging, from_pages, to_pages
from .base import Method, register
from .full import Full


class _Layer:
    """Device state of one retrieval layer."""

    def __init__(self, k: torch.Tensor, sink: int, recent_capacity: int, lowbit: LowBitKeys | None,
                 lowbit_values: LowBitValues | None):
        b, h, _, d = k.shape
        self.sink_k = k.new_zeros((b, h, sink, d))
        self.sink_v = k.new_zeros((b, h, sink, d))
        # The recent window lives in a buffer sized once (window + 2 pages), so a decode step writes one token
        # instead of reallocating the window; it shifts only when a whole page leaves it.
        self.recent_capacity = recent_capacity
        self.recent_buf_k = k.new_zeros((b, h, recent_capacity, d))
        self.recent_buf_v = k.new_zeros((b, h, recent_capacity, d))
        self.recent_len = 0
        self.recent_start = sink  # position of recent_k[:, :, 0]
        self.digest_max = k.new_zeros((b, h, 0, d))
        self.digest_min = k.new_zeros((b, h, 0, d))
        self.lowbit = lowbit  # scorer="lowbit": low-bit keys of every written page instead of digests
        self.lowbit_values = lowbit_values  # rest="lowbit": and low-bit values, to read the pages not recalled
        self.slots: DevicePool | None = None
        self.selected: torch.Tensor | None = None  # [b, h_kv, k] pages wanted by the last selection
        self.previous_q: torch.Tensor | None = None
        self.pending: list = []  # events of a recall still in flight

    def lowbit_tensors(self) -> tuple[torch.Tensor, ...]:
        """What ranks the pages (digests or low-bit keys), and the low-bit values of rest="lowbit"."""
        held = self.lowbit.tensors() if self.lowbit is not None else (self.digest_max, self.digest_min)
        return held + (self.lowbit_values.tensors() if self.lowbit_values is not None else ())

    @property
    def recent_k(self) -> torch.Tensor:
        return self.recent_buf_k[:, :, :self.recent_len]

    @property
    def recent_v(self) -> torch.Tensor:
        return self.recent_buf_v[:, :, :self.recent_len]

    def push_recent(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n, t = self.recent_len, k.shape[2]
        if n + t > self.recent_buf_k.shape[2]:  # a prompt larger than the window: grow until it is trimmed
            grown_k = k.new_empty((*k.shape[:2], n + t, k.shape[3]))
            grown_v = torch.empty_like(grown_k)
            grown_k[:, :, :n], grown_v[:, :, :n] = self.recent_k, self.recent_v
            self.recent_buf_k, self.recent_buf_v = grown_k, grown_v
        self.recent_buf_k[:, :, n:n + t] = k
        self.recent_buf_v[:, :, n:n + t] = v
        self.recent_len = n + t

    def drop_recent(self, drop: int) -> None:
        keep_k, keep_v = self.recent_k[:, :, drop:].clone(), self.recent_v[:, :, drop:].clone()
        if self.recent_buf_k.shape[2] > self.recent_capacity:  # back to the window's size after a prompt
            self.recent_buf_k = keep_k.new_zeros((*keep_k.shape[:2], self.recent_capacity, keep_k.shape[3]))
            self.recent_buf_v = torch.zeros_like(self.recent_buf_k)
        self.recent_len = keep_k.shape[2]
        self.recent_buf_k[:, :, :self.recent_len] = keep_k
        self.recent_buf_v[:, :, :self.recent_len] = keep_v


@register
class FreeKV(Method):
    """Speculative page retrieval with correction. Approximate; identical to `full` when the budget covers
    the context.

    Options: budget (device tokens per layer: sink + recalled pages + window), page_size, sink, window,
    tau (correction threshold on query cosine similarity), dense_layers (leading layers kept whole on the
    device), speculative (False: select with the current query and recall synchronously every step), scorer,
    score_bits, score_group, rest.

    scorer="digest" (the spec's) ranks pages by an upper bound of q.k from per-page min/max key digests.
    scorer="lowbit" keeps a `score_bits`-bit copy of every key instead (per channel, groups of `score_group`
    tokens, default max(64, page_size)) and ranks pages by the attention mass of their tokens. The bound is
    loose when one channel of one key is large, and a page is only as fine as its size, so at a quarter of the
    context the digest loses +0.33 (code) and +0.39 (prose) perplexity on the embedded model where low-bit
    scoring of 8-token pages loses +0.05 and +0.09 (2k context, 4 x 256 targets; docs/results/fidelity-bars).
    Its price: 2-bit keys cost 2.5x the device bytes of 32-token digests at bfloat16, so at the spec's 2048
    budget on a 32k context the digest is the one that keeps device KV 8x below `full`.

    rest="lowbit" (beyond the paper; needs scorer="lowbit") also keeps `score_bits`-bit values (per token) and
    lets attention read every page that is not recalled from its low-bit copy, as SpeCache does, instead of
    leaving it out: the budget then decides which pages are exact, not which are seen. It wants the spec's
    long-generation tau=0.9: a stale speculative page then costs more than a missing one did (code at 2k, one
    window: +0.09 perplexity at tau=0.8, +0.003 at 0.9, +0.001 selecting with the current query). On the
    embedded model at a quarter of the context, scorer="lowbit", 8-token pages, rest="lowbit", tau=0.9 is
    within +0.010 / +0.021 of full's perplexity on prose / code at 2k and -0.003 / +0.008 at 4k (+0.16 on 4k
    prose without rest) and finds full's needles; the price is 2-bit values on the device (0.38-0.39x of full's bytes, not 0.34x, at fp32)
    and corrections in 71% of the head checks instead of 28%, i.e. mostly synchronous recall
    (docs/results/fidelity-bars).

    sink and window default to a sixteenth of the budget each (whole pages, at least one, at most the spec's
    128 for long inputs), which is the spec's ratio at its default budget of 2048. A fixed 128 + 128 would
    leave only half of a 512 budget for retrieved pages: on the embedded model (prose, 2k context) that costs
    +0.68 perplexity against +0.10 with 64 + 64 and -0.02 with 32 + 32. Give them explicitly to override.
    """

    name = "freekv"
    exact = False
    defaults = {"budget": 2048, "page_size": 32, "sink": None, "window": None, "tau": 0.8, "dense_layers": 1,
                "speculative": True, "scorer": "digest", "score_bits": 2, "score_group": None, "rest": "drop"}
    edge_tokens = 128  # the spec's sink and window for long inputs

    def __init__(self, spec, **options):
        super().__init__(spec, **options)
        o = self.options
        for key in ("budget", "page_size"):
            if not isinstance(o[key], int) or isinstance(o[key], bool) or o[key] < 0:
                raise ValueError(f"freekv option {key} must be a non-negative int, got {o[key]!r}")
        if o["page_size"] >= 1:
            edge = max(o["page_size"], min(self.edge_tokens, o["budget"] // 16 // o["page_size"] * o["page_size"]))
            for key in ("sink", "window"):
                if o[key] is None:
                    o[key] = edge
        for key in ("sink", "window", "dense_layers"):
            if not isinstance(o[key], int) or isinstance(o[key], bool) or o[key] < 0:
                raise ValueError(f"freekv option {key} must be a non-negative int, got {o[key]!r}")
        self.page_size = p = o["page_size"]
        if p < 1:
            raise ValueError("freekv page_size must be >= 1")
        if o["sink"] % p or o["window"] % p:
            raise ValueError(f"freekv sink ({o['sink']}) and window ({o['window']}) must be multiples of "
                             f"page_size ({p})")
        self.sink, self.window = o["sink"], o["window"]
        self.num_slots = (o["budget"] - self.sink - self.window) // p
        if self.num_slots < 1:
            raise ValueError(f"freekv budget {o['budget']} must cover sink ({self.sink}) + window "
                             f"({self.window}) + at least one page of {p} tokens")
        if not -1.0 <= float(o["tau"]) <= 1.0:
            raise ValueError(f"freekv tau is a cosine similarity threshold in [-1, 1], got {o['tau']!r}")
        if o["dense_layers"] > spec.num_layers:
            raise ValueError(f"freekv dense_layers={o['dense_layers']} exceeds the model's {spec.num_layers} layers")
        if not isinstance(o["speculative"], bool):
            raise ValueError(f"freekv speculative must be True or False, got {o['speculative']!r}")
        self.tau, self.speculative = float(o["tau"]), o["speculative"]
        if o["scorer"] not in ("digest", "lowbit"):
            raise ValueError(f"freekv scorer must be 'digest' (min/max key digests per page) or 'lowbit' "
                             f"(low-bit keys of every token), got {o['scorer']!r}")
        if o["score_bits"] not in (1, 2, 4):
            raise ValueError(f"freekv score_bits must be 1, 2 or 4, got {o['score_bits']!r}")
        if o["score_group"] is None:
            o["score_group"] = max(64, p) // p * p
        if not isinstance(o["score_group"], int) or isinstance(o["score_group"], bool) or o["score_group"] < 1 \
                or o["score_group"] % p:
            raise ValueError(f"freekv score_group (tokens per low-bit key group) must be a positive multiple of "
                             f"page_size ({p}), got {o['score_group']!r}")
        if o["rest"] not in ("drop", "lowbit"):
            raise ValueError(f"freekv rest must be 'drop' (attention reads only resident pages) or 'lowbit' "
                             f"(the other pages are read from their low-bit copy), got {o['rest']!r}")
        if o["rest"] == "lowbit" and o["scorer"] != "lowbit":
            raise ValueError("freekv rest='lowbit' reads the pages not recalled through the low-bit keys that "
                             "scorer='lowbit' keeps: give scorer='lowbit' too")
        self.value_group = math.gcd(64, spec.head_dim)  # per token, channel groups that tile the head
        self.dense = Full(spec)
        self.dense.ledger = self.ledger  # one ledger: the device peak covers dense and retrieval layers together
        self.pool: HostPool | None = None
        self.staging: RecallStaging | None = None  # shared by every layer's recall
        self.layers: list[_Layer | None] = [None] * spec.num_layers
        self.fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.scaling = spec.head_dim ** -0.5
        self.reserved = 0
        self.recalled_pages = 0
        self.selections = 0
        self.checks = [0] * spec.num_layers
        self.corrections = [0] * spec.num_layers

    def reserve(self, tokens: int) -> None:
        self.dense.reserve(tokens)
        self.reserved = max(self.reserved, tokens)
        for st in self.layers:
            for lowbit in (st.lowbit, st.lowbit_values) if st is not None else ():
                if lowbit is not None:
                    lowbit.reserve(tokens)

    def _is_dense(self, layer: int) -> bool:
        return layer < self.options["dense_layers"]

    # -- storing ----------------------------------------------------------------------------------------
    def _append(self, layer, k, v):
        if self._is_dense(layer):
            self.dense._append(layer, k, v)
            self.dense.lengths[layer] += k.shape[2]
            return
        if self.pool is None:
            s = self.spec
            self.pool = HostPool(s.num_layers, k.shape[0], s.num_kv_heads, s.head_dim, self.page_size, s.dtype,
                                 self.link)
        st = self.layers[layer]
        if st is None:
            lowbit = lowbit_values = None
            if self.options["scorer"] == "lowbit":
                lowbit = LowBitKeys(self.options["score_bits"], self.options["score_group"])
            if self.options["rest"] == "lowbit":
                lowbit_values = LowBitValues(self.options["score_bits"], self.value_group)
            for store in (lowbit, lowbit_values):
                if store is not None:
                    store.reserve(self.reserved)
            st = self.layers[layer] = _Layer(k, self.sink, self.window + 2 * self.page_size, lowbit, lowbit_values)
        self.fresh[layer] = (k, v)
        n, t, p = self.lengths[layer], k.shape[2], self.page_size
        into_sink = max(0, min(self.sink - n, t))
        if into_sink:
            st.sink_k[:, :, n:n + into_sink] = k[:, :, :into_sink]
            st.sink_v[:, :, n:n + into_sink] = v[:, :, :into_sink]
        if into_sink < t:
            st.push_recent(k[:, :, into_sink:], v[:, :, into_sink:])
        total = n + t
        # Pages that filled: to the host pool, and what scores them to the device.
        first, last = self.pool.num_pages[layer], total // p
        if last > first:
            pk, pv = self._tokens(st, first * p, last * p)
            self.pool.write(layer, to_pages(pk, pv, p))
            if st.lowbit is not None:
                st.lowbit.append(pk)
            else:
                dmax, dmin = page_digest(pk, p)
                st.digest_max = torch.cat((st.digest_max, dmax), dim=2)
                st.digest_min = torch.cat((st.digest_min, dmin), dim=2)
            if st.lowbit_values is not None:
                st.lowbit_values.append(pv)
        # Slide the window: whole pages older than `window` tokens leave it (they are in the host pool).
        start = max(self.sink, (total - self.window) // p * p)
        if start > st.recent_start:
            st.drop_recent(start - st.recent_start)
            st.recent_start = start
        self.ledger.hold(f"layer{layer}", st.sink_k, st.sink_v, st.recent_buf_k, st.recent_buf_v,
                         *st.lowbit_tensors())

    def _tokens(self, st: _Layer, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [start, end), all of them still in the sink or the recent window."""
        ks, vs = [st.sink_k[:, :, :0]], [st.sink_v[:, :, :0]]
        if start < self.sink:
            stop = min(end, self.sink)
            ks.append(st.sink_k[:, :, start:stop])
            vs.append(st.sink_v[:, :, start:stop])
            start = stop
        if start < end:
            lo, hi = start - st.recent_start, end - st.recent_start
            if lo < 0:
                raise RuntimeError("a page left the recent window before it was written to the host pool")
            ks.append(st.recent_k[:, :, lo:hi])
            vs.append(st.recent_v[:, :, lo:hi])
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)

    # -- selecting and recalling ------------------------------------------------------------------------
    def _select_and_recall(self, layer: int, st: _Layer, q: torch.Tensor, lo: int, hi: int,
                           heads: torch.Tensor | None = None) -> list:
        """Select each KV head's top pages in [lo, hi) with query q; recall the missing ones into slots.

        heads: [b, h_kv] bool, the rows to reselect (None: all). Other rows keep their last selection.
        """
        hi = min(hi, self.pool.num_pages[layer])
        if hi <= lo:
            return []
        if st.slots is None:
            b, h, _, d = st.sink_k.shape
            if self.staging is None:
                self.staging = RecallStaging(self.page_size, d, st.sink_k.dtype, st.sink_k.device)
            st.slots = DevicePool(b, h, d, self.page_size, self.num_slots, st.sink_k.dtype, st.sink_k.device,
                                  staging=self.staging)
        if st.lowbit is not None:
            probs = lowbit_page_probs(q, st.lowbit.quantized(), st.lowbit.pending, self.page_size, lo, hi,
                                      self.scaling)
            pages = top_pages(probs, self.num_slots, first_page=lo)
        else:
            pages, probs = select_pages(q, st.digest_max[:, :, lo:hi], st.digest_min[:, :, lo:hi], self.num_slots,
                                        self.scaling, first_page=lo)
        if heads is not None and st.selected is not None and st.selected.shape == pages.shape:
            pages = torch.where(heads.unsqueeze(-1), pages, st.selected)
        scores = probs.new_full((*probs.shape[:2], hi), float("-inf"))
        scores[..., lo:hi] = probs
        plan = st.slots.table.plan(pages, scores)
        events = st.slots.recall(self.pool, layer, self.link, *plan)
        st.selected = pages
        self.recalled_pages += len(plan[0])
        self.selections += 1
        self.ledger.hold(f"slots{layer}", *st.slots.tensors())
        self.ledger.hold("recall_staging", *self.staging.tensors())
        return events

    # -- attending --------------------------------------------------------------------------------------
    def _attend(self, layer, q, valid, scaling):
        if self._is_dense(layer):
            return self.dense._attend(layer, q, valid, scaling)
        self.scaling = scaling
        st = self.layers[layer]
        k_new, v_new = self.fresh.pop(layer)
        n, t = self.lengths[layer], q.shape[2]
        if n == t:  # prefill of an empty cache: dense attention over the prompt itself
            return causal_attention(q, k_new, v_new, scaling, valid, q_offset=0)
        if t > 1 or self.in_prefill:
            k, v = self._whole_cache(layer, st, n)
            return causal_attention(q, k, v, scaling, valid, q_offset=n - t)
        q_now = q[:, :, -1]
        lo, hi = self.sink // self.page_size, st.recent_start // self.page_size
        for event in st.pending:
            self.link.wait(event)
        st.pending = []
        if hi > lo:
            if st.previous_q is None or not self.speculative:
                self._wait_all(self._select_and_recall(layer, st, q_now, lo, hi))
            else:
                drift = query_similarity(q_now, st.previous_q, self.spec.num_kv_heads) < self.tau
                self.checks[layer] += drift.numel()
                corrected = int(drift.sum())
                self.corrections[layer] += corrected
                if corrected:
                    self._wait_all(self._select_and_recall(layer, st, q_now, lo, hi, heads=drift))
        k, v, mask = self._resident(st, n, valid)
        out = attend(q, k, v, scaling, mask)
        st.previous_q = q_now
        if self.speculative:
            # Select for step t+1 now (its window will have moved by one token) and recall in the background.
            next_hi = max(self.sink, (n + 1 - self.window) // self.page_size * self.page_size) // self.page_size
            st.pending = self._select_and_recall(layer, st, q_now, lo, next_hi)
        return out

    def _wait_all(self, events) -> None:
        for event in events:
            self.link.wait(event)

    def _resident(self, st: _Layer, n: int, valid):
        """Keys, values and mask [b, h_kv, 1, N] over sink + recalled slots + recent window."""
        b, h = st.sink_k.shape[:2]
        device = st.sink_k.device
        in_sink = min(n, self.sink)
        ks, vs = [st.sink_k[:, :, :in_sink]], [st.sink_v[:, :, :in_sink]]
        positions = [torch.arange(in_sink, device=device).expand(b, h, -1)]
        if st.slots is not None:
            ks.append(st.slots.slot_k)
            vs.append(st.slots.slot_v)
            slot_pos = st.slots.slot_positions()
            # a recalled page that is back in the window (or beyond the sequence) must not count twice
            positions.append(torch.where(slot_pos >= st.recent_start, -1, slot_pos))
        ks.append(st.recent_k)
        vs.append(st.recent_v)
        positions.append(torch.arange(st.recent_start, st.recent_start + st.recent_k.shape[2],
                                      device=device).expand(b, h, -1))
        if st.lowbit_values is not None and st.recent_start > self.sink:
            k_rest, v_rest, pos_rest = self._rest(st)
            ks.append(k_rest)
            vs.append(v_rest)
            positions.append(pos_rest)
        pos = torch.cat(positions, dim=-1)
        mask = pos >= 0
        if valid is not None:
            mask &= valid.gather(1, pos.clamp(min=0).view(b, -1)).view(b, h, -1)
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2), mask.unsqueeze(2)

    def _rest(self, st: _Layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """rest="lowbit": keys, values and positions [b, h, ., .] of the tokens between the sink and the window
        from their low-bit copy; position -1 (masked) where the page is resident in that head's slots, whose
        full-precision copy counts instead."""
        lo, hi = self.sink, st.recent_start
        keys = st.lowbit.quantized()
        parts = ([keys.dequantize()] if keys is not None else []) + [st.lowbit.pending]
        k_rest = torch.cat(parts, dim=2)[:, :, lo:hi]
        v_rest = st.lowbit_values.quantized().dequantize()[:, :, lo:hi]
        b, h = k_rest.shape[:2]
        pos = torch.arange(lo, hi, device=k_rest.device).expand(b, h, -1)
        if st.slots is not None:
            p = self.page_size
            resident = torch.zeros((b, h, hi // p + 1), dtype=torch.bool, device=k_rest.device)
            held = st.slots.table.slot_page.clamp(max=hi // p)  # -1 (empty) and pages in the window fall outside
            resident.scatter_(2, torch.where(held >= 0, held, hi // p), True)
            pos = torch.where(resident[:, :, lo // p:hi // p].repeat_interleave(p, dim=-1), -1, pos)
        return k_rest, v_rest, pos

    def _whole_cache(self, layer: int, st: _Layer, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All n tokens on the device (for multi-token forwards): host pages, then the unwritten tail."""
        written = self.pool.num_pages[layer]
        src = self.pool.layer_block(layer)
        block = torch.empty(src.shape, dtype=src.dtype, device=st.sink_k.device)
        self.link.wait(self.link.h2d(block, src))
        k, v = from_pages(block)
        tail_k, tail_v = self._tokens(st, written * self.page_size, n)
        return torch.cat((k, tail_k), dim=2), torch.cat((v, tail_v), dim=2)

    # -- reporting --------------------------------------------------------------------------------------
    def host_bytes(self) -> int:
        return 0 if self.pool is None else self.pool.used_bytes()

    def method_stats(self) -> dict:
        checks, corrections = sum(self.checks), sum(self.corrections)
        return {
            "budget": self.options["budget"],
            "slots_per_head": self.num_slots,
            "recalled_pages": self.recalled_pages,
            "selections": self.selections,
            "corrections": corrections,
            "correction_rate": corrections / checks if checks else 0.0,
            "correction_rate_per_layer": [c / k if k else 0.0 for c, k in zip(self.corrections, self.checks)],
            "speculative": self.speculative,
        }
