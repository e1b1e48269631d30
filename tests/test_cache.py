"""KVCache bookkeeping: per-row writes at each row's own length, commit, truncate, row views,
rows joining and leaving in fixed storage (allocated once), growth — checked against plain
tensor slicing."""

from __future__ import annotations

import pytest
import torch

from tidar.runtime.cache import KVCache


def filled_cache(lengths: list[int], capacity: int = 12, max_rows: int | None = None) -> KVCache:
    cache = KVCache(layers=2, batch=max_rows or len(lengths), kv_heads=2, capacity=capacity, head_dim=3)
    cache.clear()
    cache.add_rows(len(lengths))
    cache.keys.normal_()
    cache.values.normal_()
    cache.lengths = lengths
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
    assert cache.lengths.tolist() == cache.host_lengths == [n + 2 for n in lengths]
    cache.commit(torch.tensor([1] * len(lengths)), [1] * len(lengths))  # device counts with the host's copy
    assert cache.lengths.tolist() == cache.host_lengths == [n + 3 for n in lengths]
    assert cache.max_length() == max(lengths) + 3


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
    assert cache.lengths.tolist() == cache.host_lengths == [1, 5]


def test_rows_join_and_leave_in_fixed_storage():
    """Joins at the end, leaves filled by the last rows (their committed slots move, nothing
    else), a row view writes through; the storage is never reallocated."""
    cache = filled_cache([2, 4, 6], max_rows=5)
    storage = cache._keys.data_ptr(), cache._values.data_ptr(), cache._lengths.data_ptr()
    view = cache.row(1)
    view.commit([3])
    view.keys[0, 0, 0, 0, 0] = 42.0
    assert cache.lengths.tolist() == cache.host_lengths == [2, 7, 6] and cache.keys[0, 1, 0, 0, 0] == 42.0
    assert cache.add_rows(2) == [3, 4] and cache.host_lengths == [2, 7, 6, 0, 0]
    with pytest.raises(ValueError, match="exceed"):
        cache.add_rows(1)
    cache.row(4).commit([5])
    committed = {r: (cache.keys[:, r, :, :n].clone(), cache.values[:, r, :, :n].clone())
                 for r, n in enumerate(cache.host_lengths)}
    order = cache.remove_rows([0, 2])
    assert order == [3, 1, 4]  # rows 3 and 4 fill the holes 0 and 2; row 1 stays
    assert cache.batch == 3 and cache.host_lengths == cache.lengths.tolist() == [0, 7, 5]
    for new, old in enumerate(order):
        n = cache.host_lengths[new]
        assert torch.equal(cache.keys[:, new, :, :n], committed[old][0])
        assert torch.equal(cache.values[:, new, :, :n], committed[old][1])
    cache.remove_rows([0, 1, 2])
    assert cache.batch == 0 and cache.add_rows(1) == [0] and cache.host_lengths == [0]
    assert (cache._keys.data_ptr(), cache._values.data_ptr(), cache._lengths.data_ptr()) == storage
    assert cache.allocations == 1


def test_grow_keeps_the_active_rows_and_counts_the_allocation():
    cache = filled_cache([2, 4], capacity=6, max_rows=2)
    keys = cache.keys.clone()
    cache.grow(4, 10)
    assert (cache.max_rows, cache.capacity, cache.allocations) == (4, 10, 2)
    assert cache.host_lengths == cache.lengths.tolist() == [2, 4]
    assert torch.equal(cache.keys[:, :, :, :6], keys)
    cache.grow(3, 8)  # already large enough
    assert cache.allocations == 2


def test_fit_follows_the_rows_and_keeps_committed_slots():
    """`fit` grows to need rounded up to the granularity plus one granularity, leaves a capacity
    within [need, that + 2 granularities] alone, shrinks a larger one, and keeps every active row's
    committed slots and lengths; a need below a row's length is refused."""
    cache = filled_cache([5, 2, 9], capacity=12, max_rows=4)
    cache.remove_rows([1])  # the last row moves into the hole: storage rows are not the first ones in order
    committed = [(cache.keys[:, r, :, :n].clone(), cache.values[:, r, :, :n].clone())
                 for r, n in enumerate(cache.host_lengths)]

    def unchanged():
        for r, n in enumerate(cache.host_lengths):
            assert torch.equal(cache.keys[:, r, :, :n], committed[r][0])
            assert torch.equal(cache.values[:, r, :, :n], committed[r][1])
        assert cache.lengths.tolist() == cache.host_lengths == [5, 9]

    assert cache.fit(12, granularity=8) is False and cache.capacity == 12  # need fits, not far above it
    assert cache.fit(13, granularity=8) is True and cache.capacity == 24  # 16 + 8
    unchanged()
    assert cache.fit(9, granularity=8) is False and cache.capacity == 24  # within 16 + 2 * 8
    cache.grow(4, 60)
    assert cache.fit(10, granularity=8) is True and cache.capacity == 24  # 60 > 16 + 8 + 16: shrunk
    unchanged()
    assert cache.allocations == 4 and cache.max_rows == 4
    with pytest.raises(ValueError, match="a row holds 9"):
        cache.fit(8, granularity=8)
