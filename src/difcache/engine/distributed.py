"""Keeping live decisions identical on every rank.

With context parallelism each rank sees a shard of the tokens; a decision computed from a local statistic
could differ between ranks and deadlock the next collective. Dynamic policies therefore reduce the *sums* their
statistic is made of across ranks before deciding, which gives every rank the statistic of the full tensor
(``mean|a-b| / mean|b|`` is a ratio of two sums over the same number of entries).

Data-parallel work (each process samples *different* inputs, as in FID evaluation) must not reduce: wrap it in
:func:`independent_ranks`, or processes with unequal batch counts would wait on each other forever.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

_independent_depth = 0


@contextlib.contextmanager
def independent_ranks() -> Iterator[None]:
    """Within this block every process decides on its own samples (data parallelism): nothing is reduced."""
    global _independent_depth
    _independent_depth += 1
    try:
        yield
    finally:
        _independent_depth -= 1


def is_distributed() -> bool:
    """True when live statistics must be reduced across ranks (sharded model, not inside independent_ranks)."""
    if _independent_depth:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_sums(values: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``values`` summed over all ranks (unchanged when not distributed)."""
    if not is_distributed():
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values
