"""Write a random-weight TiDAR checkpoint of a real model's shape, streamed, for export benchmarks.

Two layouts:

- `tidar` (default): Qwen2.5-1.5B's shape (hidden 1536, 28 layers, 12 query and 2 KV heads of
  128, intermediate 8960, vocabulary 151936, tied embeddings, q/k/v bias, RoPE theta 1e6) plus
  the `tidar` block TiDAR needs ([MASK] = id 2 of the tokenizer, block size 16); the tokenizer
  is the small byte-level BPE of `tidar init`.
- `released`: the layout of the TiDAR-LM models as downloaded, at Qwen3-1.7B (`--shape
  qwen3-1.7b`: hidden 2048, 28 layers, 16/8 heads of 128, intermediate 6144, tied embeddings) or
  Qwen3-8B (`--shape qwen3-8b`: hidden 4096, 36 layers, 32/8 heads of 128, intermediate 12288,
  untied) shape: Qwen3's config.json with `architectures` ["TiDARForCausalLM"] and no `tidar`
  block, vocabulary 151936; a tokenizer whose added tokens sit at Qwen's own ids (<|endoftext|>
  151643, <|im_start|> 151644, <|im_end|> 151645, ..., <|fim_pad|> 151662 not special: [MASK])
  after a byte-level BPE trained on the standard library and padded with unreachable filler
  entries to Qwen's 151643 base tokens; tokenizer_config.json with ChatML; Qwen3's
  generation_config.json (eos [151645, 151643], pad 151643, temperature 0.6, top_k 20, top_p 0.95).
  The same helper, at toy size, is tests/released_checkpoint.py.

Tensors are generated and written one at a time, in row chunks (`write_safetensors`), so memory
holds a few MB, not the checkpoint. Weights are N(0, 0.02); norm weights 1 + N(0, 0.1).

    python benchmarks/make_random_checkpoint.py OUT [--layout tidar|released] [--shape NAME]
                                                [--layers N] [--dtype bfloat16] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from tidar.export.safetensors_stream import TensorSpec, write_safetensors
from tidar.runtime.checkpoint import expected_shapes
from tidar.runtime.config import TiDARConfig
from tidar.runtime.model import TiDARModel
from tidar.train.checkpoint import EOS_TOKEN, MASK_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, save_tokenizer, \
    stdlib_files, train_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHUNK_ELEMENTS = 1 << 22  # rows generated at a time: about 4M values (16 MB in fp32)
TOKENIZER_VOCAB = 512


def qwen25_15b_shape(layers: int = 28, dtype: str = "bfloat16") -> TiDARConfig:
    """Qwen2.5-1.5B's config.json fields, with the TiDAR block."""
    config = TiDARConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
        num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
        mask_token_id=SPECIAL_TOKENS.index(MASK_TOKEN), block_size=16, tie_word_embeddings=True,
        eos_token_ids=(SPECIAL_TOKENS.index(EOS_TOKEN),), pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),
        torch_dtype=dtype)
    config.validate()
    return config


QWEN_BASE_TOKENS = 151643
"""Qwen's byte-level BPE vocabulary before its added tokens."""
QWEN_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>")
"""Qwen3's added tokens in id order from QWEN_BASE_TOKENS; the first three are special."""
QWEN_SPECIAL = 3
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
"""ChatML, as Qwen's templates render plain messages."""
QWEN3_SHAPES = {
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=False),
}
"""config.json fields of Qwen3-1.7B and Qwen3-8B that differ between them."""


def qwen3_config(shape: str, layers: int | None = None, dtype: str = "bfloat16") -> dict:
    """Qwen3's config.json at `shape`, as a released TiDAR-LM checkpoint carries it (no tidar block)."""
    fields = dict(QWEN3_SHAPES[shape])
    if layers is not None:
        fields["num_hidden_layers"] = layers
    return dict(architectures=["TiDARForCausalLM"], attention_bias=False, attention_dropout=0.0,
                bos_token_id=QWEN_BASE_TOKENS, eos_token_id=QWEN_BASE_TOKENS + 2, head_dim=128, hidden_act="silu",
                initializer_range=0.02, max_position_embeddings=40960, max_window_layers=fields["num_hidden_layers"],
                model_type="qwen3", rms_norm_eps=1e-6, rope_scaling=None, rope_theta=1000000.0, sliding_window=None,
                torch_dtype=dtype, transformers_version="4.51.0", use_cache=True, use_sliding_window=False,
                vocab_size=151936, **fields)


