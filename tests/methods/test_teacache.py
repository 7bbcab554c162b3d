"""TeaCache / first-block cache: policy rules, range-scope mechanics, calibration and profiles."""

import json

import pytest
import torch
from helpers import FluxLoop

import difcache
from difcache.core import Action, StepInfo
from difcache.policies.teacache import AccumulatedChangePolicy, polyval


def _info(step, num_steps=10):
    return StepInfo(0, step, num_steps, "call0", 0)


def _run(policy, signals, num_steps=None):
    state = policy.new_state()
    n = num_steps or len(signals)
    return "".join(
        "C" if policy.decide_live(state, _info(i, n), torch.tensor([s])) == Action.COMPUTE else "R"
        for i, s in enumerate(signals)
    )


def test_accumulates_relative_change_and_resets_on_compute():
    # Relative changes 0.1 each step: threshold 0.25 -> two skips then a compute (0.1, 0.2 < 0.25; 0.3 >= 0.25).
    signals = [1.0 * 1.1**i for i in range(10)]
    policy = AccumulatedChangePolicy(threshold=0.25, coefficients=(1.0, 0.0), warmup=1, cooldown=1)
    assert _run(policy, signals) == "CRRCRRCRRC"


def test_first_and_last_steps_forced_and_warmup():
    policy = AccumulatedChangePolicy(threshold=100.0, coefficients=(1.0, 0.0), warmup=3, cooldown=2)
    assert _run(policy, [1.0] * 8) == "CCCRRRCC"


def test_max_consecutive_bounds_skips():
    policy = AccumulatedChangePolicy(threshold=100.0, coefficients=(1.0, 0.0), max_consecutive=2)
    assert _run(policy, [1.0] * 9) == "CRRCRRCRC"


def test_polynomial_is_highest_degree_first_like_numpy_poly1d():
    import numpy as np

    coefficients = (498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861)
    assert polyval(coefficients, 0.07) == pytest.approx(float(np.poly1d(coefficients)(0.07)))


@pytest.mark.parametrize("indicator", ["modulated_input", "first_block_residual", "timestep_embedding"])
def test_teacache_on_flux_skips_stack_and_stays_close(indicator):
    pipe = FluxLoop()
    reference = pipe(20)
    with difcache.apply_cache(pipe, "teacache", threshold=0.3, indicator=indicator, coefficients=(1.0, 0.0)) as h:
        cached, again = pipe(20), pipe(20)
        stats = h.stats()
    assert torch.equal(cached, again)
    (unit,) = stats.units
    assert unit.kind == "range" and unit.compute + unit.reuse == 40
    if indicator != "timestep_embedding":  # the random-weight tiny model's temb barely changes between steps
        assert unit.reuse > 0 and stats.ideal_speedup > 1.2
    assert (cached - reference).abs().max() < 0.2 * reference.abs().max()
    assert torch.equal(pipe(20), reference)


