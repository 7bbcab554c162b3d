"""Keeping live decisions identical on every rank.

With context parallelism each rank sees a shard of the tokens; a decision computed from a local statistic
could differ between ranks and deadlock the next collective. Dynamic policies therefore reduce the *sums* their
statistic is made of across ranks before deciding, which gives every rank the statistic of the full tensor
(``mean|a-b| / mean|b|`` is a ratio of two sums over the same number of entries).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_sums(values: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``values`` summed over all ranks (unchanged when not distributed)."""
    if not is_distributed():
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values
