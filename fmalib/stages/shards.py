"""Shards of a split: shard (i, n) takes items i, i + n, i + 2n, … so the n shards of a run partition it."""
from __future__ import annotations

from ..core.errors import FmalibError


def check_shard(shard) -> tuple[int, int]:
    """(i, n) as ints with 0 <= i < n, or an error naming the shard."""
    try:
        i, n = shard
    except (TypeError, ValueError):
        raise FmalibError(f"shard {shard!r}: expected (i, n) with 0 <= i < n") from None
    if not (isinstance(i, int) and isinstance(n, int) and 0 <= i < n):
        raise FmalibError(f"shard {shard!r}: expected (i, n) with 0 <= i < n")
    return i, n


def shard_indices(n_items: int, shard: tuple[int, int]) -> list[int]:
    """Items i, i + n, i + 2n, ... of shard (i, n)."""
    i, n = check_shard(shard)
    return list(range(i, n_items, n))