def _tiny_dit_pipeline():
    from difcache.models import bundled

    torch.manual_seed(0)
    pipe = bundled.dit_pipeline(bundled.build("dit").eval())  # eval: no random class-label dropout
    pipe.set_progress_bar_config(disable=True)
    return pipe, lambda: pipe([0, 1], num_inference_steps=8, generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("family", ["flux", "dit"])
@pytest.mark.parametrize("threshold", [1e-9, 0.5])
def test_modulated_input_runs_block_zero_norm1_once_per_call(family, threshold):
    if family == "flux":
        pipe = FluxLoop()
        model, run = pipe.transformer, lambda: pipe(8)
    else:
        pipe, run = _tiny_dit_pipeline()
        model = pipe.transformer
    reference = run()
    linear = model.transformer_blocks[0].norm1.linear  # runs once per real norm1 call
    calls: list[int] = []
    hook = linear.register_forward_hook(lambda *_: calls.append(1))
    try:
        with difcache.apply_cache(pipe, "teacache", threshold=threshold, coefficients=(1.0, 0.0)) as h:
            cached = run()
            stats = h.stats()
    finally:
        hook.remove()
    assert len(calls) == stats.calls  # the indicator's call is the block's: never twice in one denoiser call
    if threshold < 1e-6:  # every step computed: the memoised norm1 gives exactly the uncached result
        assert stats.units[0].reuse == 0 and torch.equal(cached, reference)
    else:
        assert stats.units[0].reuse > 0


def test_taylor_forecast_extrapolates_the_residual_on_skipped_steps():
    """``forecast="taylor"``: the skipped steps are FORECAST, not REUSE, and return something else than the last
    residual; the result stays close to uncached and removal restores it exactly."""
    pipe = FluxLoop()
    reference = pipe(20)
    settings = {"threshold": 0.3, "indicator": "first_block_residual", "coefficients": (1.0, 0.0)}
    with difcache.apply_cache(pipe, "teacache", **settings) as h:
        reused = pipe(20)
        reuse_stats = h.stats().units[0]
    with difcache.apply_cache(pipe, "teacache", forecast="taylor", order=2, **settings) as h:
        forecast = pipe(20)
        (unit,) = h.stats().units
    assert unit.forecast > 0 and unit.reuse == 0 and reuse_stats.reuse > 0
    assert not torch.equal(forecast, reused)
    assert (forecast - reference).abs().max() < 0.2 * reference.abs().max()
    assert torch.equal(pipe(20), reference)


def test_first_block_variant_always_computes_block_zero():
    pipe = FluxLoop()
    with difcache.apply_cache(pipe, "teacache", threshold=0.5, indicator="first_block_residual") as h:
        pipe(12)
        (unit,) = h.stats().units
    assert unit.name.startswith("transformer_blocks.1")


def test_calibrated_profile_round_trip_and_errors(tmp_path):
    pipe = FluxLoop()
    profile = difcache.calibrate(pipe, "teacache", [{"seed": 0}, {"seed": 1}], num_inference_steps=12)
    assert len(profile.data["coefficients"]) == 5 and profile.num_steps == 12
    path = tmp_path / "tea.json"
    profile.save(path)
    assert json.loads(path.read_text())["method"] == "teacache"
    with difcache.apply_cache(pipe, "teacache", profile=str(path), threshold=0.3) as h:
        pipe(12)
        assert h.stats().units[0].reuse > 0

    other = FluxLoop()
    other.transformer.single_transformer_blocks = other.transformer.single_transformer_blocks[:1]
    with pytest.raises(difcache.DifcacheError, match="different layout"):
        difcache.apply_cache(other, "teacache", profile=str(path))

    broken = json.loads(path.read_text())
    broken["num_steps"] = "twelve"
    path.write_text(json.dumps(broken))
    with pytest.raises(difcache.DifcacheError, match="`num_steps` must be int"):
        difcache.apply_cache(pipe, "teacache", profile=str(path))
    broken["num_steps"] = 12
    del broken["data"]
    path.write_text(json.dumps(broken))
    with pytest.raises(difcache.DifcacheError, match="missing field `data`"):
        difcache.Profile.load(path)
    path.write_text("{not json")
    with pytest.raises(difcache.DifcacheError, match="not valid JSON"):
        difcache.Profile.load(path)


def test_calibrate_refuses_methods_without_calibration_and_bare_modules():
    pipe = FluxLoop()
    with pytest.raises(difcache.DifcacheError, match="needs no calibration"):
        difcache.calibrate(pipe, "fora", [{}], num_inference_steps=4)
    with pytest.raises(difcache.DifcacheError, match="needs the pipeline"):
        difcache.calibrate(pipe.transformer, "teacache", [{}], num_inference_steps=4)


def test_config_validation():
    with pytest.raises(ValueError, match="threshold must be > 0.0"):
        difcache.TeaCacheConfig(threshold=0)
    with pytest.raises(ValueError, match="indicator must be one of"):
        difcache.TeaCacheConfig(indicator="magic")
    with pytest.raises(ValueError, match="forecast must be one of"):
        difcache.TeaCacheConfig(forecast="linear")
    with pytest.raises(ValueError, match="order"):
        difcache.TeaCacheConfig(forecast="taylor", order=5)
    with pytest.raises(ValueError, match="coefficients must be finite"):
        difcache.TeaCacheConfig(coefficients=(float("nan"),))
    assert difcache.TeaCacheConfig.for_family("flux").threshold == 0.6
    assert difcache.TeaCacheConfig.for_family("wan").indicator == "timestep_embedding"
    # a preset's polynomial belongs to its indicator: another indicator starts from the identity
    wan = difcache.TeaCacheConfig.for_family("wan")
    assert wan.coefficients != (1.0, 0.0)
    assert wan.replace(indicator="first_block_residual").coefficients == (1.0, 0.0)
    assert wan.replace(indicator="first_block_residual", coefficients=(2.0, 0.0)).coefficients == (2.0, 0.0)
    assert wan.replace(threshold=0.2).coefficients == wan.coefficients


@pytest.mark.parametrize(
    ("family", "overrides", "preset", "threshold", "cooldown"),
    [
        ("wan", {}, "wan2.1-t2v-1.3b", 0.08, 0),
        ("wan", {"num_layers": 40}, "wan2.1-t2v-14b", 0.1, 0),
        ("wan", {"image_dim": 16, "added_kv_proj_dim": 16}, "wan2.1-i2v-14b-480p", 0.2, 0),
        ("cogvideox", {}, "cogvideox-2b", 0.2, 1),
        ("cogvideox", {"use_rotary_positional_embeddings": True}, "cogvideox-5b", 0.2, 1),
        ("cogvideox", {"patch_size_t": 1, "use_rotary_positional_embeddings": True}, "cogvideox1.5-5b", 0.2, 1),
        ("ltx", {}, "ltx", 0.05, 1),
        ("flux", {}, "flux", 0.6, 1),
        ("dit", {}, None, 0.1, 1),
    ],
)
def test_official_preset_is_picked_from_the_model_config_and_named_in_stats(
    family, overrides, preset, threshold, cooldown
):
    from difcache.adapters import layout_of
    from difcache.models.tiny import tiny_denoiser

    model = tiny_denoiser(family, **overrides)
    config = difcache.TeaCacheConfig.for_layout(layout_of(model))
    assert (config.preset, config.threshold, config.cooldown) == (preset, threshold, cooldown)
    if family == "wan":  # use_ret_steps: the timestep projection e0, five steps computed, the last not forced
        assert config.indicator == "timestep_embedding" and config.warmup == 5
    if family == "ltx":  # block 0's modulated input, as the official TeaCache4LTX
        assert config.indicator == "modulated_input"
    handle = difcache.apply_cache(model, "teacache")
    assert handle.stats().notes["preset"] == (preset or "none (custom settings)")
    handle.remove()


def test_timestep_embedding_indicator_is_refused_at_apply_time_where_blocks_take_no_temb():
    from difcache.models.tiny import tiny_denoiser

    for family in ("dit", "pixart"):
        with pytest.raises(difcache.DifcacheError, match="takes none.*modulated_input"):
            difcache.apply_cache(tiny_denoiser(family), "teacache", indicator="timestep_embedding")
