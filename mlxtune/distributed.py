"""Data parallelism over mx.distributed (launched with `mlx.launch`); a no-op in a single process.

`maybe_init()` returns None in a single process, else a `World` wrapping the group. The trainer gives each
process the micro-batches of every step whose index ≡ rank (mod size); `make_all_reduce` sums gradients and
token counts across processes before the update, so the update equals a single process's on the same global
batch. Only rank 0 writes checkpoints, metrics and adapters.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
from mlx.utils import tree_map


class World:
    def __init__(self, group):
        self.group = group

    def rank(self) -> int:
        return self.group.rank()

    def size(self) -> int:
        return self.group.size()

    def sum_scalars(self, values: list[float]) -> list[float]:
        out = mx.distributed.all_sum(mx.array(values, dtype=mx.float32), group=self.group)
        return out.tolist()


def maybe_init() -> Optional[World]:
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return World(group) if group.size() > 1 else None


def make_all_reduce(world: World):
    def all_reduce(tree):
        return tree_map(lambda x: mx.distributed.all_sum(x, group=world.group), tree)

    return all_reduce
