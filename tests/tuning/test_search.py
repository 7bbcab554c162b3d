"""autotune's search: the dynamic program against brute force, the allocation against brute force, fitted
weights against Taylor on polynomial data."""

import itertools

import numpy as np
import pytest
import torch

from difcache.forecasters import taylor_weights
from difcache.tuning.search import (
    FAMILIES,
    allocate,
    best_schedules,
    brute_force,
    error,
    error_tables,
    gram,
    schedule_cost,
    weights,
)


def _random_gram(steps: int, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    drift = torch.cumsum(torch.randn(2, steps, 32, generator=gen), dim=1)  # random walks: smooth-ish in steps
    return gram(drift + 0.3 * torch.randn(2, steps, 32, generator=gen))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dynamic_program_finds_the_brute_force_optimum(family, seed):
    steps = 8
    g = _random_gram(steps, seed)
    gain = np.linspace(1.5, 0.5, steps)
    table = error_tables(g, gain, family)
    found = best_schedules(table)
    for m in range(1, steps + 1):
        exact = brute_force(table, m)
        assert found[m].cost == pytest.approx(exact.cost, rel=1e-9, abs=1e-9), m
        assert schedule_cost(table, found[m].compute) == pytest.approx(found[m].cost, rel=1e-9, abs=1e-9)
        assert found[m].compute[0] == 0 and len(set(found[m].compute)) == m


def test_fitted_weights_reproduce_taylor_on_linear_trajectories():
    # Features linear in the step: Taylor's first order is exact, so least squares finds the same weights.
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 1, 64, generator=gen), torch.randn(3, 1, 64, generator=gen)
    steps = torch.arange(10, dtype=torch.float64)[None, :, None]
    g = gram(a + b * steps)
    for step, entries in [(5, (4, 2)), (9, (6, 5)), (7, (3, 0))]:
        fitted = weights(g, "fit", step, entries)
        assert np.allclose(fitted, taylor_weights(1, 0, step, entries), atol=1e-4)
        assert error(g, step, entries, fitted) < 1e-6 * g[step, step]


def test_fitted_weights_never_do_worse_than_taylor_on_the_calibration_data_and_sum_to_one():
    g = _random_gram(12, 3)
    for step, entries in [(5, (4, 2)), (11, (7, 5)), (9, (8, 1))]:
        taylor = error(g, step, entries, weights(g, "taylor", step, entries))
        fitted = weights(g, "fit", step, entries)
        assert error(g, step, entries, fitted) <= taylor * (1 + 1e-6)
        assert fitted.sum() == pytest.approx(1.0)  # affine: a constant feature is forecast exactly


def test_second_order_family_is_taylors_second_order():
    assert np.allclose(weights(np.eye(6), "taylor2", 5, (4, 2, 0)), taylor_weights(2, 0, 5, (4, 2, 0)))


def test_allocation_is_the_brute_force_optimum():
    rng = np.random.default_rng(0)
    curves = [{m: float(10.0 / m + rng.random()) for m in range(1, 6)} for _ in range(3)]
    work = [1.0, 2.0, 0.5]
    for budget in (3.5, 6.0, 9.0, 14.0):
        chosen = allocate(curves, work, budget, bins=2000)
        cost = sum(c[m] for c, m in zip(curves, chosen, strict=True))
        assert sum(m * w for m, w in zip(chosen, work, strict=True)) <= budget + 1e-9
        feasible = [
            sum(c[m] for c, m in zip(curves, ms, strict=True))
            for ms in itertools.product(*(list(c) for c in curves))
            if sum(m * w for m, w in zip(ms, work, strict=True)) <= budget
        ]
        assert cost == pytest.approx(min(feasible))


@pytest.mark.parametrize("family", ["reuse", "taylor", "fit"])
def test_vectorised_tables_equal_the_one_by_one_weights_and_errors(family):
    steps = 9
    g = _random_gram(steps, 4)
    gain = np.linspace(2.0, 0.5, steps)
    table = error_tables(g, gain, family)
    for c0 in range(steps):
        for c1 in [steps, *range(c0)]:
            entries = (c0,) if c1 == steps or family == "reuse" else (c0, c1)
            for s in range(steps):
                if s <= c0:
                    assert table[c1, c0, s] == np.inf
                    continue
                expected = gain[s] ** 2 * error(g, s, entries, weights(g, family, s, entries))
                assert table[c1, c0, s] == pytest.approx(expected, rel=1e-7, abs=1e-9 * g[s, s])
