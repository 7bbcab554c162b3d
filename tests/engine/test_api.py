"""Public API behaviour on a small FLUX transformer driven by a real scheduler."""

import pytest
import torch
from diffusers import FirstBlockCacheConfig
from helpers import FluxLoop

import difcache


@pytest.fixture
def pipe():
    return FluxLoop()


def test_taylorseer_skips_units_and_stays_close(pipe):
    reference = pipe()
    with difcache.apply_cache(pipe, "taylorseer", interval=3, warmup=2) as handle:
        cached = pipe()
        stats = handle.stats()
    assert stats.calls == 8 and stats.runs == 1
    assert stats.totals()["forecast"] > 0 and stats.ideal_speedup > 1.3
    assert (cached - reference).abs().max() < 0.5 * reference.abs().max()
    assert "ideal speedup" in str(stats) and "transformer_blocks.0.attn" in str(stats)


def test_taylorseer_lite_forecasts_both_flux_streams_as_one_unit(pipe):
    """Lite over FLUX's double- and single-stream blocks: one unit spanning the whole stack, its image and text
    residuals forecast together; no block runs on a forecast step."""
    reference = pipe()
    attention_calls = []
    hook = pipe.transformer.transformer_blocks[0].attn.register_forward_hook(lambda *_: attention_calls.append(1))
    try:
        with difcache.apply_cache(pipe, "taylorseer", interval=3, warmup=2, lite=True) as handle:
            cached = pipe()
            stats = handle.stats()
    finally:
        hook.remove()
    assert [u.name for u in stats.units] == ["transformer_blocks.0..single_transformer_blocks.1"]
    assert stats.totals()["forecast"] == 4 and stats.totals()["compute"] == 4
    assert len(attention_calls) == 4  # block 0's attention runs on the 4 full steps only
    assert (cached - reference).abs().max() < 0.5 * reference.abs().max()


def test_method_by_keyword_as_in_the_readme(pipe):
    """``apply_cache(pipe, method="...")`` is the documented one-liner; it once was positional-only."""
    with difcache.apply_cache(pipe, method="fora", interval=3) as by_keyword:
        keyword_out = pipe()
    with difcache.apply_cache(pipe, "fora", interval=3) as positional:
        positional_out = pipe()
    assert by_keyword.config == positional.config and torch.equal(keyword_out, positional_out)


def test_remove_is_bit_identical_and_idempotent(pipe):
    reference = pipe()
    handle = difcache.apply_cache(pipe, "fora")
    pipe()
    handle.remove()
    handle.remove()
    assert torch.equal(pipe(), reference)
    assert "step" not in vars(pipe.scheduler)


def test_second_apply_raises_naming_remove(pipe):
    handle = difcache.apply_cache(pipe, "fora")
    with pytest.raises(difcache.DifcacheError, match=r"remove\(\)"):
        difcache.apply_cache(pipe.transformer, "taylorseer")
    assert difcache.remove_cache(pipe) is True
    assert difcache.remove_cache(pipe) is False
    assert not handle.active


def test_refuses_to_stack_on_diffusers_cache(pipe):
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(difcache.DifcacheError, match="disable_cache"):
        difcache.apply_cache(pipe, "taylorseer")
    pipe.transformer.disable_cache()


def test_unknown_model_names_class_and_registration():
    with pytest.raises(difcache.DifcacheError, match=r"no adapter for Linear.*register_adapter"):
        difcache.apply_cache(torch.nn.Linear(2, 2), "fora")


def test_adapter_matching_nothing_is_an_error_not_a_silent_no_op():
    class Empty(torch.nn.Module):
        blocks = torch.nn.ModuleList()

    difcache.register_adapter(Empty, difcache.block_adapter("empty", ["blocks"], {"attn": "attn"}))
    with pytest.raises(difcache.DifcacheError, match="no cacheable units"):
        difcache.apply_cache(Empty(), "fora")


def test_unknown_method_and_bad_override(pipe):
    with pytest.raises(difcache.DifcacheError, match="Unknown method .*registered:"):
        difcache.apply_cache(pipe, "magic")
    with pytest.raises(ValueError, match="interval must be"):
        difcache.apply_cache(pipe, "fora", interval=0)
    assert not hasattr(pipe.transformer, "_difcache_cache")


def test_config_instance_on_bare_module(pipe):
    reference = pipe()
    handle = difcache.apply_cache(pipe.transformer, difcache.TaylorSeerConfig(interval=2, order=1, warmup=1))
    first, second = pipe(), pipe()
    assert torch.equal(first, second)  # bare module: runs separated by the rising timestep
    assert handle.stats().runs == 2
    assert not torch.equal(first, reference)
    handle.remove()


def test_always_compute_is_exact(pipe):
    reference = pipe()
    with difcache.apply_cache(pipe, "always_compute") as handle:
        assert torch.equal(pipe(), reference)
        assert handle.stats().ideal_speedup == 1.0


def test_shape_change_between_calls(pipe):
    with difcache.apply_cache(pipe, "taylorseer", interval=2, warmup=1) as handle:
        small, large = pipe(tokens=16), pipe(tokens=36)
        assert small.shape[1] == 16 and large.shape[1] == 36
        assert handle.stats().runs == 2


def test_non_finite_forecast_recomputes_and_is_counted(pipe):
    ff = pipe.transformer.transformer_blocks[0].ff
    calls = {"n": 0}

    def overflow_once(module, args, output):
        calls["n"] += 1
        return output * float("inf") if calls["n"] == 2 else output  # the second computed step overflows

    hook = ff.net[-1].register_forward_hook(overflow_once)  # inside the unit, so the engine sees it
    with difcache.apply_cache(pipe, "taylorseer", interval=3, warmup=1, order=1) as handle:
        pipe(8)
        stats = handle.stats()
    hook.remove()
    unit = next(u for u in stats.units if u.name == "transformer_blocks.0.ff")
    assert unit.nonfinite_fallbacks > 0
    scheduled = sum(1 for s in range(8) if s < 1 or s % 3 == 0)
    assert unit.compute == scheduled + unit.nonfinite_fallbacks  # each fallback was a recomputation
    assert unit.forecast == 8 - unit.compute
