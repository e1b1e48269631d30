"""KVCache bookkeeping: per-row writes at each row's own length, commit, truncate, row views,
dropping and joining rows — checked against plain tensor slicing."""

from __future__ import annotations

import pytest
import torch

from tidar.runtime.cache import KVCache


def filled_cache(lengths: list[int], capacity: int = 12) -> KVCache:
    cache = KVCache(layers=2, batch=len(lengths), kv_heads=2, capacity=capacity, head_dim=3)
    cache.keys.normal_()
    cache.values.normal_()
    cache.lengths = torch.tensor(lengths)
    return cache


@pytest.mark.parametrize("lengths", [[3, 3], [0, 5], [4, 1, 7]])
def test_write_goes_after_each_rows_length_and_commit_keeps_a_prefix(lengths):
    cache = filled_cache(lengths)
    before = cache.keys.clone()
    new_k = torch.randn(len(lengths), 2, 4, 3)
    new_v = torch.randn(len(lengths), 2, 4, 3)
    slots = cache.lengths[:, None] + torch.arange(4)
    keys, values = cache.write(1, slots, new_k, new_v, kv_len=max(lengths) + 4)
    for r, length in enumerate(lengths):
        assert torch.equal(keys[r, :, length:length + 4], new_k[r])
        assert torch.equal(values[r, :, length:length + 4], new_v[r])
        assert torch.equal(cache.keys[1, r, :, :length], before[1, r, :, :length])  # committed slots untouched
    assert torch.equal(cache.keys[0], before[0])  # other layers untouched
    assert cache.lengths.tolist() == lengths  # writing commits nothing
    cache.commit([2] * len(lengths))
    assert cache.lengths.tolist() == [n + 2 for n in lengths]


def test_commit_and_truncate_validate():
    cache = filled_cache([3, 5])
    with pytest.raises(ValueError):
        cache.commit([1])
    with pytest.raises(ValueError):
        cache.commit([-1, 0])
    with pytest.raises(ValueError):
        cache.commit([0, 8])  # past capacity 12
    with pytest.raises(ValueError):
        cache.truncate([4, 5])  # longer than the row
    cache.truncate([1, 5])
    assert cache.lengths.tolist() == [1, 5]


def test_row_view_writes_through_and_rows_can_leave_and_join():
    cache = filled_cache([2, 4, 6])
    view = cache.row(1)
    view.commit([3])
    view.keys[0, 0, 0, 0, 0] = 42.0
    assert cache.lengths.tolist() == [2, 7, 6] and cache.keys[0, 1, 0, 0, 0] == 42.0
    kept = cache.keys[:, [2, 0]].clone()
    cache.keep_rows([2, 0])
    assert cache.lengths.tolist() == [6, 2] and torch.equal(cache.keys, kept)
    other = filled_cache([1], capacity=20)
    merged = cache.concat(other)
    assert merged.capacity == 20 and merged.lengths.tolist() == [6, 2, 1]
    assert torch.equal(merged.keys[:, :2, :, :12], cache.keys)
    assert torch.equal(merged.keys[:, 2:], other.keys)
