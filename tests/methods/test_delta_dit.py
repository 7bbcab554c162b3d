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


def test_defaults_reach_the_papers_operating_point_on_a_pixart_shaped_model():
    # The paper: 1.6x on 20-step PIXART-α (28 blocks). Random weights, so the error bound is relative to a
    # change of seed, not a quality claim.
    from difcache.models.tiny import tiny, tiny_call_kwargs

    pipe = tiny("pixart", num_layers=28)
    pipe.set_progress_bar_config(disable=True)
    reference = torch.as_tensor(pipe(**tiny_call_kwargs("pixart", num_inference_steps=20)).images)
    other_seed = torch.as_tensor(pipe(**tiny_call_kwargs("pixart", num_inference_steps=20, seed=1)).images)
    with difcache.apply_cache(pipe, "delta_dit") as handle:
        cached = torch.as_tensor(pipe(**tiny_call_kwargs("pixart", num_inference_steps=20)).images)
        stats = handle.stats()
    assert [u.name for u in stats.units] == ["transformer_blocks.0..transformer_blocks.13",
                                             "transformer_blocks.14..transformer_blocks.27"]  # fmt: skip
    assert stats.ideal_speedup >= 1.45
    assert (cached - reference).abs().mean() < 0.2 * (other_seed - reference).abs().mean()
