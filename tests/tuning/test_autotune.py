"""``difcache.autotune`` end to end on tiny pipelines of the real classes: the profile reaches its budget, runs
through ``apply_cache`` (batched and sequential CFG, transformers and UNets), survives a save/load, and is refused
for another model, step count or scheduler with the fix in the message."""

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

import difcache
from difcache.errors import DifcacheError
from difcache.models.tiny import FAMILIES, output_of, tiny_call_kwargs, tiny_pipeline
from difcache.tuning.autotune import TOLERANCE, proxy_tracking, shortlist

STEPS = 8


def _calls(family, n=2, **kw):
    return [tiny_call_kwargs(family, num_inference_steps=STEPS, seed=100 + i, **kw) for i in range(n)]


def _tune(pipe, family, speedup=2.0, **options):
    options.setdefault("seconds", 0)
    return difcache.autotune(pipe, speedup, _calls(family), STEPS, progress=False, **options)


@pytest.fixture(scope="module")
def dit():
    pipe = tiny_pipeline("dit")
    pipe.set_progress_bar_config(disable=True)
    return pipe, _tune(pipe, "dit")


def _run(pipe, family, seed=7, steps=STEPS):
    return output_of(pipe(**tiny_call_kwargs(family, num_inference_steps=steps, seed=seed)))


def test_profile_reaches_the_budget_and_runs(dit):
    pipe, profile = dit
    data = profile.data
    assert profile.method == "autotune" and profile.num_steps == STEPS
    assert profile.scheduler == type(pipe.scheduler).__name__
    assert data["ideal_speedup"] >= 2.0
    assert data["calibration_psnr"] is not None and data["candidates"]
    assert all(len(c["step_error"]) == STEPS for c in data["candidates"])
    reference = _run(pipe, "dit")
    handle = difcache.apply_cache(pipe, profile=profile)
    try:
        cached = _run(pipe, "dit")
        stats = handle.stats()
    finally:
        handle.remove()
    # the profile's promise is what the engine counts (denoiser FLOPs only: the tiny pipeline's VAE is no part of it)
    assert stats.ideal_speedup == pytest.approx(data["ideal_speedup"], rel=1e-6)
    assert not torch.equal(cached, reference) and torch.isfinite(torch.as_tensor(cached)).all()
    assert torch.equal(torch.as_tensor(_run(pipe, "dit")), torch.as_tensor(reference))  # removal is exact


def test_profile_round_trips_through_json(dit, tmp_path):
    pipe, profile = dit
    path = tmp_path / "dit.json"
    profile.save(path)
    assert json.loads(path.read_text())["method"] == "autotune"
    outs = []
    for source in (profile, str(path)):
        handle = difcache.apply_cache(pipe, profile=source)
        try:
            outs.append(torch.as_tensor(_run(pipe, "dit")))
        finally:
            handle.remove()
    assert torch.equal(outs[0], outs[1])


def test_profile_is_refused_for_another_step_count(dit):
    pipe, profile = dit
    handle = difcache.apply_cache(pipe, profile=profile)
    try:
        with pytest.raises(DifcacheError, match=rf"made for {STEPS} steps.*autotune"):
            _run(pipe, "dit", steps=STEPS + 2)
    finally:
        handle.remove()


def test_profile_is_refused_for_another_scheduler_at_apply_and_after_a_swap(dit):
    pipe, profile = dit
    original = pipe.scheduler
    other = (DPMSolverMultistepScheduler if isinstance(original, DDIMScheduler) else DDIMScheduler).from_config(
        original.config
    )
    message = rf"made with a {type(original).__name__}.*runs a {type(other).__name__}.*re-run difcache.autotune"
    pipe.scheduler = other
    try:
        with pytest.raises(DifcacheError, match=message):
            difcache.apply_cache(pipe, profile=profile)
        assert difcache.remove_cache(pipe) is False  # nothing left half-installed
        pipe.scheduler = original
        handle = difcache.apply_cache(pipe, profile=profile)
        pipe.scheduler = other  # swapped after apply: refused at the start of the next run
        with pytest.raises(DifcacheError, match=message):
            _run(pipe, "dit")
        handle.remove()
    finally:
        pipe.scheduler = original


def test_profile_is_refused_for_another_model(dit):
    _, profile = dit
    other = tiny_pipeline("pixart")
    with pytest.raises(DifcacheError, match="different layout.*autotune"):
        difcache.apply_cache(other, profile=profile)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("scope", "everything", "scope"),
        ("units", [], "one entry per cached unit"),
        ("ranges", [], "non-empty list"),
    ],
)
def test_malformed_profile_fields_are_named(dit, field, value, message):
    _, profile = dit
    data = {**profile.data, field: value}
    if field == "ranges":
        data["scope"] = "ranges"
    bad = difcache.Profile(**{**vars(profile), "data": data})
    with pytest.raises(DifcacheError, match=message):
        difcache.apply_cache(dit[0], profile=bad)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"speedup": 1.0}, "speedup must be a number > 1"),
        ({"speedup": float("nan")}, "speedup must be a number > 1"),
        ({"families": ["cubic"]}, "families must be among"),
        ({"seconds": -1}, "seconds must be a number >= 0"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(dit, kwargs, message):
    pipe, _ = dit
    args = {"speedup": 2.0, **kwargs}
    with pytest.raises(DifcacheError, match=message):
        difcache.autotune(pipe, args.pop("speedup"), _calls("dit"), STEPS, progress=False, **args)


def test_a_bare_denoiser_or_a_cached_model_is_refused(dit):
    pipe, profile = dit
    with pytest.raises(DifcacheError, match="needs the pipeline"):
        difcache.autotune(pipe.transformer, 2.0, _calls("dit"), STEPS, progress=False)
    handle = difcache.apply_cache(pipe, profile=profile)
    try:
        with pytest.raises(DifcacheError, match="uncached"):
            difcache.autotune(pipe, 2.0, _calls("dit"), STEPS, progress=False)
    finally:
        handle.remove()


def test_an_unreachable_budget_says_so():
    pipe = tiny_pipeline("dit")
    with pytest.raises(DifcacheError, match="No schedule of 3 steps reaches 50"):
        difcache.autotune(pipe, 50.0, _calls("dit")[:1], 3, progress=False, seconds=0)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "dit"])  # dit: the fixture's tests above
