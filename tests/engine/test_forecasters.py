"""Forecasters: Taylor is exact on polynomials of its order; reuse returns the stored output."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difcache.forecasters import ReuseForecaster, TaylorForecaster


def _poly(coeffs, s):
    return sum(c * s**k for k, c in enumerate(coeffs))


@settings(max_examples=40, deadline=None)
@given(
    order=st.integers(0, 4),
    interval=st.integers(1, 5),
    offset=st.integers(1, 4),
    seed=st.integers(0, 10_000),
)
def test_taylor_exact_on_polynomials_of_its_order(order, interval, offset, seed):
    gen = torch.Generator().manual_seed(seed)
    coeffs = [torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(order + 1)]
    forecaster = TaylorForecaster(order)
    state = None
    # Equally spaced computed steps, enough of them for all orders to build up.
    steps = [k * interval for k in range(order + 1)]
    for s in steps:
        state = forecaster.update(state, s, [_poly(coeffs, s).float()])
    target = steps[-1] + offset
    (predicted,) = forecaster.predict(state, target)
    # Finite differences of a degree-O polynomial at spacing d are exact Newton-backward terms; the Taylor
    # sum with h^k/k! reproduces the polynomial exactly only for order <= 1, so compare with Newton's form.
    expected = _newton_backward(coeffs, steps, target, order)
    assert torch.allclose(predicted.double(), expected, rtol=1e-4, atol=1e-3 * (1 + expected.abs().max()))


def _newton_backward(coeffs, steps, target, order):
    """What the official recursion computes: sum_k Δ^k F / d^k * h^k / k!, with Δ backward differences."""
    d = steps[1] - steps[0] if len(steps) > 1 else 1
    values = [_poly(coeffs, s) for s in steps]
    out = torch.zeros_like(values[0])
    h = target - steps[-1]
    diffs = values
    for k in range(order + 1):
        out = out + diffs[-1] / d**k * h**k / math.factorial(k)
        diffs = [b - a for a, b in zip(diffs, diffs[1:], strict=False)]
    return out


@pytest.mark.parametrize("order", [0, 1])
def test_taylor_exact_for_linear_signals(order):
    forecaster = TaylorForecaster(order)
    state = None
    for s in (0, 3):
        state = forecaster.update(state, s, [torch.full((2,), 2.0 * s + 1.0)])
    (pred,) = forecaster.predict(state, 5)
    assert torch.allclose(pred, torch.full((2,), 11.0 if order == 1 else 7.0))


def test_taylor_order_builds_up_one_computed_step_at_a_time():
    forecaster = TaylorForecaster(order=3)
    state = None
    for k, s in enumerate((0, 1, 2, 3)):
        state = forecaster.update(state, s, [torch.zeros(1)])
        assert len(state.factors) == min(k, 3) + 1


def test_taylor_warmup_delays_differences_like_official_code():
    # Official: differences only when step > first_enhance - 2.
    forecaster = TaylorForecaster(order=1, warmup=3)
    state = forecaster.update(None, 0, [torch.zeros(1)])
    state = forecaster.update(state, 1, [torch.ones(1)])
    assert len(state.factors) == 1
    state = forecaster.update(state, 2, [torch.full((1,), 2.0)])
    assert len(state.factors) == 2


def test_taylor_divides_every_order_by_latest_distance():
    forecaster = TaylorForecaster(order=2)
    state = None
    for s, v in ((0, 0.0), (1, 1.0), (4, 16.0)):
        state = forecaster.update(state, s, [torch.tensor([v])])
    # factor1(new) = (16-1)/3 = 5; factor1(old) = 1; factor2 = (5-1)/3 (latest distance, the official quirk)
    assert torch.allclose(state.factors[1][0], torch.tensor([5.0]))
    assert torch.allclose(state.factors[2][0], torch.tensor([4.0 / 3.0]))


def test_taylor_keeps_fp32_and_returns_input_dtype_and_none_leaves():
    forecaster = TaylorForecaster(order=1)
    state = forecaster.update(None, 0, [torch.ones(2, dtype=torch.bfloat16), None])
    state = forecaster.update(state, 1, [torch.full((2,), 2, dtype=torch.bfloat16), None])
    assert all(t.dtype == torch.float32 for t in forecaster.tensors(state))
    pred = forecaster.predict(state, 2)
    assert pred[0].dtype == torch.bfloat16 and pred[1] is None
    assert torch.equal(pred[0], torch.full((2,), 3, dtype=torch.bfloat16))


def test_reuse_returns_last_output():
    forecaster = ReuseForecaster()
    a, b = torch.randn(3), torch.randn(3)
    state = forecaster.update(forecaster.update(None, 0, [a]), 3, [b])
    assert forecaster.predict(state, 5)[0] is b


def _official_factors(history, order, warmup):
    """The official recursion on plain factors (no folding, no buffer reuse): the reference for update()."""
    factors = None
    for step, value in history:
        new = [value]
        if factors is not None and step > warmup - 2:
            previous_step, old = factors
            distance = step - previous_step
            for k in range(order):
                if k >= len(old):
                    break
                new.append((new[k] - old[k]) / distance)
        factors = (step, new)
    return factors[1]


@pytest.mark.parametrize("order", [1, 2, 4])
def test_taylor_update_reuses_its_buffers_and_matches_the_official_recursion(order):
    gen = torch.Generator().manual_seed(order)
    forecaster = TaylorForecaster(order, warmup=2)
    steps = [0, 1, 2, 5, 8, 9, 13, 16, 20, 21, 25]
    history = [(s, torch.randn(64, generator=gen, dtype=torch.float64)) for s in steps]
    state, pointers = None, []
    for s, v in history:
        state = forecaster.update(state, s, [v.float()])
        pointers.append({t.data_ptr() for t in forecaster.tensors(state)[1:]})
    expected = _official_factors(history, order, warmup=2)
    assert len(state.factors) == order + 1
    for got, want in zip(state.factors, expected, strict=True):
        assert torch.allclose(got[0].double(), want, rtol=1e-4, atol=1e-4)
    # At full order the difference buffers circulate: no new ones after the order has built up.
    assert pointers[-1] == pointers[-2] == pointers[-3] and len(pointers[-1]) == order


def test_taylor_update_never_writes_into_the_module_output():
    forecaster = TaylorForecaster(order=2)
    outputs = [torch.full((4,), float(s * s)) for s in range(6)]
    copies = [o.clone() for o in outputs]
    state = None
    for s, o in enumerate(outputs):
        state = forecaster.update(state, s, [o])
    assert all(torch.equal(o, c) for o, c in zip(outputs, copies, strict=True))
