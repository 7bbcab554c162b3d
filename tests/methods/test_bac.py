"""BAC: the DP scheduler against brute force, the bubbling union, volatility, profiles, and calibrated runs."""

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

import difcache
from difcache.core import Action
from difcache.engine.calibration import subsample
from difcache.methods.bac import BACConfig
from difcache.models.flow_loop import FluxLoop, flux_transformer
from difcache.models.tiny import output_of, tiny_call_kwargs, tiny_pipeline
from difcache.policies.bac import (
    bubbling_union,
    most_volatile,
    optimal_update_steps,
    schedule_score,
    segment_costs,
    similarity_matrix,
    volatility,
)
from difcache.policies.table import TableSchedule
from difcache.profile import Profile

STEPS = 12


def _loop(single_layers=2):
    model = flux_transformer(num_layers=1, num_single_layers=single_layers, heads=2, head_dim=16, channels=16)
    return FluxLoop(model, image_tokens=16, text_tokens=4)


def _brute_force(matrix, budget, minimize):
    """Best score over every update set of size ``budget`` that contains step 0."""
    scores = [schedule_score(matrix, (0, *rest)) for rest in itertools.combinations(range(1, len(matrix)), budget - 1)]
    return min(scores) if minimize else max(scores)


# ------------------------------------------------------------------------------------------- scheduler (ACS)
@pytest.mark.parametrize("steps", [1, 2, 5, 8])
@pytest.mark.parametrize("minimize", [False, True])
def test_dp_is_optimal_against_brute_force(steps, minimize):
    rng = np.random.default_rng(steps)
    for budget in range(1, steps + 1):
        for _ in range(4):
            matrix = rng.normal(size=(steps, steps))
            chosen = optimal_update_steps(matrix, budget, minimize)
            assert len(chosen) == budget and chosen[0] == 0 and list(chosen) == sorted(set(chosen))
            assert schedule_score(matrix, chosen) == pytest.approx(_brute_force(matrix, budget, minimize), abs=1e-9)


def test_dp_keeps_step_zero_even_when_its_features_are_worst():
    # Step 0 resembles nothing, step 1 resembles everything: a free choice of M=2 starts would be {1, k};
    # nothing is cached before step 0, so the DP must still start there.
    matrix = np.full((6, 6), 0.9)
    matrix[0, :] = -1.0
    matrix[0, 0] = 1.0
    assert optimal_update_steps(matrix, 1) == (0,)
    assert optimal_update_steps(matrix, 2) == (0, 1)


def test_dp_finds_regime_changes_and_minimises_distances():
    # Two regimes, steps 0-3 and 4-7: one update at each regime's start is optimal for M = 2.
    regime = np.repeat([0, 1], 4)
    cosine = np.where(regime[:, None] == regime[None, :], 0.99, 0.1)
    assert optimal_update_steps(cosine, 2) == (0, 4)
    assert optimal_update_steps(1.0 - cosine, 2, minimize=True) == (0, 4)
    # cost[a, b] sums row a from column a to b
    assert segment_costs(cosine)[4, 6] == pytest.approx(3 * 0.99)
    assert optimal_update_steps(cosine, 8) == tuple(range(8))


@pytest.mark.parametrize("budget", [0, 5, True, 1.5])
def test_dp_rejects_budgets_outside_one_to_steps(budget):
    with pytest.raises(difcache.DifcacheError, match=r"budget must be an int in \[1, 4\]"):
        optimal_update_steps(np.eye(4), budget)


def test_dp_rejects_non_square_or_non_finite_matrices():
    with pytest.raises(difcache.DifcacheError, match="square"):
        optimal_update_steps(np.ones((3, 4)), 2)
    with pytest.raises(difcache.DifcacheError, match="non-finite"):
        optimal_update_steps(np.array([[1.0, np.nan], [0.0, 1.0]]), 1)


