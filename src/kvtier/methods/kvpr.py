"""`kvpr`: exact decoding with the cache offloaded; the KV of the first l tokens is recomputed on the device
from their layer inputs while the KV of the other s - l tokens crosses the link.

Host memory holds the KV of every token (as `offload` does) and, when recomputation can pay, the attention
input X of every token, so the split can move as the sequence grows. Per layer and step the link carries
X[0:l) first, then KV[l:s); the device recomputes K = RoPE(norm(X W_k)), V = X W_v for [0, l) with the
model's own weights while the tail is in flight. l comes from the cost model in `schedule` fed by the
measured `profile`, or is fixed by the user (`split=int`). With grouped-query attention moving X usually
costs as much as the KV it replaces, and the scheduler says so and picks l = 0 (then kvpr == offload).
See docs/methods.md.
"""

from __future__ import annotations

import torch

from ..attention import causal_attention
from ..link import StagingPair
from ..hardware import load_profile
from ..schedule import plan_split
from ..sizes import grown
from ..store import ForkShare, from_pages
from .base import register
from .offload import Offload


@register
class KVPR(Offload):
    """Partial KV recomputation overlapped with transfer. Exact.

    Options: split ("auto": the cost model picks l per step; an int: recompute that many leading tokens),
    profile (None: the cached or freshly measured machine profile; a dict with h2d_bytes_per_s and
    matmul_flops_per_s; or a path to a profile JSON).
    """

    name = "kvpr"
    exact = True
    defaults = {"split": "auto", "profile": None}
    needs_layer_inputs = True

    @classmethod
    def check_values(cls, options: dict) -> None:
        super().check_values(options)
        split = options.get("split", cls.defaults["split"])
        if not (split == "auto" or (isinstance(split, int) and not isinstance(split, bool) and split >= 0)):
            raise ValueError(f"kvpr split must be 'auto' or a non-negative int number of tokens, got {split!r}")

    def __init__(self, spec, **options):
        super().__init__(spec, **options)
        self.split = self.options["split"]
        self.hardware = None
        if self.options["profile"] is not None:
            # a given profile (dict, file) is read now: a bad one fails here, not in the first forward, which it
            # would leave broken. None stays lazy: measuring the machine takes a while, and only a forward needs it
            self._load_hardware()
        self.projectors = None
        self.acts: list[torch.Tensor | None] = [None] * spec.num_layers  # host [capacity, b, hidden]
        self.num_acts = [0] * spec.num_layers
        self.act_shares: list[ForkShare | None] = [None] * spec.num_layers  # forks reading the same inputs
        self.keep_acts: bool | None = None  # decided once, at the first forward
        self.x_staging = StagingPair(spec.device, spec.dtype, self.ledger, name="x_staging")
        self.cos = self.sin = None  # device [b, capacity, head_dim]: RoPE of every cached position
        self.num_rope = 0
        self.plans: dict[int, object] = {}
        self.recompute_tokens = 0
        self.last_plan = None

    def attach(self, projectors) -> None:
        self.projectors = projectors

    # -- forking: the layer inputs are host rows like the pool's pages, shared the same way -------------------
    def model_refs(self) -> dict[str, object]:
        return {**super().model_refs(), "projectors": self.projectors}

    def fork_shares(self, link):
        return {**super().fork_shares(link), "acts": (self.acts, list(self.acts))}

    def forked_from(self, parent) -> None:
        self.act_shares = [None] * self.spec.num_layers
        for layer, buf in enumerate(self.acts):
            if buf is not None:
                ForkShare.join(parent, parent.act_shares, self, self.act_shares, layer)

    def held_rows(self, layer: int) -> int:
        return self.num_acts[layer]

    # -- the cost model ---------------------------------------------------------------------------------
    def _load_hardware(self) -> None:
        s = self.spec
        self.hardware = load_profile(self.options["profile"], device=s.device, dtype=s.dtype,
                                     hidden_size=s.hidden_size, kv_width=s.num_kv_heads * s.head_dim)

    def plan_for(self, tokens: int, batch: int):
        if tokens not in self.plans:
            if self.hardware is None:
                self._load_hardware()
            s = self.spec
            self.plans = {tokens: plan_split(
                tokens, batch, s.hidden_size, s.num_kv_heads * s.head_dim,
                s.dtype.itemsize, self.hardware.h2d_bytes_per_s,
                self.hardware.matmul_flops_per_s, split=self.split)}
        return self.plans[tokens]

    def _split_for(self, layer: int, tokens: int) -> int:
        plan = self.plan_for(tokens, self.batch)
        self.last_plan = plan
        if not self.keep_acts:
            return 0
        return min(plan.split, self.num_acts[layer])

    # -- storing ----------------------------------------------------------------------------------------
    def observe(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """The layer's attention input (after the input norm) and the RoPE of its positions, before `append`."""
        b, t, _ = x.shape
        if self.keep_acts is None:
            # The optimal split is a fixed fraction of s (closed form), so one decision holds as s grows.
            self.last_plan = self.plan_for(t, b)
            self.keep_acts = self.last_plan.split > 0 if self.split == "auto" else self.split > 0
        if not self.keep_acts:
            return  # l = 0 for the whole run: no activations, no RoPE tables
        if layer == 0:
            self._store_rope(cos.expand(b, -1, -1), sin.expand(b, -1, -1))
        n = self.num_acts[layer]
        buf = self.acts[layer]
        share = self.act_shares[layer]
        if buf is None or buf.shape[0] < n + t or (share is not None and not share.may_append(self, layer, n)):
            # grow, or copy on write: a fork (or the parent) holds the rows past ours
            capacity = grown(n + t, self.reserved)
            new = torch.empty((capacity, b, x.shape[2]), dtype=x.dtype, pin_memory=self.link.cuda)
            if n:
                self.link.synchronize()
                new[:n].copy_(buf[:n])
            self.acts[layer] = buf = new
            if share is not None:
                share.readers.discard(self)
                self.act_shares[layer] = None
        self.link.d2h(buf[n:n + t], x.transpose(0, 1).contiguous())
        self.num_acts[layer] = n + t

    def _store_rope(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        n, t = self.num_rope, cos.shape[1]
        if self.cos is None or self.cos.shape[1] < n + t:
            capacity = grown(n + t, self.reserved)
            new_cos = cos.new_empty((cos.shape[0], capacity, cos.shape[2]))
            new_sin = torch.empty_like(new_cos)
            if n:
                new_cos[:, :n], new_sin[:, :n] = self.cos[:, :n], self.sin[:, :n]
            self.cos, self.sin = new_cos, new_sin
            self.ledger.hold("rope", new_cos, new_sin)
        self.cos[:, n:n + t], self.sin[:, n:n + t] = cos, sin
        self.num_rope = n + t

    # -- moving and attending ---------------------------------------------------------------------------
    def _prefetch(self, layer: int, avoid: tuple | None = None) -> None:
        tokens = self.pool.tokens(layer)
        if tokens == 0:
            return
        split = self._split_for(layer, tokens)
        avoid_x, avoid_kv = avoid if avoid else (None, None)
        x_index = kv_index = x_event = kv_event = None
        x_block = kv_block = None
        if split:  # activations first: recomputation starts as soon as they land, while the KV tail copies
            src = self.acts[layer][:split]
            if self.reserved:  # both buffers sized once for the whole length, as the KV staging is
                self.x_staging.reserve(self.reserved * src.shape[1] * src.shape[2])
            x_index, flat = self.x_staging.take(src.numel(), avoid=avoid_x)
            x_block = flat.view(src.shape)
            x_event = self.link.h2d(x_block, src, lane=0)
        if tokens > split:
            src = self.pool.pages[layer][split:tokens]
            kv_index, flat = self.staging.take(src.numel(), avoid=avoid_kv)
            kv_block = flat.view(src.shape)
            kv_event = self.link.h2d(kv_block, src, lane=1)
        self.staged[layer] = (tokens, split, x_index, x_block, x_event, kv_index, kv_block, kv_event)

    def _attend(self, layer, q, valid, scaling):
        k_new, v_new = self.fresh.pop(layer)
        past = self.lengths[layer] - k_new.shape[2]
        in_use = None
        if past:
            staged = self.staged.pop(layer, None)
            if staged is None or staged[0] != past:
                self._prefetch(layer)  # not prefetched: fetch now, on the critical path
                staged = self.staged.pop(layer)
            _, split, x_index, x_block, x_event, kv_index, kv_block, kv_event = staged
            in_use = (x_index, kv_index)
            keys, values = [], []
            if split:
                self.link.wait(x_event)
                x = x_block.transpose(0, 1)  # [b, l, hidden]
                k_rec, v_rec = self.projectors[layer](x, self.cos[:, :split], self.sin[:, :split])
                keys.append(k_rec.to(k_new.dtype))
                values.append(v_rec.to(v_new.dtype))
                self.recompute_tokens += split
            if kv_block is not None:
                self.link.wait(kv_event)
                k_tail, v_tail = from_pages(kv_block)
                keys.append(k_tail)
                values.append(v_tail)
            k = torch.cat((*keys, k_new), dim=2)
            v = torch.cat((*values, v_new), dim=2)
        else:
            k, v = k_new, v_new
        self._prefetch((layer + 1) % self.spec.num_layers, avoid=in_use)
        return causal_attention(q, k, v, scaling, valid, q_offset=past)

    def host_bytes(self) -> int:
        acts = sum(n * (a.shape[1] * a.shape[2] * a.element_size()) for n, a in zip(self.num_acts, self.acts)
                   if a is not None)
        return super().host_bytes() + acts

    def method_stats(self) -> dict:
        plan = self.last_plan
        out = {"recompute_tokens": self.recompute_tokens, "stores_activations": bool(self.keep_acts),
               "split": self.split}
        if plan is not None:
            out.update({"chosen_split": plan.split, "plan_tokens": plan.tokens, "plan_reason": plan.reason,
                        "predicted_layer_s": plan.t_total, "predicted_offload_layer_s": plan.t_offload,
                        "predicted_act_s": plan.t_act, "predicted_recompute_s": plan.t_rec,
                        "predicted_kv_s": plan.t_kv})
        if self.hardware is not None:
            out.update({"profile_h2d_bytes_per_s": self.hardware.h2d_bytes_per_s,
                        "profile_matmul_flops_per_s": self.hardware.matmul_flops_per_s,
                        "profile_source": self.hardware.source})
        return out
