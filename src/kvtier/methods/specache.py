"""`specache`: a low-bit copy of every key and value on the device scores importance; the top-k full-precision
pairs are fetched from host memory; a speculative next token predicts what the next step will need
(SpeCache, ICML 2025, arXiv 2503.16163).

Device: per layer a KIVI-style low-bit copy (keys per channel, values per token, `bits` bits, groups of
`group_size`), the newest `residual` tokens in full precision, and a buffer of `topk` fetched full-precision
pairs per KV head. Host: the full-precision KV of every token. Attention is mixed precision: the dequantized
copy with the fetched positions overwritten by their full-precision values, plus the residual window.

Under kvtier.generate (speculative=True) each decode step feeds two tokens, the real x_t and a speculative
x^_{t+1} (`speculative_step`): the real row cannot see the speculative one; the speculative row's
attention picks the top-k for step t+1 and their fetch starts at once; only the real token is stored.
Under plain `model.generate` there is no speculative token: each layer picks its top-k with the current
query and fetches them before attending, so the output is what SpeCache would give with perfect
prediction, and the fetch sits on the critical path instead of overlapping.
"""

from __future__ import annotations

import torch

from ..attention import attend, causal_attention
from ..quant import LowBitKV
from ..store import HostPool, to_pages
from .base import Method, register