def test_every_family_is_tuned_and_runs(family):
    """Images and video, batched CFG (PixArt, SD3, SD1.5, SDXL) and sequential (Wan, ...), transformers and UNets."""
    pipe = tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    # tiny models: embeddings and heads are much of the work, so a small budget; a few seconds run the shortlist
    profile = _tune(pipe, family, speedup=1.2, families=["taylor"], seconds=3)
    scopes = {c["scope"] for c in profile.data["candidates"]}
    if family == "sd15":
        assert "skip_branch" in scopes  # DeepCache's scope, its branch and full steps searched
    handle = difcache.apply_cache(pipe, profile=profile)
    try:
        out = torch.as_tensor(_run(pipe, family))
        stats = handle.stats()
    finally:
        handle.remove()
    assert torch.isfinite(out).all()
    assert stats.ideal_speedup > 1.1


def test_shortlist_keeps_one_per_comparable_group_and_family_within_tolerance():
    from difcache.tuning.autotune import Candidate, UnitPlan

    def cand(name, scope, family, proxy, ideal):
        return Candidate(name, scope, [UnitPlan((0,), family)], [], [], proxy=proxy, ideal=ideal)

    found = [
        cand("a", "ranges", "taylor", 2.0, 3.0),
        cand("b", "ranges", "taylor", 1.0, 3.0),
        cand("c", "modules", "taylor", 5.0, 3.05),
        cand("d", "ranges", "fit", 0.5, 3.0 * (1 + 2 * TOLERANCE)),  # overshoots: only if nothing is close
        cand("e", "ranges", "reuse", 9.0, 3.0),
    ]
    names = [c.name for c in shortlist(found, 3.0)]
    # taylor first (PRIORITY; its groups by name), the lower proxy within a group, the overshoot left out
    assert names == ["c", "b", "e"]


def test_figure_is_written(dit, tmp_path):
    pytest.importorskip("matplotlib")
    from difcache.tuning.figure import plot_profile

    path = plot_profile(dit[1], tmp_path / "profile.png")
    assert path.stat().st_size > 10_000


def test_fitted_forecast_falls_back_to_taylor_when_history_differs():
    from difcache.forecasters.fitted import FittedForecaster
    from difcache.forecasters.taylor import taylor_weights

    forecaster = FittedForecaster(({5: ((4, 2), (1.7, -0.7))},), history=2)
    assert forecaster.combination(5, (4, 2), 0).coefficients == (1.7, -0.7)
    assert forecaster.combination(5, (4, 1), 0).coefficients == taylor_weights(1, 0, 5, (4, 1))
    assert math.isclose(sum(forecaster.combination(6, (4, 2), 0).coefficients), 1.0)


def test_proxy_tracking_is_spearman_per_scope_with_lower_proxy_better():
    def row(scope, proxy, psnr):
        return {"scope": scope, "proxy": proxy, "calibration_psnr": psnr}

    table = [row("ranges", p, 40 - p) for p in (1.0, 2.0, 3.0)]  # lower proxy, higher PSNR: perfect
    table += [row("modules", p, 30 + p) for p in (1.0, 2.0, 3.0, 4.0)]  # exactly backwards
    table += [row("skip_branch", 1.0, 30.0), row("skip_branch", 2.0, 29.0)]  # too few to say
    tracking = proxy_tracking(table)
    assert tracking == pytest.approx({"ranges": 1.0, "modules": -1.0})


def test_scopes_restrict_the_search_and_are_checked():
    from difcache.cli import AUTOTUNE_SCOPES
    from difcache.tuning.autotune import SCOPES

    assert AUTOTUNE_SCOPES == SCOPES
    pipe = tiny_pipeline("dit")
    profile = _tune(pipe, "dit", speedup=1.5, families=["taylor"], scopes=("ranges",), seconds=0)
    assert {c["scope"] for c in profile.data["candidates"]} == {"ranges"}
    with pytest.raises(DifcacheError, match="scopes must be among"):
        _tune(pipe, "dit", speedup=1.5, scopes=("stack",))
    with pytest.raises(DifcacheError, match="None of the scopes \\['skip_branch'\\] applies to DiTTransformer2DModel"):
        _tune(pipe, "dit", speedup=1.5, scopes=("skip_branch",))
