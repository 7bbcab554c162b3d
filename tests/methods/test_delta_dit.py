"""Δ-DiT: stage-switch schedule and Δ-cache of front/rear block ranges."""


import pytest
import torch
from helpers import FluxLoop

import difcache
from difcache.core import Action
from difcache.policies.stage import FRONT, REAR, StageSwitchSchedule


def test_rear_cached_early_front_cached_late_full_every_interval():
    policy = StageSwitchSchedule(interval=3, boundary=6)
    rows = [(policy.decide(s, 12, FRONT), policy.decide(s, 12, REAR)) for s in range(12)]
    for step, (front, rear) in enumerate(rows):
        if step % 3 == 0 or step == 11:
            assert front == rear == Action.COMPUTE
        elif step < 6:
            assert (front, rear) == (Action.COMPUTE, Action.REUSE)
        else:
            assert (front, rear) == (Action.REUSE, Action.COMPUTE)


def test_fractional_boundary():
    assert StageSwitchSchedule(2, 0.25).boundary_step(20) == 5


def test_delta_cache_adds_deviation_to_current_input():
    pipe = FluxLoop()
    reference = pipe(12)
    with difcache.apply_cache(pipe, "delta_dit", num_cached_blocks=2, interval=2) as handle:
        cached = pipe(12)
        stats = handle.stats()
    front, rear = stats.units
    assert front.reuse > 0 and rear.reuse > 0
    assert 1.0 < stats.ideal_speedup < 2.0
    assert (cached - reference).abs().max() < 0.1 * reference.abs().max()
    assert torch.equal(pipe(12), reference)


def test_overlapping_ranges_rejected():
    with pytest.raises(difcache.DifcacheError, match="more than half"):
        difcache.apply_cache(FluxLoop(), "delta_dit", num_cached_blocks=3)
    with pytest.raises(ValueError, match="boundary must be > 0.0 and <= 1.0"):
        difcache.DeltaDiTConfig(boundary=1.5)