# ------------------------------------------------------------------------------------------- similarity, volatility
def test_similarity_metrics_by_hand():
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    cosine = similarity_matrix(x, "cosine")
    assert cosine[0, 1] == pytest.approx(1.0) and cosine[0, 2] == pytest.approx(-1.0)
    assert cosine[0, 3] == 0.0 and cosine[0, 4] == pytest.approx(0.0)  # zero row: 0, orthogonal: 0
    l1, mse = similarity_matrix(x, "l1"), similarity_matrix(x, "mse")
    assert l1[1, 2] == pytest.approx(1.5) and mse[1, 2] == pytest.approx(4.5)  # |2 − (−1)| / 2 entries, 9 / 2
    assert l1[0, 4] == pytest.approx(2.0) and mse[0, 4] == pytest.approx(5.0)
    for m in (cosine, l1, mse):
        assert torch.allclose(m, m.T) and m.dtype == torch.float64
    with pytest.raises(difcache.DifcacheError, match="Unknown similarity metric 'l2'"):
        similarity_matrix(x, "l2")


def test_volatility_is_mean_pairwise_mean_absolute_difference_and_ranks_units():
    steady = torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 3.0]])
    assert volatility(steady) == pytest.approx((1 + 3 + 2) / 3)
    assert volatility(torch.ones(5, 4)) == 0.0 and volatility(torch.ones(1, 4)) == 0.0
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1, 64, generator=gen)
    drifts = [0.01, 0.5, 0.1, 2.0]
    units = [base + d * torch.randn(10, 64, generator=gen) for d in drifts]
    scores = [volatility(u) for u in units]
    assert most_volatile(scores, 2) == (3, 1)
    assert most_volatile(scores, 10) == (3, 1, 2, 0) and most_volatile(scores, 0) == ()
    assert most_volatile([1.0, 2.0, 2.0], 2) == (1, 2)  # ties: the earlier unit first


# ------------------------------------------------------------------------------------------- bubbling union
KINDS = ["attn", "cross_attn", "ffn", "attn", "ffn", "block"]
BLOCKS = [0, 0, 0, 1, 1, 2]
STEP_SETS = [(0, 5), (0, 6), (0, 2), (0, 3), (0, 4), (0, 7)]


def test_bubbling_union_takes_the_steps_of_ffns_at_or_after_the_units_block():
    merged = bubbling_union(STEP_SETS, KINDS, BLOCKS, selected=[1, 3])
    # cross-attn of block 0 takes the FFNs of blocks 0 and 1 and the whole block 2 (it contains an MLP)
    assert merged[1] == (0, 2, 4, 6, 7)
    # attn of block 1 takes block 1's FFN and block 2, not block 0's FFN (upstream of it)
    assert merged[3] == (0, 3, 4, 7)
    assert [merged[i] for i in (0, 2, 4, 5)] == [STEP_SETS[i] for i in (0, 2, 4, 5)]  # not selected: unchanged


def test_bubbling_union_on_ffns_and_edge_cases():
    merged = bubbling_union(STEP_SETS, KINDS, BLOCKS, selected=[4, 2])
    assert merged[4] == (0, 4, 7)  # an FFN unit selected: it takes the later FFN-like units' steps
    assert merged[2] == (0, 2, 4, 7)  # block 0's FFN takes the *own* steps of later FFNs, whatever the order
    assert bubbling_union(STEP_SETS, KINDS, BLOCKS, selected=[]) == STEP_SETS
    with pytest.raises(difcache.DifcacheError, match="out of range"):
        bubbling_union(STEP_SETS, KINDS, BLOCKS, selected=[6])
    with pytest.raises(difcache.DifcacheError, match="one entry per unit"):
        bubbling_union(STEP_SETS, KINDS[:-1], BLOCKS, selected=[0])


# ------------------------------------------------------------------------------------------- config and policy
@pytest.mark.parametrize(
    ("field", "value", "error", "message"),
    [
        ("budget", 0, ValueError, r"budget must be an int >= 1"),
        ("budget", 0.0, ValueError, r"budget as a fraction of the steps must be in \(0, 1\]"),
        ("budget", 1.5, ValueError, r"budget as a fraction of the steps must be in \(0, 1\]"),
        ("budget", True, TypeError, r"budget must be an int >= 1 .* or a float"),
        ("num_bu_units", -1, ValueError, r"num_bu_units must be >= 0"),
        ("metric", "l2", ValueError, r"metric must be one of \['cosine', 'l1', 'mse'\]"),
        ("forecast", "hermite", ValueError, r"forecast must be one of \['reuse', 'taylor'\]"),
        ("force_last", 1, TypeError, r"force_last must be True or False"),
        ("profile", 3, TypeError, r"profile must be a path or a difcache.Profile"),
    ],
)
def test_config_validation_names_field_and_range(field, value, error, message):
    with pytest.raises(error, match=message):
        BACConfig(**{field: value})


