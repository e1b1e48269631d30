"""Key/value cache with fixed slots: allocated once, rows take and return slots.

Storage: keys and values of shape [layers, max_rows, kv_heads, capacity, head_dim], allocated
when the cache is made (and again only by an explicit `grow` or `fit`; `allocations` counts them). The
active rows are the first `batch` rows of the storage; `keys`, `values` and `lengths` are views
of them, so a forward over the batch never copies the cache. Slots [0, lengths[r]) of row r
hold its committed tokens. A forward writes the new tokens' K/V into the slots right after
that (`write`, one branch-free indexed store) without committing them; `commit(counts)` then
keeps the first counts[r] of them. Because a TiDAR step puts the drafts first, the accepted
drafts are a contiguous prefix of the new slots, so keeping them is a length update and
dropping rejected drafts and every mask is free (docs/design.md §3.2, "Advance"; §3.6).

Row lengths live twice: on the device (`lengths`, read by attention) and on the host
(`host_lengths`, for capacity checks and the attended width `max_length()`), both updated by
`commit`, so nothing here waits for the device. Rows join at the end (`add_rows`); leaving
rows are replaced by the last rows (`remove_rows`: one row's committed slots are copied per
hole, never the whole cache) and the caller reorders its own per-row state the same way.
"""

from __future__ import annotations

import torch

FIT_GRANULARITY = 64
"""Slots by which `KVCache.fit` grows and shrinks a cache."""


