"""Live decisions agree across ranks: two CPU processes on gloo, each seeing a different shard."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from difcache.core import Action, StepInfo
from difcache.policies.teacache import AccumulatedChangePolicy, relative_l1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard(rank: int, step: int) -> torch.Tensor:
    """Rank 0's shard changes fast, rank 1's slowly: decisions from local statistics would differ."""
    base = torch.linspace(1.0, 2.0, 32) + rank
    return base * (1 + (0.08 if rank == 0 else 0.01) * step)


def _decisions(signals: list[torch.Tensor]) -> list[int]:
    policy = AccumulatedChangePolicy(threshold=0.1, coefficients=(1.0, 0.0))
    state = policy.new_state()
    infos = [StepInfo(0, step, len(signals), "call0", 0) for step in range(len(signals))]
    return [int(policy.decide_live(state, i, s) == Action.COMPUTE) for i, s in zip(infos, signals, strict=True)]


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    shards = [_shard(rank, step) for step in range(12)]
    queue.put((rank, _decisions(shards), relative_l1(shards[1], shards[0])))
    dist.destroy_process_group()


def test_two_ranks_take_identical_decisions():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = dict((rank, (decisions, ratio)) for rank, decisions, ratio in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # Both ranks decide as one process would on the whole (concatenated) tensor.
    whole = [torch.cat([_shard(0, step), _shard(1, step)]) for step in range(12)]
    expected = _decisions(whole)
    assert results[0][0] == results[1][0] == expected
    assert results[0][1] == results[1][1] == pytest.approx(relative_l1(whole[1], whole[0]), rel=1e-6)
    assert 2 < sum(expected) < 12
    # Without the reduction the two ranks would have disagreed.
    assert _decisions([_shard(0, s) for s in range(12)]) != _decisions([_shard(1, s) for s in range(12)])
