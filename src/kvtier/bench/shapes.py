"""The benchmark's model shapes: real ones (random weights, built from a local config) and tiny CPU ones."""

from __future__ import annotations

import torch

from ..models import head_dim, tiny_config

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# name -> (family, config fields). Real shapes keep their sizes; every one gets MAX_POSITIONS positions.
REAL_SHAPES = {
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                                   rope_parameters=LLAMA3_ROPE, rms_norm_eps=1e-5)),
    "llama-2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32, head_dim=128, vocab_size=32000,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, head_dim=128, vocab_size=152064,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                                 rms_norm_eps=1e-6, use_sliding_window=False, tie_word_embeddings=False)),
}
TINY_SHAPES = {  # CPU harness checks (tiny_config's family defaults, a little larger)
    "tiny-llama": ("llama", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                                 num_key_value_heads=2, head_dim=32, vocab_size=1024)),
    "tiny-mha": ("llama", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                               num_key_value_heads=8, head_dim=32, vocab_size=1024)),
}
SHAPES = {**REAL_SHAPES, **TINY_SHAPES}
MAX_POSITIONS = 131072 + 4096  # a 128k prompt plus room for its decode steps


def model_config(name: str):
    """The transformers config of a named shape (built locally)."""
    if name not in SHAPES:
        raise ValueError(f"unknown model config {name!r}; valid: {', '.join(SHAPES)}")
    family, fields = SHAPES[name]
    if name in TINY_SHAPES:
        return tiny_config(family, max_position_embeddings=32768, **fields)
    from transformers import AutoConfig

    return AutoConfig.for_model(family, max_position_embeddings=MAX_POSITIONS, **fields)


def parameter_count(name: str) -> int:
    """Parameters of a named shape, from a model built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(name))
    return sum(p.numel() for p in model.parameters())


def build_model(name: str, device, dtype, seed: int = 0):
    """A random-weight model of a named shape, created directly on `device` in `dtype`, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(name), dtype=dtype)
    return model.eval()


def weight_bytes_per_step(model) -> int:
    """Bytes of weights a decode step reads: all of them but the input embedding (one row per token),
    unless that is tied to the output projection."""
    total = sum(p.nbytes for p in model.parameters())
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total if emb.data_ptr() == out.data_ptr() else total - emb.nbytes


def kv_bytes(config, tokens: int, batch: int, dtype) -> int:
    """Bytes of every key and value of `tokens` tokens of `batch` sequences, all layers."""
    return 2 * tokens * batch * config.num_hidden_layers * config.num_key_value_heads * head_dim(config) * dtype.itemsize
