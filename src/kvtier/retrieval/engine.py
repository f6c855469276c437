"""One retrieval engine for FreeKV and SpeCache: parts chosen by `EngineOptions`, a decode step with no host sync.

Per retrieval layer the device holds one KV buffer `[b, h_kv, sink + slots*P + ring + P, d]` (sink, recalled-page
slots, the recent window as a ring, and a trash page the reference copy writes skipped entries to) with the
position of every row (-1: nothing there), so attention reads one buffer under one mask, and recall writes into
it in place. The host pool holds every page. The scorer keeps, per page written, what ranks it; `rest="lowbit"`
also keeps low-bit values so attention reads pages not recalled at low precision.

A decode step of one layer (positions are Python ints, every device value stays on the device):
1. the query source decides the wanted pages: this query's top-k (`current`); the previous step's, with the
   heads whose query drifted (cosine < tau) reselected (`previous`); or the speculative token's from the step
   before, with the heads whose guess caught less than `correct` of the real top-k reselected (`speculative`);
2. a dense plan `[b, h_kv, k]` (page -1: resident) copies only missing pages, into the lowest-scoring slots;
3. attention over the buffer (and the low-bit rest), one softmax;
4. `previous` and `speculative` select for the next step at once and start that copy (a side stream on CUDA).
Counters (corrections, hits, recalled pages) are device tensors read only by `stats()`.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..kernels import native
from ..attention import RestRange, attend_buffer, causal_attention
from ..link import nbytes
from ..methods.base import Method
from ..methods.full import Full
from ..quant import LowBitValues
from ..selection import query_drift
from ..sizes import grown
from ..store import HostPool, from_pages, to_pages
from .options import EngineOptions
from .recall import PageTable, SlotRows, plan_workspace_bytes, recall_pages, staging_needed
from .scorer import DigestScorer, LowBitScorer



class _Layer:
    """Device state of one retrieval layer, sized once for `capacity` tokens."""

    def __init__(self, o: EngineOptions, k: torch.Tensor, capacity: int):
        b, h, _, d = k.shape
        p = o.page_size
        self.capacity = capacity
        self.slot_start = o.sink
        slots, self.ring = o.held_rows(capacity)
        self.table = PageTable(b, h, slots, capacity // p, k.device)
        self._buffers(o, k, slots)
        self.scorer = (LowBitScorer(o.bits, o.key_group, p, capacity) if o.scorer == "lowbit"
                       else DigestScorer(k, capacity // p, p))
        self.values = None
        if o.rest == "lowbit":
            self.values = LowBitValues(o.bits, o.value_group)
            self.values.reserve(capacity)
        self.recent_start = o.sink  # positions [recent_start, n) are in the ring
        self.scored = 0  # tokens the scorer (and the low-bit values) have taken
        self.wanted: torch.Tensor | None = None  # [b, h, k] pages the next attention reads
        self.previous_q: torch.Tensor | None = None
        self.pending = None  # event of a recall in flight
        self.recalled = self.corrections = self.hits = None  # views of the engine's counters
        self.counted = None  # (capacity, scored) when the ledger last counted this layer

    def _buffers(self, o: EngineOptions, like: torch.Tensor, slots: int) -> None:
        """The KV buffer of sink, `slots` slots, the ring and the trash page, empty, with its row views."""
        b, h, _, d = like.shape
        p = o.page_size
        self.ring_start = o.sink + slots * p
        length = self.ring_start + self.ring + p  # the last page is the reference copy's trash
        self.k = like.new_zeros((b, h, length, d))
        self.v = like.new_zeros((b, h, length, d))
        self.pos = torch.full((b, h, length), -1, dtype=torch.long, device=like.device)
        self.rows = SlotRows(heads=b * h, rows_per_head=length // p, first_slot=o.sink // p)
        self.row_k = self.k.view(-1, p * d)
        self.row_v = self.v.view(-1, p * d)
        self.pos_rows = self.pos.view(-1, p)

    def widen(self, o: EngineOptions, capacity: int) -> None:
        """Room for the slots and ring `capacity` tokens can use (the sequence went past its reserved length).
        Every row keeps its place in its part: the sink's and the slots' (the page table names slots by index),
        and the ring's, since a ring narrower than `o.ring` is as long as the capacity it was made for and so holds
        every token at row = position, wrapping nowhere (a ring already at `o.ring` keeps its length)."""
        old_slots, old_ring, old_ring_start = self.table.slots, self.ring, self.ring_start
        slots, ring = (max(new, held) for new, held in zip(o.held_rows(capacity), (old_slots, old_ring)))
        if (slots, ring) == (old_slots, old_ring):  # never narrower (a cache saved before the rows were capped)
            return
        old = (self.k, self.v, self.pos)
        self.ring = ring
        self._buffers(o, self.k, slots)
        kept, ring_rows = self.slot_start + old_slots * o.page_size, slice(old_ring_start, old_ring_start + old_ring)
        for new, before in zip((self.k, self.v, self.pos), old):
            new[:, :, :kept] = before[:, :, :kept]
            new[:, :, self.ring_start:self.ring_start + old_ring] = before[:, :, ring_rows]
        self.table.widen(slots)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        held = (self.k, self.v, self.pos, *self.table.tensors(), *self.scorer.tensors())
        return held + (self.values.tensors() if self.values is not None else ())

    def ring_slices(self, start: int, stop: int):
        """Buffer slices holding positions [start, stop) of the ring (two where it wraps), with their positions."""
        out, pos = [], start
        while pos < stop:
            i = pos % self.ring
            take = min(stop - pos, self.ring - i)
            out.append((slice(self.ring_start + i, self.ring_start + i + take), pos, pos + take))
            pos += take
        return out


class RetrievalEngine(Method):
    """Base of the retrieval presets: subclasses set `name`, `options_class` (a dataclass with `engine()`)."""

    exact = False
    options_class: type = None

    @classmethod
    def check_values(cls, options: dict) -> None:
        super().check_values(options)
        cls.options_class(**options).check()

    def __init__(self, spec, **options):
        super().__init__(spec, **options)
        self.user_options = self.options_class(**options)
        self.o = self.user_options.engine(spec.head_dim, spec.num_layers)
        self.options.update({k: getattr(self.user_options, k) for k in self.defaults})
        self.supports_speculation = self.o.query == "speculative"
        self.dense = Full(spec)
        self.dense.ledger = self.ledger  # one ledger: the peak covers dense and retrieval layers together
        self.pool: HostPool | None = None
        self.layers: list[_Layer | None] = [None] * spec.num_layers
        self.fresh: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self.reserved = 0
        self.selections = 0
        self.checks = 0
        self.hit_checks = 0
        self._counters: torch.Tensor | None = None  # [layers, 3]: recalled pages, corrections, hits

    def reserve(self, tokens: int) -> None:
        self.dense.reserve(tokens)
        self.reserved = max(self.reserved, tokens)

    def _is_dense(self, layer: int) -> bool:
        return layer < self.o.dense_layers

    # -- storing ----------------------------------------------------------------------------------------
    def _capacity(self, tokens: int) -> int:
        unit = self.o.key_group if self.o.scorer == "lowbit" else self.o.page_size
        return grown(tokens, self.reserved, unit)

    def _layer(self, layer: int, k: torch.Tensor, tokens: int) -> _Layer:
        st = self.layers[layer]
        if self.pool is None:
            s = self.spec
            self.pool = HostPool(s.num_layers, k.shape[0], s.num_kv_heads, s.head_dim, self.o.page_size, s.dtype,
                                 self.link)
            self._counters = torch.zeros((s.num_layers, 3), dtype=torch.long, device=k.device)
        if st is None:
            st = self.layers[layer] = _Layer(self.o, k, self._capacity(tokens))
            st.recalled, st.corrections, st.hits = self._counters[layer].unbind()
        elif tokens > st.capacity:  # past the reserved length: grow by a quarter (reserve() avoids this)
            p = self.o.page_size
            st.capacity = self._capacity(tokens)
            if st.pending is not None:  # a copy in flight writes into the buffer that widen may replace
                self.link.wait(st.pending)
                st.pending = None
            st.widen(self.o, st.capacity)
            st.scorer.grow(st.capacity if st.scorer.lowbit else st.capacity // self.o.page_size)
            if st.values is not None:
                st.values.reserve(st.capacity)
            st.table.grow(st.capacity // p)
        self.pool.reserve(layer, st.capacity // self.o.page_size)
        return st

    def _append(self, layer, k, v):
        if self._is_dense(layer):  # kept whole; a speculative token is attended, not stored
            keep = self.stored_count(k.shape[2])
            if keep:
                self.dense._append(layer, k[:, :, :keep], v[:, :, :keep])
                self.dense.lengths[layer] += keep
            self.fresh[layer] = (k[:, :, keep:], v[:, :, keep:], self.lengths[layer])
            return
        o, p = self.o, self.o.page_size
        n_old, t = self.lengths[layer], k.shape[2]
        n_new = n_old + self.stored_count(t)
        st = self._layer(layer, k, n_new + 1)
        self.fresh[layer] = (k, v, n_old)
        # whole pages to the host pool, and what scores them (and the low-bit values) to the device
        written = self.pool.num_pages[layer]
        if n_new // p > written:
            pk, pv = self._span(st, k, v, n_old, written * p, n_new // p * p)
            self.pool.write(layer, to_pages(pk, pv, p))
            if not st.scorer.lowbit:
                st.scorer.add_pages(written, pk)
        if st.scorer.lowbit:
            g = o.key_group
            if n_new // g * g > st.scored:
                gk, gv = self._span(st, k, v, n_old, st.scored, n_new // g * g)
                st.scorer.add_tokens(gk)
                if st.values is not None:
                    st.values.append(gv)
                st.scored = n_new // g * g
        # the window moves a unit at a time and never past what the scorer has taken
        start = (n_new - o.window) // o.window_unit * o.window_unit
        if st.scorer.lowbit:
            start = min(start, st.scored)
        start = max(st.recent_start, o.sink, start)
        for piece, _, _ in st.ring_slices(st.recent_start, min(start, n_old)):
            st.pos[:, :, piece] = -1
        st.recent_start = start
        # the fed tokens that stay on the device: the sink, and the window (a speculative token sits there too)
        if n_old < o.sink:
            stop = min(o.sink, n_old + t)
            st.k[:, :, n_old:stop] = k[:, :, :stop - n_old]
            st.v[:, :, n_old:stop] = v[:, :, :stop - n_old]
            st.pos[:, :, n_old:stop] = torch.arange(n_old, stop, device=k.device)
        first = max(n_old, o.sink, start)
        for piece, a, b in st.ring_slices(first, n_old + t):
            if kernels.native_enabled(k) and native.store_rows(k, v, st.k, st.v, st.pos, piece.start, a - n_old,
                                                                b - a, a):
                continue  # one C call for the keys, values and positions
            st.k[:, :, piece] = k[:, :, a - n_old:b - n_old]
            st.v[:, :, piece] = v[:, :, a - n_old:b - n_old]
            if b - a == 1:  # a decode step: one position, no tensor made for it
                st.pos[:, :, piece].fill_(a)
            else:
                st.pos[:, :, piece] = torch.arange(a, b, device=k.device)
        if st.counted != (st.capacity, st.scored):  # what the layer holds changes only as it grows or scores
            st.counted = (st.capacity, st.scored)
            self.ledger.hold(f"layer{layer}", *st.tensors())
            self.ledger.hold_bytes("step_workspace",
                                   max(self.ledger.held.get("step_workspace", 0), self._workspace(st, k)))

    def _workspace(self, st: _Layer, k: torch.Tensor) -> int:
        """Bytes of the transient tensors one decode step of a layer makes on the device (they live one layer at
        a time): the scorer's per-token or per-page scores and, where no kernel reads the low-bit copy in
        place, its dequantized keys and values."""
        b, h, _, d = k.shape
        rows = self.spec.num_heads // h * 2  # a decode step has one query token, a speculative one two
        elem = k.element_size()
        pages = st.capacity // self.o.page_size
        plan = plan_workspace_bytes(b, h, st.table.slots)
        if not st.scorer.lowbit:  # the page bounds per query row and their softmax
            return plan + 4 * b * h * rows * pages * 2
        size = plan + 4 * b * h * rows * st.capacity * 2  # raw token scores and their softmax
        if not (kernels.enabled(k) or native.scores_lowbit(k, rows, d)):
            size += elem * b * h * st.capacity * d * (2 if st.values is not None else 1)
        return size

    def _span(self, st: _Layer, k, v, n_old: int, start: int, stop: int):
        """Keys and values of positions [start, stop): from the sink, the ring, or this forward's new tokens."""
        ks, vs = [], []
        pos = start
        if pos < min(stop, n_old, self.o.sink):
            end = min(stop, n_old, self.o.sink)
            ks.append(st.k[:, :, pos:end])
            vs.append(st.v[:, :, pos:end])
            pos = end
        if pos < min(stop, n_old):
            if pos < st.recent_start:
                raise RuntimeError(f"position {pos} left the device window before it was stored")
            for piece, _, _ in st.ring_slices(pos, min(stop, n_old)):
                ks.append(st.k[:, :, piece])
                vs.append(st.v[:, :, piece])
            pos = min(stop, n_old)
        if pos < stop:
            ks.append(k[:, :, pos - n_old:stop - n_old])
            vs.append(v[:, :, pos - n_old:stop - n_old])
        if len(ks) <= 1:
            return (ks[0], vs[0]) if ks else (k[:, :, :0], v[:, :, :0])
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)

    # -- selecting and recalling ------------------------------------------------------------------------
    def _recall(self, layer: int, st: _Layer, wanted: torch.Tensor, page_probs: torch.Tensor, wait: bool) -> None:
        """Plan the copy of the wanted pages [b, h, k] that are not resident, and copy them."""
        self._copy(layer, st, *self._plan(st, wanted, page_probs), wait=wait)

    def _plan(self, st: _Layer, wanted: torch.Tensor, page_probs: torch.Tensor):
        """The table takes the wanted pages; returns the (pages, slots) plan [b, h, k] that makes it true."""
        st.wanted = wanted
        self.selections += 1
        return st.table.plan(wanted, page_probs, st.recalled)

    def _copy(self, layer: int, st: _Layer, pages, slots, wait: bool, heads: torch.Tensor | None = None) -> None:
        """Copy the planned pages (only the KV heads in `heads` [b, h], when given): before attention when
        `wait`, else in the background until the layer's next step."""
        host = self.pool.pages[layer].view(-1, 2, self.o.page_size * self.spec.head_dim)
        event = self.link.async_rows(recall_pages, host, st.row_k, st.row_v, st.pos_rows, pages, slots, st.rows,
                                     heads, self._staging(pages, host, st), lane=layer)
        if wait:
            self.link.wait(event)
        else:
            st.pending = event

    def _staging(self, pages: torch.Tensor, host: torch.Tensor, st: _Layer) -> torch.Tensor | None:
        """The reference copy's buffer of gathered rows, one for every layer (None where a kernel copies)."""
        if not staging_needed(host, st.row_k):
            return None
        shape = (pages.numel(), *host.shape[1:])
        staging = self.__dict__.get("staging")
        if staging is None or staging.shape != shape:
            staging = self.staging = host.new_empty(shape)
            self.ledger.hold("recall_staging", staging)
        return staging

    def _top(self, probs: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Each KV head's (and query token's) most probable pages in [lo, hi): [b, h, (t,) min(slots, hi - lo)]."""
        window, k = probs[..., lo:hi], min(self.o.slots, hi - lo)
        top = native.topk_indices(window, k, lo)  # C on CPU (None elsewhere)
        return top if top is not None else window.topk(k, dim=-1).indices + lo

    # -- attending --------------------------------------------------------------------------------------
    def _attend(self, layer, q, valid, scaling):
        if self._is_dense(layer):
            extra_k, extra_v, _ = self.fresh.pop(layer)
            if self.feed_mode == "store":
                return self.dense._attend(layer, q, valid, scaling)
            n = self.dense.lengths[layer]
            keys = torch.cat((self.dense.keys[layer][:, :, :n], extra_k), dim=2)
            values = torch.cat((self.dense.values[layer][:, :, :n], extra_v), dim=2)
            return causal_attention(q, keys, values, scaling, valid, q_offset=keys.shape[2] - q.shape[2])
        st = self.layers[layer]
        k_new, v_new, n_old = self.fresh.pop(layer)
        t = q.shape[2]
        if n_old == 0 and self.feed_mode == "store":  # prefill of an empty cache: over the prompt itself
            return causal_attention(q, k_new, v_new, scaling, valid, q_offset=0)
        if (t > 1 and self.feed_mode == "store") or self.in_prefill:
            k, v = self._whole_cache(layer, st, k_new, v_new, n_old)
            return causal_attention(q, k, v, scaling, valid, q_offset=n_old)
        o, p = self.o, self.o.page_size
        n = self.lengths[layer]
        lo, hi = o.sink // p, st.recent_start // p
        next_start = self._next_start(st, n + 1)
        if st.pending is not None:
            self.link.wait(st.pending)
            st.pending = None
        raw = st.scorer.token_scores(q, scaling) if st.scorer.lowbit and hi > lo else None
        query = o.query if self.feed_mode != "store" or o.query != "speculative" else "current"
        deferred = None  # a plan whose copy for some heads waits until attention has read their slots
        speculates = query == "speculative" and self.feed_mode == "speculative"
        tops = None  # with a speculative token: both tokens' choices from one top-k
        if hi > lo:
            probs = st.scorer.page_probs(q, lo, hi, scaling, raw)  # [b, h, t, pages]
            first = probs[:, :, 0]
            if speculates:
                tops = self._top(probs, lo, hi)
                mine = tops[:, :, 0]
            else:
                mine = self._top(first, lo, hi)  # this query's own choice
            if st.wanted is None or query == "current" or st.wanted.shape != mine.shape:
                self._recall(layer, st, mine, first, wait=True)
            elif query == "previous":
                drift = query_drift(q[:, :, 0], st.previous_q, self.spec.num_kv_heads, o.tau)
                if next_start // p == hi:
                    # the next step selects among the same pages with this query: one plan serves the drifted
                    # heads now and the others after attention (their slots are still read until then)
                    self.checks += drift.numel()
                    st.corrections.add_(drift.sum())
                    deferred = (*self._plan(st, mine, first), ~drift)
                    self._copy(layer, st, *deferred[:2], wait=True, heads=drift)
                else:
                    self._correct(layer, st, drift, mine, first)
            else:  # speculative: how much of the real token's choice did the guess catch?
                hit = (st.wanted.unsqueeze(-1) == mine.unsqueeze(-2)).any(-1)
                st.hits.add_(hit.sum())
                self.hit_checks += hit.numel()
                if o.correct > 0:
                    self._correct(layer, st, hit.float().mean(-1) < o.correct, mine, first)
        out = self._attention(st, q, valid, scaling, raw, n - self.stored_count(t), t)
        if query == "previous":
            st.previous_q = q[:, :, 0]
        if deferred is not None:
            self._copy(layer, st, deferred[0], deferred[1], wait=False, heads=deferred[2])
        elif (query == "previous" or speculates) and next_start // p > lo:
            # select for the next step now (the window will have moved by then) and recall in the background
            row, next_hi = (1 if speculates else 0), next_start // p
            if next_hi != hi:
                probs = st.scorer.page_probs(q[:, :, row:row + 1], lo, next_hi, scaling,
                                             None if raw is None else self._rows(raw, t, row))
                row = 0
            same = next_hi == hi and not speculates
            chosen_by = first if same else probs[:, :, row]
            if same:
                choice = mine
            elif tops is not None and next_hi == hi:
                choice = tops[:, :, row]
            else:
                choice = self._top(chosen_by, lo, next_hi)
            self._recall(layer, st, choice, chosen_by, wait=False)
        return out

    @staticmethod
    def _rows(raw: torch.Tensor, t: int, token: int) -> torch.Tensor:
        """The rows of query token `token` in raw scores grouped as (head in group) * t + token."""
        b, h, rows, n = raw.shape
        return raw.view(b, h, rows // t, t, n)[:, :, :, token]

    def _correct(self, layer, st, heads, mine, probs) -> None:
        """Reselect the KV heads in `heads` [b, h] with this query; recall what they miss before attention."""
        self.checks += heads.numel()
        st.corrections.add_(heads.sum())
        self._recall(layer, st, torch.where(heads.unsqueeze(-1), mine, st.wanted), probs, wait=True)

    def _next_start(self, st: _Layer, n: int) -> int:
        o = self.o
        start = (n - o.window) // o.window_unit * o.window_unit
        if st.scorer.lowbit:  # pages the scorer has not taken yet stay in the window one step more
            start = min(start, st.scored)
        return max(st.recent_start, o.sink, start)

    def _attention(self, st: _Layer, q, valid, scaling, raw, past: int, t: int) -> torch.Tensor:
        """One softmax over sink + slots + window (and the low-bit rest), rows masked by position."""
        lo, hi = self.o.sink, st.recent_start
        if st.values is None or hi <= lo:
            return attend_buffer(q, st.k, st.v, st.pos, past, scaling, valid)
        rest = RestRange(lo, hi, None, self.o.page_size, valid=valid, slots=slice(st.slot_start, st.ring_start))
        return attend_buffer(q, st.k, st.v, st.pos, past, scaling, valid, rest, st.scorer.quantized(),
                             st.values.quantized(), scores=raw)

    def _whole_cache(self, layer: int, st: _Layer, k_new, v_new, n_old: int):
        """All tokens on the device (multi-token forwards): host pages, then the tail not in a whole page."""
        n = self.lengths[layer]
        written = self.pool.num_pages[layer]
        src = self.pool.layer_block(layer)
        block = torch.empty(src.shape, dtype=src.dtype, device=st.k.device)
        self.link.wait(self.link.h2d(block, src))
        k, v = from_pages(block)
        tail_k, tail_v = self._span(st, k_new, v_new, n_old, written * self.o.page_size, n)
        return torch.cat((k, tail_k), dim=2), torch.cat((v, tail_v), dim=2)

    # -- reporting --------------------------------------------------------------------------------------
    def host_bytes(self) -> int:
        return 0 if self.pool is None else self.pool.used_bytes()

    def method_stats(self) -> dict:
        counts = [0, 0, 0] if self._counters is None else self._counters.sum(0).tolist()
        per_layer = [0] * self.spec.num_layers if self._counters is None else self._counters[:, 1].tolist()
        recalled, corrections, hits = counts
        page_bytes = 2 * self.o.page_size * self.spec.head_dim * torch.empty((), dtype=self.spec.dtype).element_size()
        retrieval_layers = self.spec.num_layers - self.o.dense_layers
        checks_per_layer = self.checks / max(1, retrieval_layers)
        layers = [st for st in self.layers if st is not None]
        lowbit = sum(nbytes(x) for st in layers for x in st.tensors()[4:]) if self.o.scorer == "lowbit" else 0
        return {
            "h2d_bytes": self.link.h2d_bytes + recalled * page_bytes,
            "fetched_tokens": recalled * self.o.page_size,
            "device_buffer_bytes": sum(nbytes(st.k) + nbytes(st.v) for st in layers),
            # within device_kv_bytes: a step's transient scores, and where no kernel runs (CPU), the dequantized
            # low-bit copy of one layer and the recall's gather buffer
            "device_workspace_bytes": sum(self.ledger.held.get(k, 0) for k in ("step_workspace", "recall_staging")),
            "device_lowbit_bytes": lowbit,
            "slots_per_head": self.o.slots,
            "page_size": self.o.page_size,
            "query": self.o.query,
            "recalled_pages": recalled,
            "selections": self.selections,
            "corrections": corrections,
            "correction_rate": corrections / self.checks if self.checks else None,
            "correction_rate_per_layer": [c / checks_per_layer if checks_per_layer else 0.0 for c in per_layer],
            "prefetch_hit_rate": hits / self.hit_checks if self.hit_checks else None,
        }
