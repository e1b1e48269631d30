"""Hugging Face TiDAR checkpoint -> TensorRT-LLM checkpoint (legacy engine flow, TRT-LLM 1.2.x).

`convert` writes `config.json` plus `rank{r}.safetensors` for each tensor-parallel rank, the
input of `trtllm-build`; `reassemble` is its exact inverse (HF names, unpadded, de-duplicated)
and is what tests and `tidar-export verify` compare against the source checkpoint.

Naming and sharding follow TRT-LLM's LLaMA/Qwen `convert.py` (linear weights are (out, in)):

  HF                                   TRT-LLM (per rank r of tp)            sharding
  model.embed_tokens.weight            transformer.vocab_embedding.weight    full on every rank
  model.norm.weight                    transformer.ln_f.weight               full
  lm_head.weight (tied: the embedding) lm_head.weight                        rows, vocab zero-padded to a multiple of tp
  layers.{i}.input_layernorm           transformer.layers.{i}.input_layernorm.weight   full
  layers.{i}.post_attention_layernorm  transformer.layers.{i}.post_layernorm.weight    full
  self_attn.{q,k,v}_proj.{weight,bias} attention.qkv.{weight,bias} = cat(Q_r, K_r, V_r) on dim 0
  self_attn.o_proj.weight              attention.dense.weight                columns (its input dim)
  self_attn.{q,k}_norm.weight (Qwen3)  attention.{q,k}_layernorm.weight      full
  mlp.gate_proj.weight                 mlp.fc.weight                         rows   (the gotcha: fc = gate_proj,
  mlp.up_proj.weight                   mlp.gate.weight                       rows    gate = up_proj)
  mlp.down_proj.weight                 mlp.proj.weight                       columns

Q_r is rank r's query heads. K_r and V_r are its KV heads: with num_key_value_heads >= tp they are
split like the query heads; with fewer KV heads than ranks each is duplicated and rank r holds
KV head r * num_key_value_heads // tp (TRT-LLM's `dup_kv_weight` followed by a split).

Every sharding is one rule: a tensor's dim is `groups` groups of `group_size` rows (heads of
head_dim rows, or single rows); rank r takes max(groups // tp, 1) groups starting at group
r * groups // tp; groups past the tensor's end (vocab padding) are zeros.

config.json: `vocab_size` is the *unpadded* vocabulary, as TRT-LLM's model classes expect (they
pad the LM head themselves with `pad_vocab_size(vocab_size, tp_size)`, and the embedding is
stored unpadded); `vocab_size_padded` records the LM head's padded row count. The `tidar`
section carries `mask_token_id`, `block_size` and `hf_config` (the source config.json), so the
checkpoint is self-describing and `reassemble` can rebuild the exact HF config.

Conversion streams: per rank it reads only the rows that rank needs (`export.source`) and writes
each TRT-LLM tensor as soon as it is made (`export.safetensors_stream`), so memory holds one
tensor, not a rank file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from tidar.runtime.checkpoint import CheckpointError
from tidar.runtime.config import ConfigError, TiDARConfig

from .safetensors_stream import TensorSpec, write_safetensors
from .source import EMBEDDING, CheckpointSource, head_weight_source, model_shapes

SUPPORTED_TP_SIZES = (1, 2, 4, 8)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ARCHITECTURE = "TiDARForCausalLM"


class ConversionError(ValueError):
    """A model/TP/dtype combination TRT-LLM cannot shard, or a malformed TRT-LLM checkpoint;
    the message names the field, file or tensor."""


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """TRT-LLM's `pad_vocab_size`: the next multiple of tp_size."""
    return -(-vocab_size // tp_size) * tp_size


def trtllm_config(config: TiDARConfig, tp_size: int, dtype: str, draft_len: int | None = None,
                  draft_blocks: int | None = None) -> dict:
    """TRT-LLM checkpoint config.json for `config` split `tp_size` ways in `dtype`. `draft_len` b
    and `draft_blocks` k (None: k = b), when given, are the decode step the engine is sized for
    (tidar.draft_len / tidar.draft_blocks: trtllm_model.builder_ranges reads them, so a
    `trtllm-build` of this folder gets the profile of `engine_shapes.dimension_ranges`)."""
    check_sharding(config, tp_size)
    if dtype not in DTYPES:
        raise ConversionError(f"field 'dtype' is {dtype!r}; supported: {', '.join(DTYPES)}")
    return {
        "architecture": ARCHITECTURE,
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": config.vocab_size,
        "vocab_size_padded": padded_vocab_size(config.vocab_size, tp_size),
        "max_position_embeddings": config.max_position_embeddings,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_size": config.head_dim,
        "hidden_act": "silu",
        "intermediate_size": config.intermediate_size,
        "norm_epsilon": config.rms_norm_eps,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": config.rope_theta,
        "rotary_scaling": config.rope_scaling,
        "qkv_bias": config.has_qkv_bias,
        "qk_layernorm": config.qk_norm,
        "tie_word_embeddings": config.tie_word_embeddings,
        "mapping": {"world_size": tp_size, "tp_size": tp_size, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
        "tidar": {"mask_token_id": config.mask_token_id, "block_size": config.block_size,
                  "hf_config": config.to_dict(),
                  **({"draft_len": draft_len, "draft_blocks": draft_blocks} if draft_len is not None else {})},
    }


def check_sharding(config: TiDARConfig, tp_size: int) -> None:
    """Raise ConversionError naming the field that cannot be split `tp_size` ways."""
    if isinstance(tp_size, bool) or tp_size not in SUPPORTED_TP_SIZES:
        raise ConversionError(f"field 'tp_size' is {tp_size!r}; supported: "
                              f"{', '.join(map(str, SUPPORTED_TP_SIZES))}")
    for name in ("num_attention_heads", "intermediate_size"):
        if getattr(config, name) % tp_size:
            raise ConversionError(f"field {name!r} ({getattr(config, name)}) is not divisible by "
                                  f"tp_size {tp_size}")
    kv = config.num_key_value_heads
    if kv % tp_size and tp_size % kv:
        raise ConversionError(f"field 'num_key_value_heads' ({kv}) must be divisible by tp_size {tp_size} "
                              "or divide it (then KV heads are duplicated across ranks)")


# ------------------------------------------------------------------ the sharding table
@dataclass(frozen=True)
class Piece:
    """One HF tensor's contribution to a TRT-LLM tensor. `dim` None: the whole tensor on every
    rank; otherwise `groups` groups of `group_size` along `dim`, assigned to ranks as in the
    module docstring (groups beyond the tensor's extent are zero padding)."""

    hf_name: str
    dim: int | None = None
    groups: int = 1
    group_size: int = 1

    def rank_range(self, rank: int, tp_size: int) -> tuple[int, int]:
        """[start, stop) along `dim` of rank `rank`'s part (possibly past the tensor's end)."""
        per_rank = max(self.groups // tp_size, 1)
        first = rank * self.groups // tp_size
        return first * self.group_size, (first + per_rank) * self.group_size


@dataclass(frozen=True)
class Target:
    """A TRT-LLM tensor: its pieces concatenated along dim 0 (several only for fused qkv)."""

    name: str
    pieces: tuple[Piece, ...]


def layout(config: TiDARConfig, tp_size: int) -> list[Target]:
    """Every TRT-LLM tensor of the checkpoint and where its rows come from."""
    c = config
    heads = dict(dim=0, groups=c.num_attention_heads, group_size=c.head_dim)
    kv_heads = dict(dim=0, groups=c.num_key_value_heads, group_size=c.head_dim)
    head_columns = dict(dim=1, groups=c.num_attention_heads, group_size=c.head_dim)
    lm_head_source = head_weight_source(c)
    targets = [
        Target("transformer.vocab_embedding.weight", (Piece(EMBEDDING),)),
        Target("transformer.ln_f.weight", (Piece("model.norm.weight"),)),
        Target("lm_head.weight", (Piece(lm_head_source, dim=0,
                                        groups=padded_vocab_size(c.vocab_size, tp_size)),)),
    ]
    for i in range(c.num_hidden_layers):
        hf, trt = f"model.layers.{i}.", f"transformer.layers.{i}."
        attn = hf + "self_attn."
        suffixes = ("weight", "bias") if c.has_qkv_bias else ("weight",)
        for suffix in suffixes:
            targets.append(Target(trt + f"attention.qkv.{suffix}", (
                Piece(attn + f"q_proj.{suffix}", **heads),
                Piece(attn + f"k_proj.{suffix}", **kv_heads),
                Piece(attn + f"v_proj.{suffix}", **kv_heads))))
        targets += [
            Target(trt + "input_layernorm.weight", (Piece(hf + "input_layernorm.weight"),)),
            Target(trt + "post_layernorm.weight", (Piece(hf + "post_attention_layernorm.weight"),)),
            Target(trt + "attention.dense.weight", (Piece(attn + "o_proj.weight", **head_columns),)),
            Target(trt + "mlp.fc.weight", (Piece(hf + "mlp.gate_proj.weight", dim=0, groups=c.intermediate_size),)),
            Target(trt + "mlp.gate.weight", (Piece(hf + "mlp.up_proj.weight", dim=0, groups=c.intermediate_size),)),
            Target(trt + "mlp.proj.weight", (Piece(hf + "mlp.down_proj.weight", dim=1, groups=c.intermediate_size),)),
        ]
        if c.qk_norm:
            targets += [Target(trt + "attention.q_layernorm.weight", (Piece(attn + "q_norm.weight"),)),
                        Target(trt + "attention.k_layernorm.weight", (Piece(attn + "k_norm.weight"),))]
    return targets


def _index(dim: int, start: int, stop: int) -> tuple[slice, ...]:
    return (slice(None),) * dim + (slice(start, stop),)


# ------------------------------------------------------------------ HF -> TRT-LLM
def read_piece(source: CheckpointSource, piece: Piece, rank: int, tp_size: int) -> torch.Tensor:
    """Rank `rank`'s part of `piece`, zero-padded past the tensor's end, checked finite. Row
    ranges are read alone; a column range (dim 1) is cut from the whole tensor."""
    name = piece.hf_name
    if piece.dim is None:
        tensor = source.read(name)
    else:
        start, stop = piece.rank_range(rank, tp_size)
        extent = source.shapes[name][piece.dim]
        first, last = min(start, extent), min(stop, extent)
        if piece.dim == 0:
            tensor = source.read(name, (first, last))
        else:
            tensor = source.read(name)[_index(piece.dim, first, last)].contiguous()
        if stop > extent:
            pad = list(tensor.shape)
            pad[piece.dim] = stop - max(start, extent)
            tensor = torch.cat((tensor, tensor.new_zeros(pad)), dim=piece.dim)
    source.check_finite(name, tensor)
    return tensor


def target_shape(target: Target, shapes: dict[str, tuple[int, ...]], tp_size: int) -> tuple[int, ...]:
    """Shape of one rank's `target` tensor (the same on every rank): its pieces stacked on dim 0."""
    parts = [_rank_shape(piece, shapes[piece.hf_name], 0, tp_size) for piece in target.pieces]
    return (sum(part[0] for part in parts), *parts[0][1:])


def convert(checkpoint_dir: str | Path, out_dir: str | Path, tp_size: int = 1, dtype: str | None = None,
            progress: Callable[[str], None] | None = None, source: CheckpointSource | None = None,
            draft_len: int | None = None, draft_blocks: int | None = None) -> Path:
    """Write the TRT-LLM checkpoint of the HF TiDAR checkpoint `checkpoint_dir` into `out_dir`:
    rank{r}.safetensors for each rank, then config.json last (a folder without it is incomplete).
    `dtype` defaults to the checkpoint's; `progress` receives one line per file written;
    `source` is the already opened `CheckpointSource` of `checkpoint_dir`, if the caller has one;
    `draft_len` / `draft_blocks` the decode step an engine of it is sized for (`trtllm_config`).
    Each rank file is streamed: one TRT-LLM tensor at a time is in memory."""
    folder, out = Path(checkpoint_dir), Path(out_dir)
    try:
        config = source.config if source is not None else TiDARConfig.from_file(folder)  # its resolved fields
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    dtype = dtype or config.torch_dtype
    trt_config = trtllm_config(config, tp_size, dtype, draft_len, draft_blocks)
    source = source or CheckpointSource(folder, config)
    targets = {target.name: target for target in layout(config, tp_size)}
    specs = [TensorSpec(name, DTYPES[dtype], target_shape(target, source.shapes, tp_size))
             for name, target in targets.items()]
    out.mkdir(parents=True, exist_ok=True)
    for rank in range(tp_size):
        def produce(spec: TensorSpec) -> torch.Tensor:
            parts = [read_piece(source, piece, rank, tp_size).to(spec.dtype) for piece in targets[spec.name].pieces]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

        path = write_safetensors(out / f"rank{rank}.safetensors", specs, produce, metadata={"format": "pt"})
        if progress:
            progress(f"wrote {path} ({rank + 1}/{tp_size})")
    (out / "config.json").write_text(json.dumps(trt_config, indent=2) + "\n")
    if progress:
        progress(f"wrote {out / 'config.json'}")
    return out


# ------------------------------------------------------------------ TRT-LLM -> HF
def reassemble(trtllm_dir: str | Path) -> tuple[TiDARConfig, dict[str, torch.Tensor]]:
    """The HF config and state dict (HF names, as a HF checkpoint stores them: no lm_head.weight
    when tied) that `convert` was given, rebuilt from `trtllm_dir`. Checks on the way that
    config.json is exactly what `trtllm_config` writes, every rank holds every tensor with the
    right shape, replicated and duplicated parts agree across ranks, and padding is zero."""
    folder = Path(trtllm_dir)
    try:
        raw = json.loads((folder / "config.json").read_text())
        config = TiDARConfig.from_dict(raw["tidar"]["hf_config"], source=f"{folder / 'config.json'}:tidar.hf_config")
        tp_size, dtype = raw["mapping"]["tp_size"], raw["dtype"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ConfigError) as exc:
        raise ConversionError(f"{folder / 'config.json'}: not a TiDAR TRT-LLM checkpoint config ({exc})") from None
    draft = raw.get("tidar", {})
    if raw != trtllm_config(config, tp_size, dtype, draft.get("draft_len"), draft.get("draft_blocks")):
        raise ConversionError(f"{folder / 'config.json'}: fields disagree with its own tidar.hf_config")
    shapes = model_shapes(config)
    ranks = []
    for rank in range(tp_size):
        path = folder / f"rank{rank}.safetensors"
        try:
            with safe_open(path, framework="pt") as handle:
                ranks.append({name: handle.get_tensor(name) for name in handle.keys()})
        except (SafetensorError, OSError) as exc:
            raise ConversionError(f"{path}: not a readable safetensors file ({exc})") from None
    targets = layout(config, tp_size)
    for rank, tensors in enumerate(ranks):
        extra = set(tensors) - {t.name for t in targets}
        if extra:
            raise ConversionError(f"rank{rank}.safetensors: unexpected tensor {sorted(extra)[0]!r}")
        wrong = sorted(name for name, tensor in tensors.items() if tensor.dtype != DTYPES[dtype])
        if wrong:
            raise ConversionError(f"rank{rank}.safetensors: tensor {wrong[0]!r} is "
                                  f"{tensors[wrong[0]].dtype}, config.json says {dtype}")
    state: dict[str, torch.Tensor] = {}
    for target in targets:
        for piece, full in zip(target.pieces, _unshard(target, ranks, shapes, tp_size)):
            name = piece.hf_name
            if name in state and not torch.equal(state[name], full):  # tied head vs. embedding
                raise ConversionError(f"{target.name}: does not equal {name!r} although embeddings are tied")
            state[name] = full
    return config, state


def _unshard(target: Target, ranks: list[dict[str, torch.Tensor]], shapes: dict, tp_size: int) -> list[torch.Tensor]:
    """The full HF tensors of `target`'s pieces, from every rank's copy of it."""
    shards = []
    for rank, tensors in enumerate(ranks):
        if target.name not in tensors:
            raise ConversionError(f"rank{rank}.safetensors: missing tensor {target.name!r}")
        shards.append(tensors[target.name])
    lengths = [_rank_shape(p, shapes[p.hf_name], rank=0, tp_size=tp_size)[0] for p in target.pieces]
    fulls = []
    for index, piece in enumerate(target.pieces):
        shape = shapes[piece.hf_name]
        padded = list(shape)
        if piece.dim is not None:
            padded[piece.dim] = piece.groups * piece.group_size
        full = shards[0].new_zeros(padded)
        filled: set[tuple[int, int]] = set()
        for rank, shard in enumerate(shards):
            where = f"rank{rank}.safetensors: tensor {target.name!r}"
            expected = [sum(lengths)] + list(_rank_shape(piece, shape, 0, tp_size)[1:])
            if list(shard.shape) != expected or shard.dtype != full.dtype:
                raise ConversionError(f"{where} is {shard.dtype} {tuple(shard.shape)}, "
                                      f"expected {full.dtype} {tuple(expected)}")
            part = shard.narrow(0, sum(lengths[:index]), lengths[index])
            if piece.dim is None:
                if rank and not torch.equal(part, full):
                    raise ConversionError(f"{where} differs from rank 0's copy")
                full = part
                continue
            start, stop = piece.rank_range(rank, tp_size)
            region = full[_index(piece.dim, start, stop)]
            if (start, stop) in filled:  # a duplicated KV head
                if not torch.equal(region, part):
                    raise ConversionError(f"{where}: duplicated KV head differs between ranks")
            region.copy_(part)
            filled.add((start, stop))
        if piece.dim is not None:
            extent = shape[piece.dim]
            padding = full.narrow(piece.dim, extent, full.shape[piece.dim] - extent)
            if padding.numel() and bool(padding.any()):
                raise ConversionError(f"{target.name}: vocabulary padding rows are not zero")
            full = full.narrow(piece.dim, 0, extent).clone()
        fulls.append(full)
    return fulls


def _rank_shape(piece: Piece, shape: tuple[int, ...], rank: int, tp_size: int) -> tuple[int, ...]:
    """Shape of one rank's part of `piece` (the same on every rank)."""
    if piece.dim is None:
        return tuple(shape)
    start, stop = piece.rank_range(rank, tp_size)
    out = list(shape)
    out[piece.dim] = stop - start
    return tuple(out)