def qwen_like_tokenizer(folder: Path) -> dict[str, int]:
    """tokenizer.json and tokenizer_config.json with Qwen3's added tokens at Qwen's ids; returns
    {added token: id}."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train([str(f) for f in stdlib_files(40)], trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    data = json.loads(bpe.to_str())
    vocab = data["model"]["vocab"]
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), QWEN_BASE_TOKENS)})  # never produced by a merge
    tokenizer = Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                                             for m in data["model"]["merges"]]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_ADDED_TOKENS[:QWEN_SPECIAL]])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED_TOKENS[QWEN_SPECIAL:]])
    tokenizer.save(str(folder / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in QWEN_ADDED_TOKENS}
    wrong = {t: i for n, (t, i) in enumerate(ids.items()) if i != QWEN_BASE_TOKENS + n}
    if wrong:
        raise RuntimeError(f"added tokens not at Qwen's ids: {wrong}")
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": n < QWEN_SPECIAL} for n, (t, i) in enumerate(ids.items())}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": list(QWEN_ADDED_TOKENS[1:QWEN_SPECIAL]), "bos_token": None,
        "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
        "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}, indent=2) + "\n")
    return ids


def write_released_checkpoint(folder: Path, shape: str, layers: int | None = None, dtype: str = "bfloat16",
                              seed: int = 0) -> Path:
    """The released TiDAR-LM layout at `shape` (module docstring), random weights streamed."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = qwen_like_tokenizer(folder)
    config = qwen3_config(shape, layers, dtype)
    model_config = TiDARConfig.from_dict({**config, "tidar": {"mask_token_id": ids["<|fim_pad|>"], "block_size": 16}})
    write_weights(folder, model_config, seed)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|endoftext|>"], "do_sample": True, "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"], "temperature": 0.6, "top_k": 20, "top_p": 0.95,
        "transformers_version": "4.51.0"}, indent=2) + "\n")
    return folder


def random_chunks(spec: TensorSpec, generator: torch.Generator):
    """The tensor of `spec` as row chunks of random values (norm weights around 1)."""
    rows = spec.shape[0]
    step = max(1, CHUNK_ELEMENTS // math.prod(spec.shape[1:]))
    is_norm = spec.name.endswith("norm.weight")
    for start in range(0, rows, step):
        shape = (min(step, rows - start), *spec.shape[1:])
        noise = torch.randn(shape, generator=generator)
        yield (1.0 + 0.1 * noise if is_norm else 0.02 * noise).to(spec.dtype)


def write_checkpoint(folder: Path, config: TiDARConfig, seed: int = 0) -> Path:
    """config.json, tokenizer files and model.safetensors of random weights in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(stdlib_files(40), TOKENIZER_VOCAB)
    save_tokenizer(tokenizer, folder, config.max_position_embeddings)
    write_weights(folder, config, seed)
    config.save(folder)
    return folder


def write_weights(folder: Path, config: TiDARConfig, seed: int = 0) -> None:
    """model.safetensors of random weights of `config`'s model, streamed in row chunks."""
    with torch.device("meta"):
        shapes = expected_shapes(TiDARModel(config))
    specs = [TensorSpec(name, DTYPES[config.torch_dtype], shape) for name, shape in shapes.items()]
    generator = torch.Generator().manual_seed(seed)
    write_safetensors(folder / "model.safetensors", specs, lambda spec: random_chunks(spec, generator),
                      metadata={"format": "pt"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the checkpoint into")
    parser.add_argument("--layout", choices=("tidar", "released"), default="tidar",
                        help="tidar: Qwen2.5-1.5B shape with a tidar block; released: the TiDAR-LM layout")
    parser.add_argument("--shape", choices=tuple(QWEN3_SHAPES), default="qwen3-1.7b",
                        help="Qwen3 shape of the released layout (default qwen3-1.7b)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    if args.layout == "released":
        folder = write_released_checkpoint(args.out, args.shape, args.layers, args.dtype, args.seed)
    else:
        folder = write_checkpoint(args.out, qwen25_15b_shape(args.layers or 28, args.dtype), args.seed)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    print(f"wrote {folder}: {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
