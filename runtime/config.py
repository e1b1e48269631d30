"""Typed TiDAR model configuration, read from and written to a Hugging Face `config.json`.

A TiDAR checkpoint is an ordinary Hugging Face checkpoint of a Qwen2, Qwen3 or Llama
backbone plus a `tidar` block (`mask_token_id`, `block_size`). This module reads both the
transformers 4.x spelling of RoPE settings (`rope_theta` + `rope_scaling`) and the 5.x one
(`rope_parameters`), validates every field with an error that names it, and writes the
4.x spelling back (both transformers generations read it).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}


class ConfigError(ValueError):
    """A config.json that is missing, unreadable or inconsistent; the message names the field."""


@dataclass(frozen=True)
class TiDARConfig:
    """Everything the runtime needs to know about a TiDAR model."""

    model_type: str
    """Backbone family: 'qwen2' (q/k/v bias), 'qwen3' (per-head q/k RMSNorm) or 'llama'."""
    vocab_size: int
    """Rows of the embedding and of the LM head (the mask id must be below it)."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    num_hidden_layers: int
    """Number of decoder layers."""
    num_attention_heads: int
    """Query heads per layer."""
    num_key_value_heads: int
    """Key/value heads per layer (GQA); divides num_attention_heads."""
    head_dim: int
    """Width of one attention head (hidden_size // num_attention_heads unless given)."""
    max_position_embeddings: int
    """Largest position id the model supports; prompts plus drafts must stay below it."""
    rms_norm_eps: float
    """Epsilon of every RMSNorm."""
    rope_theta: float
    """RoPE base frequency."""
    mask_token_id: int
    """Token id of [MASK], the diffusion slot (`tidar.mask_token_id`)."""
    block_size: int
    """Draft length b the model was trained with (`tidar.block_size`); inference uses b' <= b."""
    rope_scaling: dict | None = None
    """RoPE scaling: None, {'rope_type': 'linear', 'factor'} or Llama-3 style {'rope_type':
    'llama3', 'factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'}."""
    attention_bias: bool = False
    """Whether q/k/v projections carry a bias (always true for Qwen2)."""
    tie_word_embeddings: bool = False
    """Whether the LM head shares the embedding matrix."""
    bos_token_id: int | None = None
    """Beginning-of-sequence id, if the tokenizer uses one."""
    eos_token_ids: tuple[int, ...] = ()
    """End-of-sequence ids; generation stops on any of them."""
    pad_token_id: int | None = None
    """Padding id, if any."""
    torch_dtype: str = "float32"
    """Dtype the weights are stored in ('float32', 'bfloat16', 'float16')."""
    extra: dict = field(default_factory=dict, compare=False, repr=False)
    """Fields of config.json this class does not interpret, kept so a round trip loses nothing."""

    # ----------------------------------------------------------------- derived
    @property
    def qk_norm(self) -> bool:
        """Qwen3 normalizes each query and key head with an RMSNorm before RoPE."""
        return self.model_type == "qwen3"

    @property
    def has_qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    # ----------------------------------------------------------------- reading
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "TiDARConfig":
        """Validate a parsed config.json; `source` names the file in error messages."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        raw = dict(raw)
        model_type = raw.pop("model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: field 'model_type' is {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        tidar = raw.pop("tidar", None)
        if not isinstance(tidar, dict):
            raise ConfigError(
                f"{source}: no 'tidar' block (with 'mask_token_id' and 'block_size'); "
                "this is a plain AR checkpoint, not a TiDAR one"
            )
        tidar = dict(tidar)  # fields are popped from it below; leave the caller's dict alone

        def take(name: str, kind: type, default: Any = ..., store: dict = raw) -> Any:
            value = store.pop(name, default)
            field_name = f"tidar.{name}" if store is tidar else name  # as validate() spells it
            if value is ...:
                raise ConfigError(f"{source}: missing field {field_name!r}")
            if value is None and default is None:
                return None
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
                raise ConfigError(f"{source}: field {field_name!r} must be {kind.__name__}, got {value!r}")
            return value

        # Backbone features the reference model does not implement: refuse them rather than
        # compute something other than what transformers computes for the same checkpoint.
        hidden_act = raw.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ConfigError(f"{source}: field 'hidden_act' is {hidden_act!r}; only 'silu' (SwiGLU) is supported")
        for name in ("mlp_bias", "use_sliding_window"):
            if raw.get(name):
                raise ConfigError(f"{source}: field {name!r} is {raw[name]!r}; not supported by the TiDAR runtime")

        vocab_size = take("vocab_size", int)
        hidden_size = take("hidden_size", int)
        heads = take("num_attention_heads", int)
        kv_heads = take("num_key_value_heads", int, heads)
        head_dim = take("head_dim", int, None)
        if head_dim is None and model_type == "qwen3":
            head_dim = 128  # transformers' Qwen3Config default (not hidden_size // heads)
        if head_dim is None:
            if heads <= 0 or hidden_size % heads:
                raise ConfigError(f"{source}: field 'hidden_size' ({hidden_size}) is not divisible by "
                                  f"'num_attention_heads' ({heads}) and no 'head_dim' is given")
            head_dim = hidden_size // heads

        # RoPE: transformers 4.x writes rope_theta + rope_scaling, 5.x writes rope_parameters.
        rope_params = raw.pop("rope_parameters", None)
        rope_theta = take("rope_theta", float, None)
        rope_scaling = raw.pop("rope_scaling", None)
        if rope_params is not None:
            if not isinstance(rope_params, dict):
                raise ConfigError(f"{source}: field 'rope_parameters' must be an object, got {rope_params!r}")
            rope_params = dict(rope_params)
            rope_theta = rope_params.pop("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        if rope_theta is None:
            rope_theta = 10000.0
        if isinstance(rope_scaling, dict):
            rope_scaling = dict(rope_scaling)
            rope_type = rope_scaling.pop("type", None) or rope_scaling.get("rope_type", "default")
            rope_scaling["rope_type"] = rope_type
            if rope_type == "default":
                rope_scaling = None
        elif rope_scaling is not None:
            raise ConfigError(f"{source}: field 'rope_scaling' must be an object or null, got {rope_scaling!r}")

        eos = raw.pop("eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if model_type == "qwen2":
            raw.pop("attention_bias", None)
            attention_bias = True
        else:
            attention_bias = take("attention_bias", bool, False)

        dtype = raw.pop("torch_dtype", None) or raw.pop("dtype", None) or "float32"
        raw.pop("dtype", None)
        config = cls(
            model_type=model_type,
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=take("intermediate_size", int),
            num_hidden_layers=take("num_hidden_layers", int),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=take("max_position_embeddings", int),
            rms_norm_eps=take("rms_norm_eps", float, 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            attention_bias=attention_bias,
            tie_word_embeddings=take("tie_word_embeddings", bool, False),
            bos_token_id=take("bos_token_id", int, None),
            eos_token_ids=eos_ids,
            pad_token_id=take("pad_token_id", int, None),
            mask_token_id=take("mask_token_id", int, store=tidar),
            block_size=take("block_size", int, store=tidar),
            torch_dtype=str(dtype),
            extra={**raw, **({"tidar": tidar} if tidar else {})},
        )
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "TiDARConfig":
        """Read `path` (a config.json, or a checkpoint folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no such file (a TiDAR checkpoint needs config.json)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(raw, source=str(path))

    def validate(self, source: str = "config.json") -> None:
        """Raise ConfigError naming the first field that is out of range or inconsistent."""
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                    "block_size")
        for name in positive:
            if getattr(self, name) <= 0:
                field_name = "tidar.block_size" if name == "block_size" else name
                raise ConfigError(f"{source}: field {field_name!r} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{source}: field 'num_key_value_heads' ({self.num_key_value_heads}) must divide "
                              f"'num_attention_heads' ({self.num_attention_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"{source}: field 'head_dim' must be even for RoPE, got {self.head_dim}")
        if not (0 <= self.mask_token_id < self.vocab_size):
            raise ConfigError(f"{source}: field 'tidar.mask_token_id' ({self.mask_token_id}) is outside the "
                              f"vocabulary [0, {self.vocab_size})")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not (0 <= value < self.vocab_size):
                raise ConfigError(f"{source}: field {name!r} ({value}) is outside the vocabulary [0, {self.vocab_size})")
        for value in self.eos_token_ids:
            if not isinstance(value, int) or isinstance(value, bool) or not (0 <= value < self.vocab_size):
                raise ConfigError(f"{source}: field 'eos_token_id' ({value!r}) is outside the vocabulary "
                                  f"[0, {self.vocab_size})")
        if self.mask_token_id in self.eos_token_ids:
            raise ConfigError(f"{source}: field 'tidar.mask_token_id' ({self.mask_token_id}) is also an eos id")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ConfigError(f"{source}: field 'rope_theta' must be positive and finite, got {self.rope_theta}")
        if not (math.isfinite(self.rms_norm_eps) and self.rms_norm_eps > 0):
            raise ConfigError(f"{source}: field 'rms_norm_eps' must be positive, got {self.rms_norm_eps}")
        if self.torch_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"{source}: field 'torch_dtype' is {self.torch_dtype!r}; "
                              "supported: float32, bfloat16, float16")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ConfigError(f"{source}: field 'rope_scaling.rope_type' is {rope_type!r}; "
                                  f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
            required = {"linear": ("factor",),
                        "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                   "original_max_position_embeddings")}[rope_type]
            for key in required:
                value = self.rope_scaling.get(key)
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                    raise ConfigError(f"{source}: field 'rope_scaling.{key}' must be a positive number, got {value!r}")

    # ----------------------------------------------------------------- writing
    def to_dict(self) -> dict[str, Any]:
        """The config.json contents (transformers 4.x spelling, which 5.x reads as well)."""
        data = {k: v for k, v in asdict(self).items() if k not in ("extra", "eos_token_ids", "mask_token_id",
                                                                    "block_size")}
        data.update(self.extra)
        eos = list(self.eos_token_ids)
        data["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
        data["architectures"] = [ARCHITECTURES[self.model_type]]
        tidar = dict(self.extra.get("tidar", {}))
        tidar.update(mask_token_id=self.mask_token_id, block_size=self.block_size)
        data["tidar"] = tidar
        if self.model_type == "qwen2":
            data.pop("attention_bias")
        return dict(sorted(data.items()))

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path
