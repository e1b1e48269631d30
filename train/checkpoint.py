"""Write TiDAR checkpoints in Hugging Face format: tokenizer, config.json, safetensors.

Used by the trainer to save its results and by `tidar init` to make a random-weight tiny
checkpoint with a real tokenizer, so every command can be tried before a trained model
exists. The tokenizer is a byte-level BPE trained with `tokenizers` on Python's standard
library source, which every machine has.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tidar.runtime.config import TiDARConfig
from tidar.runtime.model import TiDARModel

EOS_TOKEN, PAD_TOKEN, MASK_TOKEN = "<|endoftext|>", "<|pad|>", "[MASK]"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, MASK_TOKEN]  # ids 0, 1, 2


def stdlib_files(limit: int | None = None) -> list[Path]:
    """The standard library's own .py files (not site-packages or tests), sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts)
    return files[:limit] if limit else files


def train_tokenizer(files: list[Path], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with the special tokens first: <|endoftext|> = 0, <|pad|> = 1, [MASK] = 2."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(f) for f in files], trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, folder: Path, model_max_length: int, base_config: dict | None = None) -> None:
    """tokenizer.json plus the tokenizer_config.json that transformers' AutoTokenizer reads
    (`base_config`, e.g. a converted checkpoint's own, is kept and only gains the mask token)."""
    tokenizer.save(str(folder / "tokenizer.json"))
    if base_config is not None:
        config = {**base_config, "mask_token": base_config.get("mask_token") or MASK_TOKEN}
    else:
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN,
                  "mask_token": MASK_TOKEN, "bos_token": None, "add_bos_token": False,
                  "model_max_length": model_max_length, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def tiny_config(family: str, vocab_size: int, block_size: int = 16, **overrides) -> TiDARConfig:
    """A small config of each family that still exercises what distinguishes it: Qwen2 q/k/v
    bias and tied embeddings, Qwen3 q/k norm and a head_dim unlike hidden/heads, Llama-3 RoPE
    scaling; GQA everywhere but Llama (plain multi-head). Random weights are trained on no block
    size, so the config allows every one (`trained_block_sizes` 1..block_size): tests decode them
    at every shape."""
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-6,
                  mask_token_id=SPECIAL_TOKENS.index(MASK_TOKEN), block_size=block_size,
                  trained_block_sizes=tuple(range(1, block_size + 1)),
                  eos_token_ids=(SPECIAL_TOKENS.index(EOS_TOKEN),), pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN))
    family_specific = {
        "qwen2": dict(num_key_value_heads=2, head_dim=16, rope_theta=1000000.0, tie_word_embeddings=True),
        "qwen3": dict(num_key_value_heads=1, head_dim=32, rope_theta=1000000.0),
        "llama": dict(num_key_value_heads=4, head_dim=16, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 256}),
    }
    if family not in family_specific:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(family_specific)}")
    config = TiDARConfig(model_type=family, **{**common, **family_specific[family], **overrides})
    config.validate()
    return config


def init_random_weights(model: TiDARModel, seed: int, std: float = 0.1) -> None:
    """Random weights with logits spread enough that greedy ties are vanishingly rare; norms and
    biases are randomized too, so parity tests see every parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(std * noise)


def save_checkpoint(model: TiDARModel, folder: str | Path, shard_bytes: int | None = None) -> Path:
    """config.json plus model.safetensors (or shards and their index when `shard_bytes` is set)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.config.save(folder)
    if shard_bytes is None:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def write_random_checkpoint(folder: str | Path, family: str = "qwen2", block_size: int = 16, seed: int = 0,
                            vocab_size: int = 512, tokenizer_files: int = 40, shard_bytes: int | None = None,
                            **config_overrides) -> Path:
    """A random-weight tiny TiDAR checkpoint with a BPE tokenizer trained on stdlib source."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(stdlib_files(tokenizer_files), vocab_size)
    config = tiny_config(family, tokenizer.get_vocab_size(), block_size, **config_overrides)
    save_tokenizer(tokenizer, folder, config.max_position_embeddings)
    model = TiDARModel(config)
    init_random_weights(model, seed)
    return save_checkpoint(model, folder, shard_bytes)
