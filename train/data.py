"""Plain-text corpora for training: file globs, a train/held-out split by file, token streams
and deterministic batches.

The split is by file (a file is held out when the MD5 of its path relative to the common root
falls in the held-out fraction), so held-out text never leaks into training. Each split is
one token stream (files joined with the end-of-text token). The batch of step t is a set of
random windows drawn from a generator seeded with (seed, t): a run resumed at step t sees
exactly the batches it would have seen without stopping.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer


STDLIB = "stdlib"
"""The pattern that stands for the Python standard library's own source (see stdlib_files)."""


def expand_globs(patterns: list[str]) -> list[Path]:
    """Every file matching the glob patterns (recursive `**` allowed), sorted, without duplicates.
    The pattern 'stdlib' stands for the standard library's .py files (no tests, no site-packages)."""
    from .checkpoint import stdlib_files

    files = sorted({Path(p).resolve() for pattern in patterns if pattern != STDLIB
                    for p in glob.glob(pattern, recursive=True) if Path(p).is_file()}
                   | ({p.resolve() for p in stdlib_files()} if STDLIB in patterns else set()))
    if not files:
        raise FileNotFoundError(f"no files match {patterns}")
    return files


def split_files(files: list[Path], heldout_percent: float) -> tuple[list[Path], list[Path]]:
    """(train, held-out) by a stable hash of each file's path relative to the files' common root."""
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    train, heldout = [], []
    for f in files:
        bucket = int(hashlib.md5(str(f.relative_to(root)).encode()).hexdigest(), 16) % 10000
        (heldout if bucket < heldout_percent * 100 else train).append(f)
    if not train or not heldout:
        raise ValueError(f"splitting {len(files)} files at {heldout_percent}% held out leaves an empty side")
    return train, heldout


def token_stream(files: list[Path], tokenizer: Tokenizer, eos_id: int) -> torch.Tensor:
    """All files tokenized and joined with `eos_id` after each: a 1-D int32 tensor."""
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.int32)


@dataclass
class Batches:
    """Random windows of a token stream."""

    stream: torch.Tensor
    seq_len: int
    batch_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.stream.numel() <= self.seq_len:
            raise ValueError(f"token stream of {self.stream.numel()} tokens is shorter than seq_len {self.seq_len}")

    def at_step(self, step: int) -> torch.Tensor:
        """The batch [batch_size, seq_len] of `step` (a pure function of seed and step)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, self.stream.numel() - self.seq_len, (self.batch_size,), generator=generator)
        return torch.stack([self.stream[s: s + self.seq_len] for s in starts.tolist()]).long()

    def fixed(self, count: int) -> list[torch.Tensor]:
        """`count` evenly spaced, non-random batches (the held-out evaluation set)."""
        windows = (self.stream.numel() - 1) // self.seq_len
        total = min(windows, count * self.batch_size)
        stride = max(windows // max(total, 1), 1)
        starts = [i * stride * self.seq_len for i in range(total)]
        rows = [self.stream[s: s + self.seq_len].long() for s in starts]
        return [torch.stack(rows[i: i + self.batch_size]) for i in range(0, len(rows), self.batch_size)]
