"""Fused Triton kernels, each in a module beside the PyTorch function it must equal.

`enabled(x)` decides, per call, whether the library takes the kernel path: always for CUDA tensors when triton
imports (unless KVTIER_KERNELS=torch), and on CPU only when KVTIER_KERNELS=triton and TRITON_INTERPRET=1, so the
CPU test-suite drives the very launchers the GPU runs, through triton's interpreter. Triton is imported only when
a launcher is first used: importing kvtier never needs it, and the kernel modules may import the library
modules whose references they implement without an import cycle.

On CPU, `native_enabled(x)` decides whether the C kernels of `native` (native.c) run instead of the PyTorch
references: by default wherever the library builds (KVTIER_KERNELS=torch turns them off, as it does Triton).

Launchers (see each module): page_scores, page_probs (digest_score); plan_pages, recall_pages (recall);
dequant_scores (dequant_score); decode_attention (decode);
decode_attention_mixed (mixed_decode).
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

_LAUNCHERS = {
    "page_scores": "digest_score",
    "page_probs": "digest_score",
    "plan_pages": "recall",
    "recall_pages": "recall",
    "dequant_scores": "dequant_score",
    "decode_attention": "decode",
    "decode_attention_mixed": "mixed_decode",
}

# Query rows (group size x query tokens) one decode-attention program holds in registers.
DECODE_MAX_ROWS = 64


@functools.cache
def available() -> bool:
    """Whether triton imports here (checked once)."""
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install must not break the PyTorch path
        return False
    return True


def enabled(x: torch.Tensor) -> bool:
    """Whether an operation on x should run its Triton kernel (read from the environment at every call)."""
    mode = os.environ.get("KVTIER_KERNELS", "auto")
    if mode == "torch":
        return False
    if x.is_cuda:
        return available()
    return mode == "triton" and os.environ.get("TRITON_INTERPRET") == "1" and available()


def native_enabled(x: torch.Tensor) -> bool:
    """Whether an operation on CPU tensor x should run its C kernel (`native`), read from the environment at
    every call: on CPU unless KVTIER_KERNELS is "torch" (references) or "triton" (the interpreter's kernels)."""
    if x.device.type != "cpu" or os.environ.get("KVTIER_KERNELS", "auto") not in ("auto", "native"):
        return False
    from . import native

    return native.library() is not None


def decode_fits(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether `decode_attention` serves attend(q [b, H, t, d], k [b, H_kv, n, d]): a few query tokens, some keys."""
    b, num_heads, t, _ = q.shape
    return k.shape[2] > 0 and num_heads // k.shape[1] * t <= DECODE_MAX_ROWS


def mixed_fits(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether `decode_attention_mixed` serves attend_mixed(q [b, H, t, d], k [b, H_kv, L, d]): the query group
    fits one program's registers (no key is needed: the low-bit tokens may be all there is)."""
    return q.shape[1] // k.shape[1] * q.shape[2] <= DECODE_MAX_ROWS


def __getattr__(name: str):
    if name in _LAUNCHERS:
        return getattr(importlib.import_module(f".{_LAUNCHERS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["available", "enabled", "native_enabled", "decode_fits", "mixed_fits", "DECODE_MAX_ROWS", *_LAUNCHERS]
