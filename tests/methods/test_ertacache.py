"""ERTACache: reuse-set selection, closed-form rectification, timestep adjustment, calibration and profiles."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline

import difcache
from difcache.core import Action, combine
from difcache.engine.steps import StepTracker
from difcache.forecasters.rectified import RectifiedForecaster, fit_rectification, from_paper, to_paper
from difcache.methods.ertacache import ERTACacheConfig
from difcache.methods.ertacache_calibration import fit_coefficients, select_reuse_steps, step_factors
from difcache.methods.ertacache_timesteps import TimestepAdjustment
from difcache.models.flow_loop import FluxLoop, flux_transformer
from difcache.policies.table import TableSchedule

STEPS = 20
THRESHOLD = 0.4  # the random-weight model's residual changes by 25-45% per step; 0.4 reuses about 2/3 of them


def _scalar_sample(values):
    """One calibration sample whose residual at each step is a 1-element tensor (image stream only)."""
    return [[torch.tensor([float(v)]), None] for v in values]


def _loop(seed=0, single_layers=2):
    model = flux_transformer(
        num_layers=1, num_single_layers=single_layers, heads=2, head_dim=16, channels=16, seed=seed
    )
    return FluxLoop(model, image_tokens=16, text_tokens=4)


@pytest.fixture(scope="module")
def profile():
    torch.set_num_threads(1)
    return difcache.calibrate(
        _loop(), "ertacache", [{"seed": 0}, {"seed": 1}], num_inference_steps=STEPS, threshold=THRESHOLD
    )


@pytest.fixture
def calibrated(profile):
    """A fresh loop with the same (seeded) weights as the calibrated one, and the profile."""
    return _loop(), profile


# ------------------------------------------------------------------------------------------- (a) reuse set
def test_reuse_set_greedy_walk_against_last_computed_step():
    # errors vs the cached step: 1: .05/1.05, 2: .08/1.08 (both < .1, reused, cache still step 0), 3: .5/1.5 computed,
    # 4: .02/1.52 reused, 5: 1.5/3 computed, 6: last step, forced.
    reuse, errors = select_reuse_steps([_scalar_sample([1.0, 1.05, 1.08, 1.5, 1.52, 3.0, 3.0])], threshold=0.1)
    assert reuse == (False, True, True, False, True, False, False)
    assert errors[0] is None and errors[6] is None
    assert errors[2] == pytest.approx(0.08 / 1.08) and errors[3] == pytest.approx(0.5 / 1.5)


def test_reuse_set_merges_samples_before_deciding_and_forces_ends():
    a = _scalar_sample([1.0, 1.05, 1.06, 1.07])
    b = _scalar_sample([1.0, 1.15, 1.25, 1.3])
    # mean: step 1 errors .0476, .1304 -> .089 reused; step 2 vs step 0: .0566, .2 -> .128 computed.
    # max: step 1 .1304 computed; step 2 vs step 1: .0094, .08 -> .08 reused. The last step is always computed.
    assert select_reuse_steps([a, b], 0.1, merge="mean")[0] == (False, True, False, False)
    assert select_reuse_steps([a, b], 0.1, merge="max")[0] == (False, False, True, False)
    assert select_reuse_steps([a, a], 10.0, warmup=2, cooldown=1)[0] == (False, False, True, False)
    assert select_reuse_steps([a], 10.0, warmup=1, cooldown=3)[0] == (False, False, False, False)


def test_reuse_set_is_a_table_and_refuses_other_step_counts():
    schedule = TableSchedule.from_skips((False, True, False), Action.REUSE, ("ERTACache reuse set", "recalibrate"))
    assert [schedule.decide(s, 3, 0) for s in range(3)] == [Action.COMPUTE, Action.REUSE, Action.COMPUTE]
    with pytest.raises(difcache.DifcacheError, match="made for 3 steps.*num_inference_steps=3 or recalibrate"):
        schedule.decide(0, 4, 0)


# ------------------------------------------------------------------------------------------- (c) rectification
def test_closed_form_coefficients_recover_a_known_linear_error():
    gen = torch.Generator().manual_seed(0)
    cached = torch.randn(4096, generator=gen, dtype=torch.float64) * 2 + 0.3
    true = cached - (0.3 * cached - 0.2)  # ε = cached − true = 0.3·cached − 0.2
    a, b = fit_rectification(cached, true)
    assert a == pytest.approx(0.3, abs=1e-12) and b == pytest.approx(-0.2, abs=1e-12)
    k, big_b = to_paper(a, b)  # ε ≈ σ(K·f + B) linearised: K = 4a, B = 4(b − 1/2)
    assert (k, big_b) == pytest.approx((1.2, -2.8)) and from_paper(k, big_b) == pytest.approx((a, b))
    forecaster = RectifiedForecaster(((None,), ((a, b),)))
    (rectified,) = combine([[cached.float()]], forecaster.combination(1, (0,), 0))
    assert torch.allclose(rectified.double(), true, atol=1e-5)
    # With noise the fit is the least-squares one: unbiased on a large sample.
    noisy = true + 0.1 * torch.randn(4096, generator=gen, dtype=torch.float64)
    assert fit_rectification(cached, noisy) == pytest.approx((0.3, -0.2), abs=0.02)
    assert fit_rectification(torch.ones(8), torch.zeros(8)) == (0.0, 1.0)  # constant regressor: mean error


def test_fit_pools_samples_per_step_and_leaf_and_reduces_in_sample_error():
    gen = torch.Generator().manual_seed(1)
    samples = []
    for _ in range(3):
        r0 = torch.randn(256, generator=gen)
        r1 = 0.5 * r0 + 0.05 * torch.randn(256, generator=gen)  # step 1 reuses r0; the true residual shrank
        samples.append([[r0, r0[:8]], [r1, None], [torch.randn(256, generator=gen), r0[:8]]])
    coefficients = fit_coefficients(samples, (False, True, False))
    assert coefficients[0] is None and coefficients[2] is None
    (a, b), text = coefficients[1]
    assert text is None  # a leaf missing at the reused step is not fitted (plain reuse)
    assert a == pytest.approx(0.5, abs=0.02) and abs(b) < 0.02
    forecaster = RectifiedForecaster.from_lists(coefficients)
    for r0_r1 in samples:
        (rectified, _) = combine([[r0_r1[0][0], r0_r1[0][1]]], forecaster.combination(1, (0,), 0))
        assert (rectified - r0_r1[1][0]).norm() < 0.2 * (r0_r1[0][0] - r0_r1[1][0]).norm()


def test_phi_is_one_minus_error_over_step_change_clipped():
    sample = _scalar_sample([1.0, 2.0, 2.0])  # step 1 reuses r0 = 1: error |1 − 2| = 1, step change |2 − 1| = 1
    reuse = (False, True, False)
    assert step_factors([sample], reuse, [None, [None], None]) == [1.0, 0.0, 1.0]  # plain reuse: φ = 0
    assert step_factors([sample], reuse, [None, [(-1.0, 0.0)], None])[1] == 1.0  # exact: (1 + 1)·1 = 2
    assert step_factors([sample], reuse, [None, [(-0.5, 0.0)], None])[1] == pytest.approx(0.5)  # 1.5: half error
    assert step_factors([sample], reuse, [None, [(2.0, 0.0)], None])[1] == 0.0  # worse than reuse: clipped


# ------------------------------------------------------------------------------------------- (b) timestep adjustment
def _fake_runtime(scheduler):
    model = torch.nn.Identity()
    return SimpleNamespace(scheduler=scheduler, model=model, tracker=StepTracker.attach(model, scheduler))


def _euler(scheduler, steps, velocity, x, return_dict=True):
    scheduler.set_timesteps(steps)
    trajectory = [x]
    for t in scheduler.timesteps:
        out = scheduler.step(velocity(x), t, x, return_dict=return_dict)
        x = out.prev_sample if return_dict else out[0]
        trajectory.append(x)
    return trajectory


@pytest.mark.parametrize("return_dict", [True, False])
def test_adjusted_steps_spend_the_whole_trajectory_and_end_at_zero(return_dict):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # non-uniform sigmas
    runtime = _fake_runtime(scheduler)
    reuse = (False, True, True, False, True, False, False, False)
    phi = (1.0, 0.5, 0.25, 1.0, 0.0, 1.0, 1.0, 1.0)
    remove = TimestepAdjustment(reuse, phi).install(runtime)
    scheduler.set_timesteps(8)
    sigmas = scheduler.sigmas.tolist()
    # velocity 1 with x_0 = σ_0: x follows σ̂, the position of the adjusted sampler
    xs = [float(x) for x in _euler(scheduler, 8, torch.ones_like, torch.tensor([sigmas[0]]), return_dict)]
    deltas = [b - a for a, b in zip(xs, xs[1:], strict=False)]
    assert xs[-1] == pytest.approx(0.0, abs=1e-6) and sum(deltas) == pytest.approx(-sigmas[0], abs=1e-6)
    assert deltas[0] == pytest.approx(sigmas[1] - sigmas[0])  # nothing reused yet: the default step
    assert deltas[1] == pytest.approx(0.5 * (sigmas[2] - sigmas[1]), rel=1e-5)  # φ·Δσ, budget still 1
    s = xs[3] / sigmas[3]  # remaining budget: what is left over what the default schedule has left
    assert s > 1 and deltas[3] == pytest.approx(s * (sigmas[4] - sigmas[3]), rel=1e-5)
    assert deltas[4] == pytest.approx(0.0, abs=1e-7)  # φ = 0: the step is spent by the others
    remove()
    runtime.tracker.detach()
    assert not any(name in vars(scheduler) for name in ("step", "set_timesteps", "set_begin_index"))


@pytest.mark.parametrize("phi_on_reuse", [None, 1.0])
def test_without_reuse_or_with_unit_phi_the_scheduler_is_unchanged(phi_on_reuse):
    gen = torch.Generator().manual_seed(0)
    velocities = [torch.randn(2, 5, generator=gen) for _ in range(6)]
    x0 = torch.randn(2, 5, generator=gen)

    def velocity():
        it = iter(velocities)
        return lambda x: next(it)

    reference = _euler(FlowMatchEulerDiscreteScheduler(shift=3.0), 6, velocity(), x0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    runtime = _fake_runtime(scheduler)
    reuse = (False,) * 6 if phi_on_reuse is None else (False, True, True, False, True, False)
    TimestepAdjustment(reuse, (phi_on_reuse or 0.3,) * 6).install(runtime)
    adjusted = _euler(scheduler, 6, velocity(), x0)
    assert all(torch.equal(a, b) for a, b in zip(adjusted, reference, strict=True))


def test_step_wrapper_under_a_foreign_wrapper_becomes_a_pass_through():
    scheduler = FlowMatchEulerDiscreteScheduler()
    runtime = _fake_runtime(scheduler)
    remove = TimestepAdjustment((False, True, False, False), (1.0, 0.0, 1.0, 1.0)).install(runtime)
    ours = scheduler.step
    calls = []

    def foreign(*args, **kwargs):
        calls.append(1)
        return ours(*args, **kwargs)

    scheduler.step = foreign  # someone else wraps on top of ours
    remove()  # ours is not on top: it must not clobber the foreign wrapper
    assert vars(scheduler)["step"] is foreign
    x0 = torch.ones(1, 3)
    out = _euler(scheduler, 4, lambda x: torch.ones_like(x), x0)
    plain = _euler(FlowMatchEulerDiscreteScheduler(), 4, lambda x: torch.ones_like(x), x0)
    assert len(calls) == 4 and all(torch.equal(a, b) for a, b in zip(out, plain, strict=True))
    runtime.tracker.detach()


# ------------------------------------------------------------------------------------------- calibration + apply
def test_calibration_profile_holds_reuse_set_coefficients_and_phi(profile):
    data = profile.data
    reuse = data["reuse_steps"]
    assert profile.method == "ertacache" and profile.num_steps == STEPS and data["samples"] == 2
    assert 0 < len(reuse) < STEPS - 2 and 0 not in reuse and STEPS - 1 not in reuse
    for step in range(STEPS):
        assert (data["K"][step] is None) == (step not in reuse) == (data["B"][step] is None)
        assert 0.0 <= data["phi"][step] <= 1.0 and 0.0 <= data["phi_reuse"][step] <= 1.0
        if step not in reuse:
            assert data["phi"][step] == data["phi_reuse"][step] == 1.0
            assert data["rel_l1"][step] is None or data["rel_l1"][step] >= THRESHOLD
        else:
            assert data["rel_l1"][step] < THRESHOLD and len(data["K"][step]) == 2  # image and text streams


def test_ertacache_skips_the_stack_stays_close_and_removes_bit_identically(calibrated):
    loop, profile = calibrated
    reference = loop(num_inference_steps=STEPS, seed=5)
    reused = len(profile.data["reuse_steps"])
    handle = difcache.apply_cache(loop, "ertacache", profile=profile, adjust_timesteps=True)
    cached = loop(num_inference_steps=STEPS, seed=5)
    assert torch.equal(loop(num_inference_steps=STEPS, seed=5), cached)  # per-run state is reset
    totals = handle.stats().totals()
    assert totals["compute"] == 2 * (STEPS - reused) and totals["reuse"] == 2 * reused
    error = float((cached - reference).norm() / reference.norm())
    assert 0 < error < 0.1
    handle.remove()
    assert not any(name in vars(loop.scheduler) for name in ("step", "set_timesteps", "set_begin_index"))
    assert torch.equal(loop(num_inference_steps=STEPS, seed=5), reference)


def test_each_part_changes_the_output(calibrated):
    loop, profile = calibrated
    outputs = {}
    for name, kw in {
        "reuse": dict(rectify=False),
        "rectify": {},  # the default since timestep adjustment became opt-in
        "full": dict(adjust_timesteps=True),
        "model_time": dict(adjust_timesteps=True, adjust_model_time=True),
    }.items():
        with difcache.apply_cache(loop, "ertacache", profile=profile, **kw):
            outputs[name] = loop(num_inference_steps=STEPS, seed=3)
    names = list(outputs)
    assert all(not torch.equal(outputs[a], outputs[b]) for a in names for b in names if a < b)


@pytest.mark.parametrize("attach_first", ["cache", "tracker"])
@pytest.mark.parametrize("remove_first", ["cache", "tracker"])
def test_step_wrappers_compose_with_the_step_tracker_in_any_order(calibrated, attach_first, remove_first):
    loop, profile = calibrated
    scheduler = loop.scheduler
    reference = loop(num_inference_steps=STEPS, seed=2)
    with difcache.apply_cache(loop, "ertacache", profile=profile, adjust_timesteps=True):
        adjusted = loop(num_inference_steps=STEPS, seed=2)
    # Another difcache feature holding the same denoiser's step tracker (sparse attention, say).
    if attach_first == "tracker":
        other = StepTracker.attach(loop.transformer, scheduler)
        handle = difcache.apply_cache(loop, "ertacache", profile=profile, adjust_timesteps=True)
    else:
        handle = difcache.apply_cache(loop, "ertacache", profile=profile, adjust_timesteps=True)
        other = StepTracker.attach(loop.transformer, scheduler)
    assert torch.equal(loop(num_inference_steps=STEPS, seed=2), adjusted)
    if remove_first == "cache":
        handle.remove()
        assert "step" in vars(scheduler)  # the tracker's own wrapper, still counting steps
        assert torch.equal(loop(num_inference_steps=STEPS, seed=2), reference)
        assert other.step == STEPS
        other.detach()
    else:
        other.detach()
        assert torch.equal(loop(num_inference_steps=STEPS, seed=2), adjusted)
        handle.remove()
    assert not any(name in vars(scheduler) for name in ("step", "set_timesteps", "set_begin_index"))
    assert torch.equal(loop(num_inference_steps=STEPS, seed=2), reference)


def test_a_threshold_that_reuses_nothing_warns_at_calibration():
    with pytest.warns(UserWarning, match="reuses nothing; raise threshold"):
        profile = difcache.calibrate(_loop(), "ertacache", [{"seed": 0}], num_inference_steps=8, threshold=1e-6)
    assert profile.data["reuse_steps"] == []


def test_profile_errors_name_the_problem(calibrated, tmp_path):
    loop, profile = calibrated
    with pytest.raises(difcache.DifcacheError, match="ertacache needs a profile: profile = difcache.calibrate"):
        difcache.apply_cache(loop, "ertacache")
    with (
        difcache.apply_cache(loop, "ertacache", profile=profile),
        pytest.raises(difcache.DifcacheError, match=f"made for {STEPS} steps.*num_inference_steps={STEPS}"),
    ):
        loop(num_inference_steps=STEPS + 2)
    assert "step" not in vars(loop.scheduler)
    with pytest.raises(difcache.DifcacheError, match="different layout"):
        difcache.apply_cache(_loop(single_layers=3), "ertacache", profile=profile)
    teacache = dataclasses.replace(profile, method="teacache")
    with pytest.raises(difcache.DifcacheError, match="configures 'teacache'"):
        difcache.apply_cache(loop, "ertacache", profile=teacache)
    for field, value, message in [
        ("phi", [1.0] * (STEPS - 1), f"data.phi. must be a list of {STEPS}"),
        ("reuse_steps", [0, 3], "data.reuse_steps"),
        ("K", None, "data.K"),
        ("B", [None] * STEPS, "data.K.*data.B"),
    ]:
        broken = dataclasses.replace(profile, data={**profile.data, field: value})
        with pytest.raises(difcache.DifcacheError, match=message):
            difcache.apply_cache(loop, "ertacache", profile=broken)
    assert getattr(loop.transformer, "_difcache_cache", None) is None
    # A saved profile gives the same run as the object.
    path = tmp_path / "ertacache.json"
    profile.save(path)
    with difcache.apply_cache(loop, "ertacache", profile=profile):
        expected = loop(num_inference_steps=STEPS, seed=4)
    with difcache.apply_cache(loop, "ertacache", profile=str(path)):
        assert torch.equal(loop(num_inference_steps=STEPS, seed=4), expected)


def test_timestep_adjustment_needs_a_deterministic_flow_matching_scheduler(calibrated):
    loop, profile = calibrated
    reference = loop(num_inference_steps=STEPS, seed=1)
    original = loop.scheduler
    try:
        for scheduler, message in [
            (DDIMScheduler(), "DDIMScheduler is not a FlowMatchEulerDiscreteScheduler.*adjust_timesteps=False"),
            (FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), "stochastic_sampling"),
        ]:
            loop.scheduler = scheduler
            with pytest.raises(difcache.DifcacheError, match=message):
                difcache.apply_cache(loop, "ertacache", profile=profile, adjust_timesteps=True)
            assert getattr(loop.transformer, "_difcache_cache", None) is None and "step" not in vars(scheduler)
        loop.scheduler = DDIMScheduler()
        difcache.apply_cache(loop, "ertacache", profile=profile).remove()  # the default does not adjust
    finally:
        loop.scheduler = original
    with pytest.raises(difcache.DifcacheError, match="bare denoiser.*adjust_timesteps=False"):
        difcache.apply_cache(loop.transformer, "ertacache", profile=profile, adjust_timesteps=True)
    with difcache.apply_cache(loop.transformer, "ertacache", profile=profile) as handle:
        loop(num_inference_steps=STEPS, seed=1)
        assert handle.stats().totals()["reuse"] == len(profile.data["reuse_steps"])
    assert torch.equal(loop(num_inference_steps=STEPS, seed=1), reference)


def test_config_validation_and_one_measured_default():
    # 0.1 for every family (measured on the bundled models); the paper's FLUX 0.6 reused 44-45 of 50 steps there
    assert {ERTACacheConfig.for_family(f).threshold for f in ("flux", "wan", "cogvideox", "sd3")} == {0.1}
    with pytest.raises(ValueError, match=r"threshold must be > 0.0"):
        ERTACacheConfig(threshold=0.0)
    with pytest.raises(ValueError, match=r"merge must be one of \['mean', 'max'\]"):
        ERTACacheConfig(merge="median")
    with pytest.raises(ValueError, match=r"cooldown must be in \[1, 1000\]"):
        ERTACacheConfig(cooldown=0)
    with pytest.raises(TypeError, match="rectify must be True or False"):
        ERTACacheConfig(rectify=1)
    assert "ertacache" in difcache.list_methods()


# ------------------------------------------------------------------------------------------- real FluxPipeline
def _flux_pipeline():
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4, layers_per_block=1,
        norm_num_groups=4, sample_size=32,
    ).eval()  # fmt: skip
    transformer = flux_transformer(num_layers=1, num_single_layers=2, heads=2, head_dim=16, channels=16)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, transformer=transformer,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flux_kwargs(seed):
    """Precomputed (random) prompt embeddings and true CFG: two denoiser calls per step, "cond" and "uncond"."""
    g = torch.Generator().manual_seed(seed)
    embeds = {name: torch.randn(1, 4, 32, generator=g) for name in ("prompt_embeds", "negative_prompt_embeds")}
    pooled = {n: torch.randn(1, 32, generator=g) for n in ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")}
    return dict(
        **embeds, **pooled, true_cfg_scale=2.0, height=16, width=16, output_type="latent",
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip


def test_flux_pipeline_with_true_cfg():
    pipe = _flux_pipeline()
    profile = difcache.calibrate(pipe, "ertacache", [_flux_kwargs(0), _flux_kwargs(1)], STEPS, threshold=THRESHOLD)
    assert profile.data["samples"] == 4  # two calls x two CFG branches
    reused = len(profile.data["reuse_steps"])
    assert reused > 0
    reference = pipe(**_flux_kwargs(5), num_inference_steps=STEPS).images
    with difcache.apply_cache(pipe, "ertacache", profile=profile, adjust_timesteps=True) as handle:
        cached = pipe(**_flux_kwargs(5), num_inference_steps=STEPS).images
        assert torch.equal(pipe(**_flux_kwargs(5), num_inference_steps=STEPS).images, cached)
        stats = handle.stats()
    assert stats.calls == 2 * 2 * STEPS and stats.totals()["reuse"] == 2 * 2 * reused
    assert 0 < float((cached - reference).norm() / reference.norm()) < 0.15
    assert "step" not in vars(pipe.scheduler)
    assert torch.equal(pipe(**_flux_kwargs(5), num_inference_steps=STEPS).images, reference)