class KVCache:
    def __init__(self, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        """Storage for `batch` rows of `capacity` slots; all `batch` rows start active and empty."""
        shape = (layers, batch, kv_heads, capacity, head_dim)
        self._keys = torch.zeros(shape, dtype=dtype, device=device)
        self._values = torch.zeros(shape, dtype=dtype, device=device)
        self._lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self._host = [0] * batch
        self._start, self._count = 0, batch
        self._is_view = False
        self.allocations = 1
        """Times the storage was allocated (1 unless `grow` was needed)."""

    # ------------------------------------------------------------ views of the active rows
    @property
    def keys(self) -> torch.Tensor:
        return self._keys[:, self._start:self._start + self._count]

    @property
    def values(self) -> torch.Tensor:
        return self._values[:, self._start:self._start + self._count]

    @property
    def lengths(self) -> torch.Tensor:
        """Committed length of each active row, on the device: [batch]."""
        return self._lengths[self._start:self._start + self._count]

    @lengths.setter
    def lengths(self, lengths) -> None:
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        self._set_lengths(lengths.tolist(), lengths)

    @property
    def host_lengths(self) -> list[int]:
        """Committed length of each active row, on the host."""
        return self._host[self._start:self._start + self._count]

    def max_length(self) -> int:
        return max(self.host_lengths, default=0)

    @property
    def batch(self) -> int:
        return self._count

    @property
    def max_rows(self) -> int:
        return self._keys.shape[1]

    @property
    def capacity(self) -> int:
        return self._keys.shape[3]

    @property
    def device(self) -> torch.device:
        return self._keys.device

    # ------------------------------------------------------------ writes and commits
    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        """Store new K/V [B, kv_heads, Q, D] at `slots` [B, Q]; return this layer's K/V over the
        first `kv_len` slots, [B, kv_heads, kv_len, D]."""
        rows = torch.arange(self._count, device=slots.device)[:, None]
        keys, values = self.keys[layer], self.values[layer]
        keys[rows, :, slots] = k.transpose(1, 2)
        values[rows, :, slots] = v.transpose(1, 2)
        return keys[:, :, :kv_len], values[:, :, :kv_len]

    def commit(self, counts: torch.Tensor | list[int], host_counts: list[int] | None = None) -> None:
        """Keep the first `counts[r]` new tokens of each row (written by the last forward). With
        a device tensor `counts`, `host_counts` must hold the same values (the caller's copy), so
        the commit does not read the device."""
        if host_counts is None:
            host_counts = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
        if len(host_counts) != self._count or any(c < 0 for c in host_counts):
            raise ValueError(f"commit counts {host_counts} do not fit a batch of {self._count}")
        new = [n + c for n, c in zip(self.host_lengths, host_counts)]
        if any(n > self.capacity for n in new):
            raise ValueError(f"commit past the cache capacity {self.capacity}")
        if not isinstance(counts, torch.Tensor):
            counts = torch.tensor(host_counts, dtype=torch.long)
        self.lengths.add_(counts.to(self.device))
        self._host[self._start:self._start + self._count] = new

    def truncate(self, lengths: torch.Tensor | list[int]) -> None:
        """Shorten rows to `lengths` (each at most its current length)."""
        host = lengths.tolist() if isinstance(lengths, torch.Tensor) else list(lengths)
        if len(host) != self._count or any(n < 0 or n > old for n, old in zip(host, self.host_lengths)):
            raise ValueError(f"cannot truncate rows of lengths {self.host_lengths} to {host}")
        self._set_lengths(host)

    def _set_lengths(self, host: list[int], device: torch.Tensor | None = None) -> None:
        if len(host) != self._count:
            raise ValueError(f"{len(host)} lengths for a batch of {self._count}")
        self.lengths.copy_(device if device is not None else torch.tensor(host, dtype=torch.long))
        self._host[self._start:self._start + self._count] = host

    # ------------------------------------------------------------ rows joining and leaving
    def row(self, index: int) -> "KVCache":
        """A batch-1 view of one active row; writes and commits go through to this cache."""
        if not 0 <= index < self._count:
            raise IndexError(f"row {index} of a batch of {self._count}")
        view = KVCache.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view._start, view._count = self._start + index, 1
        view._is_view = True
        return view

    @property
    def is_view(self) -> bool:
        """Whether this is a view (`row`, `padded`) of another cache's storage rows."""
        return self._is_view

    def padded(self, rows: int) -> "KVCache":
        """A view of the first `rows` storage rows: the active rows, then free ones (batch <= rows
        <= max_rows), for a forward padded to a fixed batch (cuda_graphs.py). Its writes go to this
        cache's storage; what a padded row writes lands in free storage, which a joining row starts
        without reading (`add_rows` makes it empty). Its `lengths` are not maintained: the caller
        passes the rows' past lengths. Not for a view (a `row`'s next storage rows are in use)."""
        if self._is_view:
            raise ValueError("a view of a cache cannot be padded: the storage rows after it may be in use")
        if not self._count <= rows <= self.max_rows:
            raise ValueError(f"cannot pad a batch of {self._count} to {rows} rows of a cache with {self.max_rows}")
        view = KVCache.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view._count = rows
        view._is_view = True
        return view

    def clear(self) -> None:
        """No active rows (the storage stays)."""
        self._count = 0

    def add_rows(self, count: int) -> list[int]:
        """Activate `count` empty rows at the end of the batch; returns their indices."""
        if self._count + count > self.max_rows:
            raise ValueError(f"{self._count} + {count} rows exceed the cache's {self.max_rows} rows")
        first = self._count
        self._count += count
        self._set_lengths(self.host_lengths[:first] + [0] * count)
        return list(range(first, self._count))

    def remove_rows(self, indices: list[int]) -> list[int]:
        """Free the rows `indices`. Each hole below the new batch size is filled by one of the
        last rows (its committed slots are copied; nothing else moves). Returns `order`: the
        old index of each remaining row, in its new place."""
        gone = set(indices)
        if any(not 0 <= i < self._count for i in gone):
            raise IndexError(f"rows {sorted(gone)} of a batch of {self._count}")
        remaining = self._count - len(gone)
        order = list(range(remaining))
        holes = [i for i in range(remaining) if i in gone]
        movers = [i for i in range(remaining, self._count) if i not in gone]
        host = self.host_lengths
        for hole, mover in zip(holes, movers):
            length = host[mover]
            src, dst = self._start + mover, self._start + hole
            self._keys[:, dst, :, :length] = self._keys[:, src, :, :length]
            self._values[:, dst, :, :length] = self._values[:, src, :, :length]
            self._lengths[dst] = self._lengths[src]
            self._host[dst] = length
            order[hole] = mover
        self._count = remaining
        return order

    def grow(self, max_rows: int, capacity: int) -> None:
        """Reallocate to at least `max_rows` rows of `capacity` slots, keeping the active rows
        (the one operation that copies the cache; `allocations` counts it)."""
        max_rows, capacity = max(max_rows, self.max_rows), max(capacity, self.capacity)
        if (max_rows, capacity) != (self.max_rows, self.capacity):
            self._reallocate(max_rows, capacity)

    def fit(self, need: int, granularity: int = FIT_GRANULARITY) -> bool:
        """Keep the capacity near `need` slots (the most a row will hold after the next forward),
        for a backend whose forward reads every slot: grow to `need` rounded up to `granularity`,
        plus `granularity`, when `need` exceeds it; shrink to that when it is more than three
        `granularity` above it (the committed slots are kept; the gap makes a row that keeps
        growing reallocate once per `granularity` tokens, not at every step). Returns whether
        the storage was reallocated."""
        if need < self.max_length():
            raise ValueError(f"cannot fit {need} slots: a row holds {self.max_length()}")
        target = -(-need // granularity) * granularity + granularity
        if need <= self.capacity <= target + 2 * granularity:
            return False
        self._reallocate(self.max_rows, target)
        return True

    def _reallocate(self, max_rows: int, capacity: int) -> None:
        layers, _, heads, old_capacity, dim = self._keys.shape
        shape = (layers, max_rows, heads, capacity, dim)
        active = slice(self._start, self._start + self._count)
        kept = min(old_capacity, capacity)
        for name in ("_keys", "_values"):
            old = getattr(self, name)
            new = torch.zeros(shape, dtype=old.dtype, device=old.device)
            new[:, :self._count, :, :kept] = old[:, active, :, :kept]
            setattr(self, name, new)
        lengths = torch.zeros(max_rows, dtype=torch.long, device=self.device)
        lengths[:self._count] = self._lengths[active]
        self._lengths, self._host = lengths, self.host_lengths + [0] * (max_rows - self._count)
        self._start = 0
        self.allocations += 1
