"""Typed TiDAR model configuration, read from and written to a Hugging Face `config.json`.

A TiDAR checkpoint is an ordinary Hugging Face checkpoint of a Qwen2, Qwen3 or Llama
backbone plus a `tidar` block (`mask_token_id`, `block_size`, optionally
`trained_block_sizes`). This module reads both the transformers 4.x spelling of RoPE settings
(`rope_theta` + `rope_scaling`) and the 5.x one (`rope_parameters`), validates every field with
an error that names it, and writes the 4.x spelling back (both transformers generations read it).

The TiDAR fields are resolved (docs/design.md §1.1):

- from the `tidar` block when there is one ("config");
- for the released TiDAR-LM layout (`architectures` TiDARForCausalLM or TiDARSmallForCausalLM and
  no `tidar` block): [MASK] is the tokenizer's `<|fim_pad|>` ("inferred from <|fim_pad|>"; refused
  by name when the tokenizer lacks it) and the block size 16 ("default of the released layout");
- `mask_token_id=` / `block_size=` (the `--mask-token-id` / `--block-size` flags) supply or
  override either for any checkpoint ("command line").

A checkpoint with neither a `tidar` block, a released architecture nor both overrides is a plain
AR checkpoint and is refused, naming the flags. Where each field came from is kept
(`field_sources`) and written into the `tidar` block (`sources`) when one was not the config's,
so every artifact built from the checkpoint reads the fields with no flag.
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
RELEASED_ARCHITECTURES = ("TiDARForCausalLM", "TiDARSmallForCausalLM")
"""`architectures` of the released TiDAR-LM checkpoints (Qwen3- and Qwen2-based), which carry no `tidar` block."""
RELEASED_MASK_TOKEN = "<|fim_pad|>"
"""[MASK] of the released checkpoints (Qwen's id 151662; the authors' server hard-codes it)."""
RELEASED_BLOCK_SIZE = 16
"""Block size of the released checkpoints (the authors' server default `speculative_tidar_b`)."""
FROM_CONFIG = "config"
FROM_COMMAND_LINE = "command line"
FROM_FIM_PAD = f"inferred from {RELEASED_MASK_TOKEN}"
FROM_RELEASED_DEFAULT = "default of the released layout"
OVERRIDE_FLAGS = "--mask-token-id and --block-size (mask_token_id= and block_size= in Python)"


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
    trained_block_sizes: tuple[int, ...] = ()
    """The block sizes (masks per block) the model was trained on (`tidar.trained_block_sizes`,
    each in 1..block_size; default: (block_size,), what a released b = 16 model saw)."""
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
    field_sources: dict = field(default_factory=dict, compare=False, repr=False)
    """Where `mask_token_id` and `block_size` came from when not from the `tidar` block
    (FROM_COMMAND_LINE, FROM_FIM_PAD, FROM_RELEASED_DEFAULT); a field not named is FROM_CONFIG."""

    def __post_init__(self) -> None:
        if not self.trained_block_sizes:
            object.__setattr__(self, "trained_block_sizes", (self.block_size,))
        else:
            object.__setattr__(self, "trained_block_sizes", tuple(self.trained_block_sizes))

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
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json", mask_token_id: int | None = None,
                  block_size: int | None = None, tokenizer_folder: str | Path | None = None) -> "TiDARConfig":
        """Validate a parsed config.json; `source` names the file in error messages.
        `mask_token_id` / `block_size` override (or supply) the `tidar` block's fields;
        `tokenizer_folder` holds the tokenizer.json in which a released-layout checkpoint's mask
        token is looked up (see the module docstring)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        raw = dict(raw)
        model_type = raw.pop("model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: field 'model_type' is {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        overrides = {"mask_token_id": mask_token_id, "block_size": block_size}
        for name, value in overrides.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{source}: the {name} given on the command line must be an integer, got {value!r}")
        tidar = raw.pop("tidar", None)
        sources = {name: FROM_COMMAND_LINE for name, value in overrides.items() if value is not None}
        if tidar is None:
            tidar, inferred = released_layout_fields(raw, source, overrides, tokenizer_folder)
            sources.update(inferred)
        if not isinstance(tidar, dict):
            raise ConfigError(f"{source}: field 'tidar' must be an object (with 'mask_token_id' and "
                              f"'block_size'), got {tidar!r}")
        tidar = dict(tidar)  # fields are popped from it below; leave the caller's dict alone
        for name, value in overrides.items():
            if value is not None:
                tidar[name] = value

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
            trained_block_sizes=parse_trained_block_sizes(tidar.pop("trained_block_sizes", None), source),
            torch_dtype=str(dtype),
            extra={**raw, **({"tidar": tidar} if tidar else {})},
            field_sources=sources,
        )
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path, mask_token_id: int | None = None,
                  block_size: int | None = None) -> "TiDARConfig":
        """Read `path` (a config.json, or a checkpoint folder holding one); `mask_token_id` /
        `block_size` override or supply the TiDAR fields (the module docstring has the rule; a
        released-layout checkpoint's mask token is looked up in the tokenizer.json beside it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no such file (a TiDAR checkpoint needs config.json)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(raw, source=str(path), mask_token_id=mask_token_id, block_size=block_size,
                             tokenizer_folder=path.parent)

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
        trained = self.trained_block_sizes
        if not trained or any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= self.block_size
                              for b in trained) or len(set(trained)) != len(trained):
            raise ConfigError(f"{source}: field 'tidar.trained_block_sizes' must list distinct block sizes in "
                              f"[1, tidar.block_size = {self.block_size}], got {list(trained)}")
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
                                                                    "block_size", "trained_block_sizes",
                                                                    "field_sources")}
        data.update(self.extra)
        eos = list(self.eos_token_ids)
        data["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
        data["architectures"] = [ARCHITECTURES[self.model_type]]
        data["tidar"] = self.tidar_block()
        if self.model_type == "qwen2":
            data.pop("attention_bias")
        return dict(sorted(data.items()))

    def tidar_block(self) -> dict[str, Any]:
        """The `tidar` block of config.json: the resolved fields, the block's other keys, and
        `sources` ({field: where it came from}) when a field did not come from the config.
        `trained_block_sizes` is written when it is not the default (block_size,) or the block
        has `sources` (so an export of a released checkpoint states it, and keeps stating it
        through round trips); a config without it reads the default, so round trips of
        existing checkpoints stay identical."""
        tidar = dict(self.extra.get("tidar", {}))
        tidar.update(mask_token_id=self.mask_token_id, block_size=self.block_size)
        if any(source != FROM_CONFIG for source in self.field_sources.values()):
            tidar["sources"] = self.resolved_sources()
        if "sources" in tidar or self.trained_block_sizes != (self.block_size,):
            tidar["trained_block_sizes"] = list(self.trained_block_sizes)
        return tidar

    def resolved_sources(self) -> dict[str, str]:
        """{field: where its value came from} of the two TiDAR fields."""
        return {name: self.field_sources.get(name, FROM_CONFIG) for name in ("mask_token_id", "block_size")}

    def resolved_fields(self) -> dict[str, Any]:
        """The TiDAR fields with their sources, as the export manifest records them."""
        return {"mask_token_id": self.mask_token_id, "block_size": self.block_size,
                "trained_block_sizes": list(self.trained_block_sizes), "sources": self.resolved_sources()}

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def released_layout_fields(raw: dict, source: str, overrides: dict[str, int | None],
                           tokenizer_folder: str | Path | None) -> tuple[dict, dict[str, str]]:
    """(the `tidar` block, {field: source}) of a config.json without one: a released TiDAR-LM
    architecture gets [MASK] = the tokenizer's <|fim_pad|> and block size 16 where `overrides`
    leave them unset; anything else needs both overrides, or is refused as a plain AR checkpoint."""
    architectures = raw.get("architectures") or []
    released = isinstance(architectures, list) and any(a in RELEASED_ARCHITECTURES for a in architectures)
    if not released:
        missing = [name for name, value in overrides.items() if value is None]
        if missing:
            raise ConfigError(
                f"{source}: no 'tidar' block (with 'mask_token_id' and 'block_size'); this is a plain AR "
                f"checkpoint (architectures {architectures!r}), not a TiDAR one. If it is a TiDAR model, give "
                f"its fields with {OVERRIDE_FLAGS}; missing: {', '.join(missing)}")
        return {}, {}
    inferred = {}
    tidar: dict[str, int] = {}
    if overrides["mask_token_id"] is None:
        tidar["mask_token_id"] = released_mask_id(source, tokenizer_folder)
        inferred["mask_token_id"] = FROM_FIM_PAD
    if overrides["block_size"] is None:
        tidar["block_size"] = RELEASED_BLOCK_SIZE
        inferred["block_size"] = FROM_RELEASED_DEFAULT
    return tidar, inferred


def released_mask_id(source: str, tokenizer_folder: str | Path | None) -> int:
    """The id of <|fim_pad|> in the tokenizer of a released-layout checkpoint."""
    from .tokenizer import Tokenizer, TokenizerError

    layout = f"{source}: architectures {'/'.join(RELEASED_ARCHITECTURES)} without a 'tidar' block (the released " \
             f"TiDAR-LM layout) take [MASK] = the tokenizer's {RELEASED_MASK_TOKEN}"
    if tokenizer_folder is None:
        raise ConfigError(f"{layout}, and no tokenizer was given to look it up in; give it with --mask-token-id "
                          "(mask_token_id= in Python)")
    try:
        mask_id = Tokenizer(tokenizer_folder).token_to_id(RELEASED_MASK_TOKEN)
    except TokenizerError as exc:
        raise ConfigError(f"{layout}, looked up in the tokenizer: {exc}") from None
    if mask_id is None:
        raise ConfigError(f"{layout}, but {Path(tokenizer_folder) / 'tokenizer.json'} has no {RELEASED_MASK_TOKEN} "
                          "token; give the mask id with --mask-token-id (mask_token_id= in Python)")
    return mask_id


def parse_trained_block_sizes(value: Any, source: str) -> tuple[int, ...]:
    """`tidar.trained_block_sizes` as a tuple (empty when absent: the block size alone)."""
    if value is None:
        return ()
    if not isinstance(value, list) or not value or any(isinstance(b, bool) or not isinstance(b, int) for b in value):
        raise ConfigError(f"{source}: field 'tidar.trained_block_sizes' must be a non-empty list of integers, "
                          f"got {value!r}")
    return tuple(value)


def non_negative_int(text: str) -> int:
    """An argparse type: a command-line integer >= 0, refused by argparse with the value otherwise."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def add_layout_options(parser) -> None:
    """The command-line options that supply or override a checkpoint's TiDAR layout (`tidar
    generate`, `tidar-export build`): --mask-token-id and --block-size, read by
    `released_layout_fields` as `mask_token_id` / `block_size` overrides (docs/design.md §1.1)."""
    parser.add_argument("--mask-token-id", type=non_negative_int, default=None,
                        help="token id of [MASK]: supplies or overrides config.json's tidar.mask_token_id "
                             "(default: the config's; for a released TiDAR-LM checkpoint, the tokenizer's "
                             "<|fim_pad|>)")
    parser.add_argument("--block-size", type=non_negative_int, default=None,
                        help="block size b the model was trained with: supplies or overrides tidar.block_size "
                             "(default: the config's; 16 for a released TiDAR-LM checkpoint)")
