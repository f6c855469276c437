"""Decode-mode perplexity: teacher-forced targets after a long real context, one token at a time."""

from __future__ import annotations

import math

import torch

from ..generate import score
from .common import make_cache, parse_length, parse_methods, text_by_name, with_full, write_json


@torch.inference_mode()
def perplexity(model, tokenizer, methods, texts=("prose", "code"), context="2k", targets: int = 256,
               out_dir=None, progress: bool = True) -> dict:
    """NLL and perplexity of `targets` tokens after `context` tokens of each text, per method; delta vs full."""
    specs = with_full(parse_methods(methods))
    context = parse_length(context)
    device = next(model.parameters()).device
    rows = []
    for name in texts:
        ids = tokenizer(text_by_name(name), return_tensors="pt", add_special_tokens=False)["input_ids"]
        if ids.shape[1] < context + targets:
            raise ValueError(f"text {name!r} has {ids.shape[1]} tokens; need context + targets = {context + targets}")
        ctx, tgt = ids[:, :context].to(device), ids[:, context:context + targets].to(device)
        full_nll = None
        for spec in specs:
            cache = make_cache(model, spec, context)
            nll = score(model, ctx, tgt, cache=cache, progress=progress)[0]
            mean = float(nll.mean())
            if full_nll is None:
                full_nll = mean
            stats = cache.stats()
            rows.append({"method": spec.label, "text": name, "context": context, "targets": targets,
                         "nll": mean, "ppl": math.exp(mean), "ppl_delta_vs_full": math.exp(mean) - math.exp(full_nll),
                         "device_kv_bytes": stats["device_kv_bytes"], "h2d_bytes": stats["h2d_bytes"],
                         "decode_steps": stats["decode_steps"]})
    result = {"eval": "ppl", "context": context, "targets": targets, "texts": list(texts), "rows": rows}
    if out_dir is not None:
        result["json"] = str(write_json(result, out_dir, "ppl.json"))
    return result
