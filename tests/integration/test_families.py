"""Every supported family, as the real diffusers pipeline class with a tiny random model, end to end, offline."""

import pytest
import torch

import difcache
from difcache.models.tiny import CFG_MODE, FAMILIES, output_of, tiny_call_kwargs, tiny_pipeline

STEPS = 6
# Stack methods on every family run under `-m slow`; by default on one batched-CFG, one sequential-CFG and the
# UNet family (which must refuse them).
STACK_DEFAULT = ("dit", "wan", "sd15")
UNETS = ("sd15", "sdxl")  # transformer blocks are a small share of a UNet's FLOPs
UNIT_METHODS = {"fora": {"interval": 2}, "taylorseer": {"interval": 3, "order": 1, "warmup": 2}}
STACK_METHODS = {
    # Random weights: residuals change a lot between steps; a high threshold bounded by max_consecutive tests the
    # mechanics (skip, reuse per branch, restore) rather than a tuned setting.
    "teacache": {
        "threshold": 5.0,
        "coefficients": (1.0, 0.0),
        "indicator": "first_block_residual",
        "max_consecutive": 2,
        "warmup": 1,  # the Wan preset's warm-up of 5 (official ret-steps mode) would leave nothing to skip
    },
    "delta_dit": {"num_cached_blocks": 1},
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    torch.manual_seed(0)
    pipe = tiny_pipeline(request.param)
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe


def _run(family, pipe, cfg=True, batch_size=2):
    return output_of(pipe(**tiny_call_kwargs(family, cfg=cfg, batch_size=batch_size, num_inference_steps=STEPS)))


@pytest.mark.parametrize("method", sorted(UNIT_METHODS))
def test_unit_methods_skip_stay_close_repeat_and_remove_exactly(family, method):
    name, pipe = family
    reference = _run(name, pipe)
    handle = difcache.apply_cache(pipe, method, **UNIT_METHODS[method])
    first, second = _run(name, pipe), _run(name, pipe)
    stats = handle.stats()
    handle.remove()
    calls_per_run = STEPS * (2 if CFG_MODE[name] == "sequential" else 1)
    assert stats.calls == 2 * calls_per_run and stats.runs == 2
    totals = stats.totals()
    skipped = totals["reuse"] + totals["forecast"]
    assert skipped > 0 and totals["compute"] < totals["compute"] + skipped
    assert stats.ideal_speedup > (1.05 if name in UNETS else 1.2)
    assert torch.equal(first, second)
    assert (first - reference).abs().mean() < 0.05
    assert torch.equal(_run(name, pipe), reference)


def test_cfg_off_and_batch_one(family):
    name, pipe = family
    reference = _run(name, pipe, cfg=False, batch_size=1)
    with difcache.apply_cache(pipe, "taylorseer", **UNIT_METHODS["taylorseer"]) as handle:
        cached = _run(name, pipe, cfg=False, batch_size=1)
        stats = handle.stats()
    assert stats.calls == STEPS and stats.totals()["forecast"] > 0
    assert (cached - reference).abs().mean() < 0.05
    assert torch.equal(_run(name, pipe, cfg=False, batch_size=1), reference)


def _check_stack_method(name, pipe, method):
    if name in UNETS:
        with pytest.raises(difcache.DifcacheError, match="deepcache"):
            difcache.apply_cache(pipe, method, **STACK_METHODS[method])
        return
    reference = _run(name, pipe)
    with difcache.apply_cache(pipe, method, **STACK_METHODS[method]) as handle:
        cached = _run(name, pipe)
        stats = handle.stats()
    assert sum(u.reuse for u in stats.units) > 0 and stats.ideal_speedup > 1.0
    assert (cached - reference).abs().mean() < 0.05
    assert torch.equal(_run(name, pipe), reference)


@pytest.mark.parametrize("method", sorted(STACK_METHODS))
def test_stack_methods(family, method):
    name, pipe = family
    if name not in STACK_DEFAULT:
        pytest.skip("this family is covered by test_stack_methods_every_family (-m slow)")
    _check_stack_method(name, pipe, method)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(STACK_METHODS))
@pytest.mark.parametrize("name", FAMILIES)
def test_stack_methods_every_family(name, method):
    pipe = tiny_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    _check_stack_method(name, pipe, method)


def test_sequential_cfg_keeps_one_cache_per_branch():
    pipe = tiny_pipeline("wan")
    pipe.set_progress_bar_config(disable=True)
    with difcache.apply_cache(pipe, "taylorseer", **UNIT_METHODS["taylorseer"]) as handle:
        _run("wan", pipe)
        branches = {branch for branch, _ in handle._runtime.store._slots}
    assert branches == {"cond", "uncond"}