def test_config_defaults_budget_and_round_trip():
    config = BACConfig()
    assert (config.budget, config.num_bu_units, config.metric, config.forecast) == (0.2, 3, "cosine", "reuse")
    data = config.to_dict()
    assert data["method"] == "bac" and BACConfig(**{f.name: data[f.name] for f in dataclasses.fields(config)}) == config
    assert config.update_budget(50) == 10 and BACConfig(budget=0.01).update_budget(20) == 1
    assert BACConfig(budget=7).update_budget(7) == 7
    with pytest.raises(difcache.DifcacheError, match=r"budget must be in \[1, 7\] for this 7-step profile"):
        BACConfig(budget=8).update_budget(7)
    assert "bac" in difcache.list_methods()


def test_schedule_is_a_table_and_refuses_other_step_counts():
    policy = TableSchedule((frozenset({0, 2}), frozenset({0, 1, 2})), 3, Action.FORECAST)
    assert [policy.decide(s, 3, 0) for s in range(3)] == [Action.COMPUTE, Action.FORECAST, Action.COMPUTE]
    assert [policy.decide(s, 3, 1) for s in range(3)] == [Action.COMPUTE] * 3
    assert policy.decide(5, None, 0) == Action.COMPUTE  # past a bare module's schedule: compute
    with pytest.raises(difcache.DifcacheError, match="made for 3 steps.*num_inference_steps=3"):
        policy.decide(0, 4, 0)


# ------------------------------------------------------------------------------------------- calibration and profiles
@pytest.fixture(scope="module")
def profile():
    torch.set_num_threads(1)
    return difcache.calibrate(_loop(), "bac", [{"seed": 0}, {"seed": 1}], num_inference_steps=STEPS)


def _steps_of(handle):
    return [sorted(s) for s in handle._runtime.plan.policy.compute]


def test_calibration_stores_matrices_and_volatility_per_unit(profile):
    layout = difcache.apply_cache(_loop(), "fora").layout
    data = profile.data
    assert profile.method == "bac" and profile.num_steps == STEPS and profile.fingerprint == layout.fingerprint
    assert data["units"] == [u.name for u in layout.units] and data["metric"] == "cosine"
    assert data["samples"] == 2  # two calls, one branch each
    assert len(data["similarity"]) == len(data["volatility"]) == len(layout.units)
    for matrix in data["similarity"]:
        m = np.array(matrix)
        assert m.shape == (STEPS, STEPS) and np.allclose(np.diag(m), 1.0, atol=1e-6) and np.allclose(m, m.T)
    assert all(v > 0 for v in data["volatility"])
    assert "profile" not in profile.config


def test_calibrated_numbers_are_the_sample_means_of_the_paper_quantities(profile):
    """Recompute S (cosine) and the volatility from plain forward hooks, pairwise, averaged over the two calls."""
    loop = _loop()
    units = difcache.apply_cache(loop, "fora").layout.units
    difcache.remove_cache(loop)
    records = {i: [] for i in range(len(units))}

    def hook(i):
        def fn(module, args, output):
            leaves = [
                t.reshape(-1).float() for t in (output if isinstance(output, tuple) else (output,)) if t is not None
            ]
            records[i].append(subsample(torch.cat(leaves), BACConfig().max_entries))

        return fn

    handles = [u.module.register_forward_hook(hook(i)) for i, u in enumerate(units)]
    for seed in (0, 1):
        loop(STEPS, seed)
    for h in handles:
        h.remove()
    for i in range(len(units)):
        runs = [records[i][:STEPS], records[i][STEPS:]]
        cos = [[[float(torch.nn.functional.cosine_similarity(r[a], r[t], dim=0)) for t in range(STEPS)]
                for a in range(STEPS)] for r in runs]  # fmt: skip
        expected = (np.array(cos[0]) + np.array(cos[1])) / 2
        assert np.allclose(np.array(profile.data["similarity"][i]), expected, atol=1e-5)
        pairs = [[float((r[a] - r[b]).abs().mean()) for a in range(STEPS) for b in range(a + 1, STEPS)] for r in runs]
        vol = (np.mean(pairs[0]) + np.mean(pairs[1])) / 2
        assert profile.data["volatility"][i] == pytest.approx(vol, rel=1e-5)


