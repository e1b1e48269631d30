"""Preallocated key/value cache with a committed length per row.

Layout: keys and values of shape [layers, batch, kv_heads, capacity, head_dim]. Slots
[0, lengths[r]) of row r hold its committed tokens. A forward writes the new tokens' K/V
into the slots right after that (see model.py) without committing them; `commit(counts)`
then keeps the first `counts[r]` of them. Because a TiDAR step puts the drafts first, the
accepted drafts are always a contiguous prefix of the new slots, so keeping them is a
length update and dropping rejected drafts and every mask is free (SPEC §3, "Advance").
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (layers, batch, kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        """Store new K/V [B, kv_heads, Q, D] at `slots` [B, Q]; return this layer's K/V over the
        first `kv_len` slots, [B, kv_heads, kv_len, D]."""
        first = slots[:, 0]
        if bool((first == first[0]).all()):  # every row starts at the same slot: a plain slice
            start = int(first[0])
            self.keys[layer, :, :, start:start + k.shape[2]] = k
            self.values[layer, :, :, start:start + k.shape[2]] = v
        else:
            rows = torch.arange(self.batch, device=slots.device)[:, None]
            self.keys[layer][rows, :, slots] = k.transpose(1, 2)
            self.values[layer][rows, :, slots] = v.transpose(1, 2)
        return self.keys[layer, :, :, :kv_len], self.values[layer, :, :, :kv_len]

    def commit(self, counts: torch.Tensor | list[int]) -> None:
        """Keep the first `counts[r]` new tokens of each row (written by the last forward)."""
        counts = torch.as_tensor(counts, dtype=torch.long, device=self.lengths.device)
        if counts.shape != self.lengths.shape or bool((counts < 0).any()):
            raise ValueError(f"commit counts {counts.tolist()} do not fit a batch of {self.batch}")
        if bool((self.lengths + counts > self.capacity).any()):
            raise ValueError(f"commit past the cache capacity {self.capacity}")
        self.lengths += counts

    def truncate(self, lengths: torch.Tensor | list[int]) -> None:
        """Shorten rows to `lengths` (each at most its current length)."""
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=self.lengths.device)
        if lengths.shape != self.lengths.shape or bool((lengths < 0).any() or (lengths > self.lengths).any()):
            raise ValueError(f"cannot truncate rows of lengths {self.lengths.tolist()} to {lengths.tolist()}")
        self.lengths.copy_(lengths)

    def row(self, index: int) -> "KVCache":
        """A batch-1 view of one row; writes and commits go through to this cache."""
        view = KVCache.__new__(KVCache)
        view.keys = self.keys[:, index:index + 1]
        view.values = self.values[:, index:index + 1]
        view.lengths = self.lengths[index:index + 1]
        return view

    def keep_rows(self, indices: list[int]) -> None:
        """Drop every row not in `indices` (in that order), freeing their slots."""
        index = torch.as_tensor(indices, dtype=torch.long, device=self.lengths.device)
        self.keys = self.keys.index_select(1, index)
        self.values = self.values.index_select(1, index)
        self.lengths = self.lengths.index_select(0, index)

    def reserve(self, capacity: int) -> None:
        """Grow every row to at least `capacity` slots (committed contents are kept)."""
        if capacity > self.capacity:
            self.keys, self.values = _pad_slots(self.keys, capacity), _pad_slots(self.values, capacity)

    def concat(self, other: "KVCache") -> "KVCache":
        """A cache holding this cache's rows followed by `other`'s (capacities padded to the larger)."""
        capacity = max(self.capacity, other.capacity)
        merged = KVCache.__new__(KVCache)
        merged.keys = torch.cat([_pad_slots(self.keys, capacity), _pad_slots(other.keys, capacity)], dim=1)
        merged.values = torch.cat([_pad_slots(self.values, capacity), _pad_slots(other.values, capacity)], dim=1)
        merged.lengths = torch.cat([self.lengths, other.lengths])
        return merged


def _pad_slots(tensor: torch.Tensor, capacity: int) -> torch.Tensor:
    missing = capacity - tensor.shape[3]
    return tensor if missing == 0 else torch.nn.functional.pad(tensor, (0, 0, 0, missing))
