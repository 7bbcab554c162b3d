"""Forecasters are weights over stored outputs: Taylor's weights reproduce the official recursion on tensors,
are exact on polynomials of its order, and combine() applies weights in fp32 (eager and as tensors)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difcache.core import Combination, combine, combine_weights
from difcache.forecasters import ReuseForecaster, TaylorForecaster, taylor_weights
from difcache.forecasters.rectified import RectifiedForecaster


def _poly(coeffs, s):
    return sum(c * s**k for k, c in enumerate(coeffs))


def _official_forecast(history, order, warmup, target):
    """The official TaylorSeer recursion on the factors themselves (taylor_utils), then the Taylor sum."""
    factors = None
    for step, value in history:
        new = [value]
        if factors is not None and step > warmup - 2:
            previous_step, old = factors
            distance = step - previous_step
            for k in range(order):
                if k >= len(old) or distance <= 0:
                    break
                new.append((new[k] - old[k]) / distance)
        factors = (step, new)
    step, terms = factors
    h = target - step
    return sum(t * h**k / math.factorial(k) for k, t in enumerate(terms)), len(terms)


def _forecast(forecaster, history, target):
    """What the engine does: the last `history` entries, newest first, combined with the forecaster's weights."""
    entries = list(reversed(history))[: forecaster.history]
    combination = forecaster.combination(target, tuple(s for s, _ in entries), 0)
    return combine([[v] for _, v in entries], combination)[0], combination


@settings(max_examples=60, deadline=None)
@given(
    order=st.integers(0, 4),
    warmup=st.integers(0, 5),
    steps=st.lists(st.integers(1, 4), min_size=1, max_size=9),
    offset=st.integers(1, 5),
    seed=st.integers(0, 10_000),
)
def test_taylor_weights_match_the_official_recursion(order, warmup, steps, offset, seed):
    gen = torch.Generator().manual_seed(seed)
    positions = [0]
    for gap in steps:
        positions.append(positions[-1] + gap)
    history = [(s, torch.randn(16, generator=gen, dtype=torch.float64)) for s in positions]
    target = positions[-1] + offset
    expected, _ = _official_forecast(history, order, warmup, target)
    got, _ = _forecast(TaylorForecaster(order, warmup), history, target)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(order=st.integers(0, 4), interval=st.integers(1, 5), offset=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_taylor_exact_on_polynomials_of_its_order(order, interval, offset, seed):
    gen = torch.Generator().manual_seed(seed)
    coeffs = [torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(order + 1)]
    steps = [k * interval for k in range(order + 1)]
    history = [(s, _poly(coeffs, s).float()) for s in steps]
    target = steps[-1] + offset
    predicted, _ = _forecast(TaylorForecaster(order), history, target)
    expected = _newton_backward(coeffs, steps, target, order)
    assert torch.allclose(predicted.double(), expected, rtol=1e-4, atol=1e-3 * (1 + expected.abs().max()))


def _newton_backward(coeffs, steps, target, order):
    """What the official recursion computes: sum_k Δ^k F / d^k * h^k / k!, with Δ backward differences."""
    d = steps[1] - steps[0] if len(steps) > 1 else 1
    diffs = [_poly(coeffs, s) for s in steps]
    out = torch.zeros_like(diffs[0])
    h = target - steps[-1]
    for k in range(order + 1):
        out = out + diffs[-1] / d**k * h**k / math.factorial(k)
        diffs = [b - a for a, b in zip(diffs, diffs[1:], strict=False)]
    return out


@pytest.mark.parametrize("order", [0, 1])
def test_taylor_exact_for_linear_signals(order):
    history = [(s, torch.full((2,), 2.0 * s + 1.0)) for s in (0, 3)]
    pred, _ = _forecast(TaylorForecaster(order), history, 5)
    assert torch.allclose(pred, torch.full((2,), 11.0 if order == 1 else 7.0))


def test_taylor_order_builds_up_one_computed_step_at_a_time():
    # With entries 0..k stored, the forecast uses k+1 of them (up to order + 1).
    for k in range(5):
        weights = taylor_weights(3, 0, 10, tuple(range(k, -1, -1)))
        assert len(weights) == min(k, 3) + 1


def test_taylor_warmup_delays_differences_like_official_code():
    # Official: differences only when step > first_enhance - 2 (warmup 3: from step 2 on).
    assert taylor_weights(1, 3, 5, (1, 0)) == (1.0,)
    assert len(taylor_weights(1, 3, 5, (2, 1, 0))) == 2


def test_taylor_divides_every_order_by_latest_distance():
    history = [(0, torch.tensor([0.0])), (1, torch.tensor([1.0])), (4, torch.tensor([16.0]))]
    # factor1 = (16-1)/3 = 5; old factor1 = 1; factor2 = (5-1)/3 (the latest distance: the official quirk)
    pred, _ = _forecast(TaylorForecaster(2), history, 5)
    assert torch.allclose(pred, torch.tensor([16.0 + 5.0 + (4.0 / 3.0) / 2]))


def test_combine_accumulates_in_fp32_and_returns_the_input_dtype_and_none_leaves():
    entries = [[torch.full((2,), 2, dtype=torch.bfloat16), None], [torch.ones(2, dtype=torch.bfloat16), None]]
    combination = TaylorForecaster(1).combination(2, (1, 0), 0)
    pred = combine(entries, combination)
    assert pred[0].dtype == torch.bfloat16 and pred[1] is None
    assert torch.equal(pred[0], torch.full((2,), 3, dtype=torch.bfloat16))


def test_combine_from_a_weight_tensor_matches_the_eager_floats():
    gen = torch.Generator().manual_seed(0)
    entries = [[torch.randn(5, generator=gen), torch.randn(3, generator=gen)] for _ in range(3)]
    combination = Combination((1.5, -0.75, 0.25), scale=(0.9, 1.1), bias=(0.1, -0.2))
    eager = combine(entries, combination)
    compiled = torch.compile(lambda w: combine_weights(entries, w, (True, True)), backend="eager", fullgraph=True)
    traced = compiled(combination.as_tensor(torch.device("cpu")))
    for a, b in zip(eager, traced, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_reuse_returns_the_stored_output_itself():
    a = torch.randn(3)
    assert combine([[a]], ReuseForecaster().combination(5, (3,), 0))[0] is a


def test_combine_never_writes_into_stored_outputs():
    entries = [[torch.full((4,), float(s * s))] for s in (3, 2, 1)]
    copies = [[e[0].clone()] for e in entries]
    combine(entries, TaylorForecaster(2).combination(5, (3, 2, 1), 0))
    combine(entries, Combination((1.0,), scale=(2.0,), bias=(1.0,)))
    assert all(torch.equal(e[0], c[0]) for e, c in zip(entries, copies, strict=True))


def test_rectified_is_reuse_with_a_per_leaf_affine_correction():
    forecaster = RectifiedForecaster(((None,), ((0.25, 0.5), None)))
    assert forecaster.combination(0, (0,), 0).is_reuse
    x, y = torch.randn(4), torch.randn(4)
    out = combine([[x, y]], forecaster.combination(1, (0,), 0))
    assert torch.allclose(out[0], 0.75 * x - 0.5) and torch.allclose(out[1], y)