def test_profile_round_trip_and_apply_time_budget(profile, tmp_path):
    path = tmp_path / "bac.json"
    profile.save(path)
    loaded = Profile.load(path)
    assert loaded.data["similarity"] == profile.data["similarity"]
    pipe = _loop()
    with difcache.apply_cache(pipe, "bac", profile=str(path), budget=4) as handle:
        from_file = _steps_of(handle)
    with difcache.apply_cache(pipe, "bac", profile=profile, budget=4, num_bu_units=0) as handle:
        plain = _steps_of(handle)
    with difcache.apply_cache(pipe, "bac", profile=profile, budget=4, num_bu_units=0, force_last=False) as handle:
        exact = _steps_of(handle)
    with difcache.apply_cache(pipe, "bac", profile=profile, budget=8, num_bu_units=0, force_last=False) as handle:
        larger = _steps_of(handle)
    assert all(len(s) == 4 and s[0] == 0 for s in exact) and all(len(s) == 8 for s in larger)
    assert plain == [sorted({*s, STEPS - 1}) for s in exact]  # the last step is added on top of the DP's
    assert all(set(p) <= set(f) for p, f in zip(plain, from_file, strict=True))  # the union only adds steps
    assert from_file != plain  # ... and here it does add some
    matrices = profile.data["similarity"]
    assert exact == [list(optimal_update_steps(m, 4)) for m in matrices]


def test_profile_for_another_layout_or_step_count_is_refused(profile):
    with pytest.raises(difcache.DifcacheError, match="fingerprint"):
        difcache.apply_cache(_loop(single_layers=3), "bac", profile=profile)
    pipe = _loop()
    wrong_steps = pytest.raises(difcache.DifcacheError, match=f"made for {STEPS} steps.*num_inference_steps=")
    with difcache.apply_cache(pipe, "bac", profile=profile), wrong_steps:
        pipe(STEPS + 2, 0)
    with pytest.raises(difcache.DifcacheError, match=r"budget must be in \[1, 12\]"):
        difcache.apply_cache(pipe, "bac", profile=profile, budget=STEPS + 1)
    assert not hasattr(pipe.transformer, "_difcache_cache")


def test_missing_profile_or_units_say_what_to_do(profile):
    with pytest.raises(difcache.DifcacheError, match=r"difcache.calibrate\(pipe, 'bac'"):
        difcache.apply_cache(_loop(), "bac")
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    with pytest.raises(difcache.DifcacheError, match="deepcache"):
        difcache.apply_cache(unet, "bac", profile=profile)


def _corrupt(profile, tmp_path, edit):
    raw = json.loads(json.dumps(dataclasses.asdict(profile)))
    edit(raw)
    path = tmp_path / "corrupt.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["data"]["similarity"][2].pop(), r"`data.similarity\[2\]` must be a 12 x 12 matrix"),
        (lambda r: r["data"]["similarity"][0][3].__setitem__(1, "x"), r"`data.similarity\[0\]`.*finite numbers"),
        (lambda r: r["data"]["similarity"].pop(), r"`data.similarity` must be a list of 5 \[12 x 12\] matrices"),
        (lambda r: r["data"]["volatility"].__setitem__(0, -1.0), r"`data.volatility` must be a list of 5"),
        (lambda r: r["data"].pop("metric"), r"`data.metric` is missing"),
        (lambda r: r["data"].__setitem__("metric", "l2"), r"`data.metric` must be one of"),
        (lambda r: r.__setitem__("num_steps", "12"), r"field `num_steps` must be int"),
        (lambda r: r.__setitem__("method", "ertacache"), r"configures 'ertacache', not 'bac'"),
    ],
)
def test_corrupt_profile_fields_are_named(profile, tmp_path, edit, message):
    path = _corrupt(profile, tmp_path, edit)
    with pytest.raises(difcache.DifcacheError, match=message):
        difcache.apply_cache(_loop(), "bac", profile=path)


