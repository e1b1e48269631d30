"""Write a random-weight TiDAR checkpoint of a real model's shape, streamed, for export benchmarks.

The default shape is Qwen2.5-1.5B's (hidden 1536, 28 layers, 12 query and 2 KV heads of 128,
intermediate 8960, vocabulary 151936, tied embeddings, q/k/v bias, RoPE theta 1e6) in bfloat16,
plus the `tidar` block TiDAR needs ([MASK] = id 2 of the tokenizer, block size 16). The
tokenizer is the small byte-level BPE of `tidar init` (trained on the standard library's source):
its vocabulary is smaller than the model's, as Qwen's own is.

Tensors are generated and written one at a time, in row chunks (`write_safetensors`), so memory
holds a few MB, not the 3 GB checkpoint. Weights are N(0, 0.02); norm weights 1 + N(0, 0.1).

    python benchmarks/make_random_checkpoint.py OUT [--layers N] [--dtype bfloat16] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

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
    with torch.device("meta"):
        shapes = expected_shapes(TiDARModel(config))
    specs = [TensorSpec(name, DTYPES[config.torch_dtype], shape) for name, shape in shapes.items()]
    generator = torch.Generator().manual_seed(seed)
    write_safetensors(folder / "model.safetensors", specs, lambda spec: random_chunks(spec, generator),
                      metadata={"format": "pt"})
    config.save(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the checkpoint into")
    parser.add_argument("--layers", type=int, default=28, help="decoder layers (default 28, Qwen2.5-1.5B's)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    folder = write_checkpoint(args.out, qwen25_15b_shape(args.layers, args.dtype), args.seed)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    print(f"wrote {folder}: {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
