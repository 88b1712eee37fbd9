"""Load a model replica (HF directory or hub id, GGUF file, or a config for tiny random models).

Only families whose attention we can take over through transformers' attention interface, and
whose rope is shift invariant, are accepted; anything else fails here with a message naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from cache_service.errors import ConfigError, UnsupportedError
from kernels.rope import RopeTable
from workers import hook  # noqa: F401  (registers the "hogwild" attention function)

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ModelInfo:
    """What a driver needs of a model, without its weights: config, tokenizer (None for random
    test models) and name."""

    config: PretrainedConfig
    tokenizer: object | None
    name: str

    @property
    def max_context(self) -> int:
        """Longest view the engine may build: the sliding window, if the model has one."""
        window = getattr(self.config, "sliding_window", None)
        limit = self.config.max_position_embeddings
        return min(window, limit) if window else limit


@dataclass
class LoadedModel:
    """A causal LM ready for the engine, with its tokenizer (None for random test models)."""

    model: torch.nn.Module
    tokenizer: object | None
    rope: RopeTable
    name: str

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.config, self.tokenizer, self.name)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_context(self) -> int:
        return self.info.max_context


def check_supported(config: PretrainedConfig) -> None:
    """Raise ``UnsupportedError`` naming what in ``config`` the engine cannot run."""
    family = config.model_type
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedError(
            f"model family {family!r} is not supported; use one of {', '.join(SUPPORTED_FAMILIES)}"
        )
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedError(
            f"rope type {rope_type!r} is not supported: its frequencies change with length, so a "
            f"key cannot be moved by a rotation; use one of {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    factor = (config.rope_parameters or {}).get("partial_rotary_factor", 1.0)
    if factor != 1.0:
        raise UnsupportedError(
            f"partial_rotary_factor={factor} is not supported by transformers' {family} attention "
            "(it rotates whole heads); use a config without it"
        )
    if getattr(config, "use_sliding_window", False) and family == "qwen2":
        raise UnsupportedError("qwen2 with use_sliding_window=True is not supported; disable it")


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise UnsupportedError(
            f"dtype {dtype} is not supported; use float32, bfloat16 or float16"
        )


def rope_table(model: torch.nn.Module) -> RopeTable:
    """The model's own inverse frequencies (from transformers' rope initialisation)."""
    rotary = model.base_model.rotary_emb
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return RopeTable.from_inv_freq(rotary.original_inv_freq, head_dim)


def tiny_config(family: str = "llama", **overrides) -> PretrainedConfig:
    """A small random-weight config of a supported family (tests, benchmarks)."""
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedError(f"model family {family!r} is not supported")
    settings = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
    )
    if family == "mistral":
        settings["sliding_window"] = None
    settings.update(overrides)
    return AutoConfig.for_model(family, **settings)


def load_model(
    source: str | Path | PretrainedConfig,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Load ``source``: a config (random weights), a ``.gguf`` file, a HF directory or hub id."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    check_dtype(dtype)
    if isinstance(source, PretrainedConfig):
        check_supported(source)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(source, dtype=dtype)
        tokenizer, name = None, f"random-{source.model_type}"
    else:
        model, tokenizer, name = _load_pretrained(source, dtype)
    model.to(device).eval()
    model.set_attn_implementation("hogwild")
    return LoadedModel(model, tokenizer, rope_table(model), name)


def load_model_info(source: str | Path | PretrainedConfig) -> ModelInfo:
    """Config and tokenizer of ``source`` (as ``load_model`` takes it), checked, without weights."""
    if isinstance(source, PretrainedConfig):
        check_supported(source)
        return ModelInfo(source, None, f"random-{source.model_type}")
    return _read_info(source, *_locate(source))


def _load_pretrained(source: str | Path, dtype: torch.dtype):
    location, kwargs = _locate(source)
    info = _read_info(source, location, kwargs)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
    return model, info.tokenizer, info.name


def _read_info(source: str | Path, location: str, kwargs: dict) -> ModelInfo:
    config = AutoConfig.from_pretrained(location, **kwargs)
    check_supported(config)  # before any weight is read
    return ModelInfo(config, AutoTokenizer.from_pretrained(location, **kwargs), str(source))


def _locate(source: str | Path) -> tuple[str, dict]:
    """Where transformers finds ``source``, and the keywords it needs (``gguf_file``)."""
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"GGUF file {path} does not exist; check the path")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        return str(path), {}
    if str(source).count("/") == 1 and not str(source).startswith((".", "/", "~")):
        return str(source), {}  # a hub id; needs a network
    raise ConfigError(f"model {source!r} not found: give a local directory, a .gguf file or a hub id")
