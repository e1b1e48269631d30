"""Shared fixtures: random-weight tiny TiDAR checkpoints of each family (written once per run)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # For the whole session, before anything imports triton: without a GPU the hybrid-attention
    # kernel runs under Triton's interpreter (tests that compile it run in a subprocess without this).
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tiny models: one thread is fastest and avoids oversubscribing a shared 2-core machine.
torch.set_num_threads(1)

FAMILIES = ("qwen2", "qwen3", "llama")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """{family: folder} of random-weight tiny checkpoints with block size 16 and a real tokenizer."""
    from tidar.train.checkpoint import write_random_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {family: write_random_checkpoint(root / family, family, seed=i) for i, family in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def tiny_backends(tiny_checkpoints):
    """{family: TorchBackend} in fp32 with eager attention."""
    from tidar.runtime.backends.torch_backend import TorchBackend

    return {family: TorchBackend.load(path, dtype="float32") for family, path in tiny_checkpoints.items()}


@pytest.fixture(scope="session")
def hf_models(tiny_checkpoints):
    """{family: transformers AutoModelForCausalLM} loaded from the same folders: the AR oracle."""
    import transformers

    return {family: transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()
        for family, path in tiny_checkpoints.items()}
