"""Load a TiDAR checkpoint (config.json + safetensors + tokenizer) into the reference model.

Weights are read with `safetensors` only: a single `model.safetensors` or a sharded
`model.safetensors.index.json`. Pickle checkpoints (`pytorch_model.bin`) are refused,
since unpickling runs arbitrary code. Every problem is reported as a `CheckpointError` that
names the file and the tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import ConfigError, TiDARConfig
from .model import TiDARModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SUPPORTED_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


def weight_files(folder: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({exc})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        files = {name: folder / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"{index}: names shard {shard.name}, which does not exist")
        return files
    if single.is_file():
        try:
            with safe_open(single, framework="pt") as handle:
                return {name: single for name in handle.keys()}
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{single}: not a readable safetensors file ({exc})") from None
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickles:
        raise CheckpointError(f"{folder}: only pickle weights ({', '.join(pickles)}); refusing to unpickle "
                              "them (it can run arbitrary code). Convert them to safetensors first.")
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def expected_shapes(model: TiDARModel) -> dict[str, tuple[int, ...]]:
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def ignorable_tensor(name: str, config: TiDARConfig) -> bool:
    """Tensors a valid checkpoint may carry that the model does not read, as transformers
    ignores them too: the RoPE table some Llama checkpoints store, and a tied LM head."""
    return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_word_embeddings)


def check_tensor_names(folder: Path, files: dict[str, Path], expected: dict[str, tuple[int, ...]],
                       config: TiDARConfig) -> None:
    """Every tensor the model needs is present, and no tensor the config does not account for
    (e.g. more layers) is: config.json and the weights agree."""
    missing = sorted(set(expected) - set(files))
    if missing:
        raise CheckpointError(f"{folder}: missing tensor {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(name for name in set(files) - set(expected) if not ignorable_tensor(name, config))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{files[unexpected[0]]}: tensor {unexpected[0]!r}{more} is not part of the model "
                              "that config.json describes; config.json and the weights disagree")


def load_state_dict(folder: Path, model: TiDARModel) -> dict[str, torch.Tensor]:
    """Read and check every tensor the model needs (present, right shape, float, finite)."""
    files = weight_files(folder)
    expected = expected_shapes(model)
    check_tensor_names(folder, files, expected, model.config)
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for path, names in by_file.items():
        try:
            with safe_open(path, framework="pt") as handle:
                for name in names:
                    tensor = handle.get_tensor(name)
                    if tuple(tensor.shape) != expected[name]:
                        raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                              f"config.json implies {expected[name]}")
                    if tensor.dtype not in SUPPORTED_WEIGHT_DTYPES:
                        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {tensor.dtype}")
                    if not bool(torch.isfinite(tensor).all()):
                        raise CheckpointError(f"{path}: tensor {name!r} contains NaN or Inf")
                    state[name] = tensor
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    return state


def load_model(path: str | Path, dtype: str | torch.dtype | None = None, attention: str = "eager",
               device: str | torch.device = "cpu", mask_token_id: int | None = None,
               block_size: int | None = None) -> TiDARModel:
    """Build the reference model of the checkpoint folder `path`, in `dtype` (default: the
    checkpoint's own). `mask_token_id` / `block_size` supply or override the TiDAR fields
    (`TiDARConfig.from_file`: a released TiDAR-LM checkpoint needs neither)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder")
    try:
        config = TiDARConfig.from_file(folder, mask_token_id=mask_token_id, block_size=block_size)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    dtype = dtype or DTYPES[config.torch_dtype]
    with torch.device("meta"):
        model = TiDARModel(config, attention=attention)
    state = load_state_dict(folder, model)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device=device, dtype=dtype).eval()