def test_metric_is_fixed_at_calibration(profile):
    l1 = difcache.calibrate(_loop(), "bac", [{"seed": 0}], num_inference_steps=STEPS, metric="l1")
    assert l1.data["metric"] == "l1" and np.allclose(np.diag(np.array(l1.data["similarity"][0])), 0.0)
    with pytest.raises(difcache.DifcacheError, match="made with metric='l1'.*apply it with metric='l1'"):
        difcache.apply_cache(_loop(), "bac", profile=l1)
    with difcache.apply_cache(_loop(), "bac", profile=l1, metric="l1", budget=3, num_bu_units=0, force_last=False) as h:
        assert _steps_of(h) == [list(optimal_update_steps(m, 3, minimize=True)) for m in l1.data["similarity"]]


def test_subsample_draws_its_index_once_per_size_and_device():
    big, other = torch.randn(3, 1000), torch.randn(3000)
    first = subsample(big, 100)
    assert torch.equal(subsample(big * 2, 100), first * 2)  # the same entries for every tensor of this size
    assert subsample(other, 100).shape == (100,) and not torch.equal(subsample(other, 100), subsample(big, 100))
    small = torch.randn(50, dtype=torch.float16)
    assert torch.equal(subsample(small, 100), small.float()) and subsample(small, 100).dtype == torch.float32


# ------------------------------------------------------------------------------------------- cached runs
def test_cached_run_follows_the_schedule_and_stays_close(profile):
    pipe = _loop()
    reference = pipe(STEPS, 0)
    handle = difcache.apply_cache(pipe, "bac", profile=profile, budget=4)
    first, second = pipe(STEPS, 0), pipe(STEPS, 0)
    stats = handle.stats()
    steps = _steps_of(handle)
    handle.remove()
    assert torch.equal(first, second) and stats.runs == 2  # state is reset per call
    for unit, scheduled in zip(stats.units, steps, strict=True):
        assert unit.compute == 2 * len(scheduled) and unit.reuse == 2 * (STEPS - len(scheduled))
    totals = stats.totals()
    assert totals["compute"] < 2 * STEPS * len(steps) and stats.ideal_speedup > 1.5
    error = ((first - reference).norm() / reference.norm()).item()
    assert 0 < error < 0.1
    assert torch.equal(pipe(STEPS, 0), reference)  # removal: bit-identical


def test_full_budget_is_exact_and_taylor_forecasts(profile):
    pipe = _loop()
    reference = pipe(STEPS, 0)
    with difcache.apply_cache(pipe, "bac", profile=profile, budget=1.0) as handle:
        with pytest.warns(UserWarning, match="nothing is cached"):  # a full budget computes every step, and says so
            assert torch.equal(pipe(STEPS, 0), reference)
        assert handle.stats().totals()["reuse"] == 0
    with difcache.apply_cache(pipe, "bac", profile=profile, budget=4, forecast="taylor") as handle:
        out = pipe(STEPS, 0)
        stats = handle.stats()
    assert stats.totals()["forecast"] > 0 and stats.totals()["reuse"] == 0
    assert torch.isfinite(out).all() and ((out - reference).norm() / reference.norm()).item() < 0.2


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_real_pipelines_with_cfg(family):
    """PixArt runs batched CFG (one branch), FLUX true CFG sequentially (a cond and an uncond sample per call)."""
    torch.set_num_threads(1)
    steps = 6
    pipe = tiny_pipeline(family)

    def kwargs(seed):
        return tiny_call_kwargs(family, cfg=True, num_inference_steps=steps, seed=seed)

    calibrated = difcache.calibrate(pipe, "bac", [kwargs(0), kwargs(1)], num_inference_steps=steps)
    assert calibrated.data["samples"] == (2 if family == "pixart" else 4)
    reference = output_of(pipe(**kwargs(2)))
    with difcache.apply_cache(pipe, "bac", profile=calibrated, budget=3) as handle:
        cached = output_of(pipe(**kwargs(2)))
        stats = handle.stats()
        steps_of = _steps_of(handle)
    calls = 1 if family == "pixart" else 2
    for unit, scheduled in zip(stats.units, steps_of, strict=True):
        assert unit.compute == calls * len(scheduled) and unit.reuse == calls * (steps - len(scheduled))
    assert stats.totals()["reuse"] > 0
    assert (cached - reference).abs().max() < 0.25  # images in [0, 1]
    assert torch.equal(output_of(pipe(**kwargs(2))), reference)