@register
class SpeCache(Method):
    """Low-bit device copy + top-k full-precision fetch + speculative-token prefetch. Approximate.

    Options: bits (1 or 2), group_size (tokens per key group, and channels per value group unless value_group
    says otherwise), value_group (channels per value group; None: group_size, at most head_dim), residual (newest
    tokens kept in full precision), topk (full-precision pairs fetched per KV head and step), speculative
    (use the two-token step in kvtier.generate; False fetches by the current query everywhere), correct.

    correct (beyond the paper, which never corrects; default 0, off): a prefetch hit-rate threshold. In the
    speculative step, a layer where some KV head's prefetched top-k holds less than `correct` of the real
    token's top-k fetches the real top-k synchronously before attending. On the embedded model's needle grid
    (2k and 4k, 5 depths) fetching by the current query finds 4 needles of full's 5 where the uncorrected
    speculation finds 1: the misses are the steps where the speculative token was wrong. With key groups of 32
    and correct=0.9 it finds exactly full's 5 (9 of 10 answers token-identical), correcting 41% of the
    layer-steps on average (15-62% per prompt), at 0.16x (4k) to 0.20x (2k) of full's device bytes
    (docs/results/fidelity-bars). Each correction is a synchronous fetch: the price is paid in overlap.
    """

    name = "specache"
    exact = False
    defaults = {"bits": 2, "group_size": 64, "residual": 64, "topk": 64, "speculative": True, "value_group": None,
                "correct": 0.0}

    def __init__(self, spec, **options):
        super().__init__(spec, **options)
        o = self.options
        if o["bits"] not in (1, 2):
            raise ValueError(f"specache bits must be 1 or 2, got {o['bits']!r}")
        for key in ("group_size", "residual", "topk"):
            if not isinstance(o[key], int) or isinstance(o[key], bool) or o[key] < 1:
                raise ValueError(f"specache {key} must be a positive int, got {o[key]!r}")
        if not isinstance(o["speculative"], bool):
            raise ValueError(f"specache speculative must be True or False, got {o['speculative']!r}")
        if isinstance(o["correct"], bool) or not isinstance(o["correct"], (int, float)) or not 0 <= o["correct"] <= 1:
            raise ValueError(f"specache correct is a prefetch hit-rate threshold in [0, 1] (0: never correct), "
                             f"got {o['correct']!r}")
        self.correct = float(o["correct"])
        self.checks = 0
        self.corrections = 0
        if o["value_group"] is None:
            self.value_group = min(o["group_size"], spec.head_dim)
            if spec.head_dim % self.value_group:
                raise ValueError(f"specache group_size {o['group_size']} must divide head_dim {spec.head_dim} "
                                 "(values are grouped along channels), or give value_group")
        else:
            self.value_group = o["value_group"]
            if not isinstance(self.value_group, int) or isinstance(self.value_group, bool) or self.value_group < 1 \
                    or spec.head_dim % self.value_group:
                raise ValueError(f"specache value_group must be a positive divisor of head_dim {spec.head_dim}, "
                                 f"got {self.value_group!r}")
        self.lowbit: list[LowBitKV] = []
        self.pool: HostPool | None = None
        self.fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.prefetched: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]] = {}
        self.fetched_tokens = 0
        self.hits = 0
        self.hit_total = 0

    supports_speculation = True

    # -- storing ----------------------------------------------------------------------------------------
    def _append(self, layer, k, v):
        if self.pool is None:
            s = self.spec
            self.pool = HostPool(s.num_layers, k.shape[0], s.num_kv_heads, s.head_dim, 1, s.dtype, self.link)
            self.lowbit = [LowBitKV(self.options["bits"], self.options["group_size"], self.options["residual"],
                                    value_group=self.value_group, cache_dequantized=False)
                           for _ in range(s.num_layers)]
        self.fresh[layer] = (k, v)
        keep = self.stored_count(k.shape[2])
        if keep:
            self.lowbit[layer].append(k[:, :, :keep], v[:, :, :keep])
            self.pool.write(layer, to_pages(k[:, :, :keep], v[:, :, :keep], 1))
            self.ledger.hold(f"lowbit{layer}", *self.lowbit[layer].tensors())

    # -- fetching ---------------------------------------------------------------------------------------
    def _fetch(self, layer: int, positions: torch.Tensor, held_as: str = "fetched") -> None:
        """Start copying the full-precision K, V at positions [b, h, k] host -> device (waited on at use)."""
        b, h, k = positions.shape
        d = self.spec.head_dim
        flat = self.pool.pages[layer].view(-1, 2, d)  # one-token pages [token, b, h, 2, 1, d] as rows
        seq = torch.arange(b).view(b, 1, 1)
        head = torch.arange(h).view(1, h, 1)
        src = flat.index_select(0, ((positions.cpu() * b + seq) * h + head).reshape(-1))
        if self.link.cuda:
            src = src.pin_memory()
        dst = torch.empty(src.shape, dtype=src.dtype, device=self.device)
        event = self.link.h2d(dst, src, lane=layer)
        self.fetched_tokens += b * h * k
        self.ledger.hold(f"{held_as}{layer}", dst)
        self.prefetched[layer] = (positions, dst.view(b, h, k, 2, d), event, self.lowbit[layer].quantized_tokens)

    def _topk(self, q_rows: torch.Tensor, keys: torch.Tensor, prefix: int, scaling: float) -> torch.Tensor:
        """Per KV head, the top-k of the first `prefix` keys by attention probability averaged over the group."""
        b, num_heads, t, d = q_rows.shape
        num_kv = keys.shape[1]
        qg = q_rows.reshape(b, num_kv, num_heads // num_kv * t, d)
        probs = torch.softmax(torch.matmul(qg, keys.transpose(-1, -2)).float() * scaling, dim=-1)
        return probs[..., :prefix].mean(dim=2).topk(min(self.options["topk"], prefix), dim=-1).indices

    # -- attending --------------------------------------------------------------------------------------
    def _attend(self, layer, q, valid, scaling):
        k_new, v_new = self.fresh.pop(layer)
        t = q.shape[2]
        stored = self.stored_count(t)
        past = self.lengths[layer] - stored  # tokens cached before this forward
        if past == 0:  # prefill: exact attention over the prompt itself
            return causal_attention(q, k_new, v_new, scaling, valid, q_offset=0)
        if t > 1 and self.feed_mode == "store":  # multi-token forward: exact, over the full-precision copy
            k_all, v_all = self._host_all(layer, past)
            return causal_attention(q, torch.cat((k_all, k_new), 2), torch.cat((v_all, v_new), 2), scaling,
                                    valid, q_offset=past)
        low = self.lowbit[layer]
        nq = low.quantized_tokens
        k_hat, v_hat = low.dequantized()  # transient: the packed copy is what stays on the device
        res_k, res_v = low.residual_kv()
        res_k, res_v = res_k[:, :, :res_k.shape[2] - stored], res_v[:, :, :res_v.shape[2] - stored]
        keys = torch.cat((k_hat, res_k, k_new), dim=2)  # positions 0..past+t-1
        values = torch.cat((v_hat, res_v, v_new), dim=2)
        prefetched = self.prefetched.pop(layer, None)
        if nq:
            real_top = self._topk(q[:, :, :1], keys[:, :, :past + 1], nq, scaling)
            if self.feed_mode == "store" or prefetched is None:
                self._fetch(layer, real_top)  # no speculation to rely on: fetch by the current query
                prefetched = self.prefetched.pop(layer)
            if self.feed_mode == "lookahead":
                self.prefetched[layer] = prefetched  # for the first speculative step; attend low-bit only
            else:
                positions, kv, event, nq_then = prefetched
                self.link.wait(event)
                self._overwrite(keys, values, positions, kv)
                if self.feed_mode == "speculative":
                    hit = (positions.unsqueeze(-1) == real_top.unsqueeze(-2)).any(-1)
                    self.hits += int(hit.sum())
                    self.hit_total += hit.numel()
                    if self.correct > 0:
                        self._correct(layer, keys, values, hit, real_top)
                if nq > nq_then:
                    # Tokens that left the full-precision window after the prefetch was chosen: the guess could
                    # not pick them, so read them at full precision once more (one group per group_size steps).
                    b, h = keys.shape[:2]
                    self._fetch_into(layer, keys, values, torch.arange(nq_then, nq).expand(b, h, -1))
        out = attend(q, keys, values, scaling, _causal_rows(valid, t, keys.shape[2], past, q.device))
        if self.feed_mode == "speculative" and nq:
            # The speculative row (position past+1, which sees the real token) picks step t+1's top-k from the
            # low-bit keys; its fetch starts now and overlaps the rest of this step.
            self._fetch(layer, self._topk(q[:, :, 1:], torch.cat((k_hat, res_k, k_new), 2), nq, scaling))
        return out

    def _correct(self, layer, keys, values, hit, real_top) -> None:
        """When a KV head's speculative top-k caught less than `correct` of the real token's, fetch the real
        top-k now, synchronously, on top of what was prefetched (a wrong guess otherwise leaves the tokens the
        real token attends to most at low precision)."""
        self.checks += 1
        if bool((hit.float().mean(-1) < self.correct).any()):
            self.corrections += 1
            self._fetch_into(layer, keys, values, real_top)

    def _fetch_into(self, layer, keys, values, positions) -> None:
        """Fetch positions synchronously and overwrite them in keys/values. Its buffer is counted on the device
        beside the prefetched one (both are alive here) and released once written."""
        self._fetch(layer, positions, held_as="extra")
        _, kv, event, _ = self.prefetched.pop(layer)
        self.link.wait(event)
        self._overwrite(keys, values, positions, kv)
        self.ledger.release(f"extra{layer}")

    @staticmethod
    def _overwrite(keys, values, positions, kv) -> None:
        """Put fetched full-precision pairs kv [b, h, k, 2, d] at their positions [b, h, k] of keys/values."""
        index = positions.to(keys.device).unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
        keys.scatter_(2, index, kv[:, :, :, 0].to(keys.dtype))
        values.scatter_(2, index, kv[:, :, :, 1].to(values.dtype))

    def _host_all(self, layer: int, tokens: int):
        src = self.pool.layer_block(layer)[:tokens]
        block = torch.empty(src.shape, dtype=src.dtype, device=self.device)
        self.link.wait(self.link.h2d(block, src))
        kv = block.squeeze(4).permute(1, 2, 3, 0, 4)  # [n, b, h, 2, d] -> [b, h, 2, n, d]
        return kv[:, :, 0], kv[:, :, 1]

    # -- reporting --------------------------------------------------------------------------------------
    def host_bytes(self) -> int:
        return 0 if self.pool is None else self.pool.used_bytes()

    def method_stats(self) -> dict:
        lowbit = sum(low.bytes_split()[0] for low in self.lowbit)
        residual = sum(low.bytes_split()[1] for low in self.lowbit)
        return {
            "bits": self.options["bits"],
            "topk": self.options["topk"],
            "fetched_tokens": self.fetched_tokens,
            "prefetch_hit_rate": self.hits / self.hit_total if self.hit_total else None,
            "corrections": self.corrections,
            "correction_rate": self.corrections / self.checks if self.checks else None,
            "device_lowbit_bytes": lowbit,
            "device_residual_bytes": residual,
            "device_fetched_bytes": sum(v for k, v in self.ledger.held.items() if k.startswith("fetched")),
        }


def _causal_rows(valid, t: int, n: int, past: int, device):
    """Mask [b or 1, t, n]: row i sees keys 0..past+i (so the real row never sees the speculative token)."""
    q_pos = torch.arange(past, past + t, device=device)
    mask = (torch.arange(n, device=device).unsqueeze(0) <= q_pos.unsqueeze(1)).unsqueeze(0)
    if valid is not None:
        mask = mask & valid[:, None, :n]
    return mask
