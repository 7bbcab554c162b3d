"""The offline half of ``autotune``: forecast errors from recorded trajectories, and exact schedule search.

Everything here works on the *Gram matrix* of one unit's recorded outputs, ``G[a, b] = sum_samples <F_a, F_b>``
over steps ``a, b`` (subsampled entries, fp64). A forecast at step ``s`` that combines the outputs computed at
the steps ``h = (c0 > c1 > ...)`` with weights ``w`` has squared error

    e(s | h, w) = w^T G[h, h] w - 2 w^T G[h, s] + G[s, s]

summed over the calibration samples (*open loop*: the computed outputs are the uncached run's). So any set of
weights can be scored without running the model, and the best weights for a history are a least-squares fit.

**Forecaster families** (:data:`FAMILIES`) are rules for ``w`` given the last computed steps: ``reuse``
(``w = [1]``), ``taylor``, ``taylor2`` and ``taylor3`` (TaylorSeer's first to third order from the last two to
four) and ``fit`` / ``fit3`` (L2P's idea: weights on the last two / three fitted by least squares on the
calibration trajectories, per unit and per step). The fit is *affine*, its weights sum to one like every Taylor
expansion's (a constant feature is forecast exactly), and it is ridge-regularised toward the Taylor weights of
the same length, so it is Taylor where the data say nothing and can only match or beat Taylor on the calibration
data. (Unconstrained least squares fitted the open-loop data better still, and was 2-6 dB worse on the final
images of the bundled DiT: it learns to shrink forecasts, which is no longer right once the computed steps
themselves carry earlier errors.)

**The proxy** of a schedule is ``sum_s gain[s]^2 * e(s | history(s))`` over its skipped steps, ``gain[s]`` being
how much an error in the model output at step ``s`` moves the sampler's next latent (measured on the scheduler,
:mod:`difcache.tuning.record`). It is what the search minimises; ``autotune`` then runs the best candidates for
real and keeps the one whose *final output* is closest to the uncached run (the proxy ignores how an error
propagates through later steps: ``BENCHMARKS.md`` shows how well it tracks the final PSNR).

**Exact search.** For a fixed number ``m`` of computed steps (step 0 always computed: nothing exists to forecast
from before it), :func:`best_schedules` finds the compute set minimising the proxy by dynamic programming over
the last one or two computed steps (a forecast's history), in ``O(m T^2)`` for one-step families and
``O(m T^3)`` for two-step ones, for every ``m`` at once; :func:`brute_force` checks it on small ``T``.
:func:`allocate` then splits a FLOPs budget over several units (block ranges whose work differs) exactly, by a
knapsack over their error curves.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from difcache.forecasters.taylor import taylor_weights

FAMILIES = ("reuse", "taylor", "taylor2", "taylor3", "fit", "fit3")
_HISTORY = {"reuse": 1, "taylor": 2, "taylor2": 3, "taylor3": 4, "fit": 2, "fit3": 3}
# The dynamic program tracks at most the last two computed steps; longer families are scored on it with the
# two-step family that shares their shape, and their weights set on the schedule it finds (autotune then judges
# them on the final output like every candidate).
SEARCHED_AS = {"taylor2": "taylor", "taylor3": "taylor", "fit3": "fit"}
_FITTED = ("fit", "fit3")
RIDGE = 1e-4  # relative to the mean energy of the outputs involved


def gram(features: torch.Tensor) -> np.ndarray:
    """``G[a, b] = sum_samples <F[sample, a], F[sample, b]>`` for ``features`` ``[S, T, E]``, in float64."""
    x = features.detach().double()
    return torch.einsum("sae,sbe->ab", x, x).numpy()


def history_of(family: str) -> int:
    return _HISTORY[family]


def weights(g: np.ndarray, family: str, step: int, entries: Sequence[int]) -> np.ndarray:
    """The family's weights on the outputs computed at ``entries`` (newest first) for a forecast at ``step``."""
    entries = tuple(entries[: _HISTORY[family]])
    taylor = np.array(taylor_weights(len(entries) - 1, 0, step, entries))
    if family not in _FITTED or len(entries) == 1:
        return taylor if family != "reuse" else np.array([1.0])
    # Affine least squares around Taylor: w = taylor + B z with B spanning the weights that sum to zero.
    idx = list(entries)
    a, b = g[np.ix_(idx, idx)], g[idx, step]
    basis = np.zeros((len(idx), len(idx) - 1))
    for j in range(len(idx) - 1):
        basis[j, j], basis[j + 1, j] = 1.0, -1.0
    ridge = RIDGE * max(float(np.trace(a)) / len(idx), 1e-30)
    lhs = basis.T @ a @ basis + ridge * np.eye(len(idx) - 1)
    return taylor + basis @ np.linalg.solve(lhs, basis.T @ (b - a @ taylor))


def error(g: np.ndarray, step: int, entries: Sequence[int], w: np.ndarray) -> float:
    """Squared forecast error summed over samples (see the module docstring)."""
    idx = list(entries[: len(w)])
    return max(float(w @ g[np.ix_(idx, idx)] @ w - 2 * w @ g[idx, step] + g[step, step]), 0.0)


def error_tables(g: np.ndarray, gain: np.ndarray, family: str) -> np.ndarray:
    """``E[c1, c0, s] = gain[s]^2 e(s | c0, c1)`` for ``c1 < c0 < s``; ``c1 = T`` stands for "no earlier
    computed step" (the history has one entry). One-step families ignore ``c1``; longer ones are scored as the
    family in :data:`SEARCHED_AS`. Vectorised over all ``(c1, c0, s)`` at once: the same values as
    :func:`weights` and :func:`error` give one by one (tested), in ``O(T^3)`` numpy instead of Python."""
    family = SEARCHED_AS.get(family, family)
    t = g.shape[0]
    c1, c0, s = np.meshgrid(np.arange(t + 1), np.arange(t), np.arange(t), indexing="ij")
    valid = (c0 < s) & ((c1 < c0) | (c1 == t))
    one = c1 == t
    diag = np.diag(g)
    # One entry (reuse, or the first forecast after step 0): w = [1].
    single = diag[c0] - 2 * g[c0, s] + diag[s]
    if _HISTORY[family] == 1:
        return np.where(c0 < s, np.maximum(single, 0.0), np.inf) * gain[None, None, :] ** 2
    k = np.where(one, 0, c1)  # any index where c1 = none; masked below
    d = np.where(valid & ~one, c0 - k, 1).astype(np.float64)  # 1 where masked: no division by zero
    h = (s - c0).astype(np.float64)
    w0, w1 = 1 + h / d, -h / d  # TaylorSeer's first order from (c0, c1)
    g00, g01, g11, g0s, g1s = diag[c0], g[c0, k], diag[k], g[c0, s], g[k, s]
    if family in _FITTED:  # affine fit: w += z [1, -1], z the ridge least-squares step from Taylor
        curvature = g00 - 2 * g01 + g11 + RIDGE * np.maximum((g00 + g11) / 2, 1e-30)
        z = ((g0s - g1s) - (w0 * (g00 - g01) + w1 * (g01 - g11))) / curvature
        w0, w1 = w0 + z, w1 - z
    pair = w0 * w0 * g00 + 2 * w0 * w1 * g01 + w1 * w1 * g11 - 2 * (w0 * g0s + w1 * g1s) + diag[s]
    table = np.where(one, single, pair)
    table = np.where(valid, np.maximum(table, 0.0), np.inf)
    return table * gain[None, None, :] ** 2


@dataclass(frozen=True)
class Schedule:
    """A compute set and its proxy cost."""

    compute: tuple[int, ...]
    cost: float


def _segment_costs(table: np.ndarray) -> np.ndarray:
    """``S[c1, c0, c] = sum_{c0 < s < c} table[c1, c0, s]`` for ``c`` in ``c0 + 1 .. T`` (``c = T``: to the end)."""
    t = table.shape[1]
    finite = np.where(np.isfinite(table), table, 0.0)
    cumulative = np.concatenate([np.zeros((t + 1, t, 1)), np.cumsum(finite, axis=2)], axis=2)  # [.., s + 1]
    segments = np.full((t + 1, t, t + 1), np.inf)
    for c0 in range(t):
        # the skipped steps are c0 + 1 .. c - 1: cumulative[c] - cumulative[c0 + 1]
        segments[:, c0, c0 + 1 :] = cumulative[:, c0, c0 + 1 :] - cumulative[:, c0, c0 + 1 : c0 + 2]
    return segments


def best_schedules(table: np.ndarray, max_compute: int | None = None) -> dict[int, Schedule]:
    """For every ``m`` up to ``max_compute``, the compute set of ``m`` steps (step 0 included) with the least
    proxy under ``table`` (:func:`error_tables`), by exact dynamic programming over the last two computed steps."""
    t = table.shape[1]
    none = t
    max_compute = t if max_compute is None else min(max_compute, t)
    segments = _segment_costs(table)
    # f[c0, c1]: least cost of steps 0..c0 with c0 computed and c1 the computed step before it (none = t).
    f = np.full((t, t + 1), np.inf)
    f[0, none] = 0.0
    back: list[np.ndarray] = []
    out: dict[int, Schedule] = {}
    for m in range(1, max_compute + 1):
        tails = f + segments[:, :, t].T  # + the skipped steps after the last computed one
        flat = int(np.argmin(tails))
        if np.isfinite(tails.flat[flat]):
            c0, c1 = divmod(flat, t + 1)
            out[m] = Schedule(_backtrack(back, m, c0, c1, none), float(tails.flat[flat]))
        if m == max_compute:
            break
        # new[c, c0] = min over c1 of f[c0, c1] + segments[c1, c0, c] for c > c0
        candidate = f[:, :, None] + np.transpose(segments[:, :, :t], (1, 0, 2))  # [c0, c1, c]
        arg = np.argmin(candidate, axis=1)  # [c0, c]
        best = np.take_along_axis(candidate, arg[:, None, :], axis=1)[:, 0, :]
        new = np.full((t, t + 1), np.inf)
        new[:, :t] = best.T  # new[c, c0]
        back.append(arg)
        f = new
    return out


def _backtrack(back: list[np.ndarray], m: int, c0: int, c1: int, none: int) -> tuple[int, ...]:
    steps = [c0]
    for level in range(m - 2, -1, -1):  # back[level] led from m' = level + 1 computes to level + 2
        steps.append(c1)
        c0, c1 = c1, int(back[level][c1, c0]) if level > 0 else none
    return tuple(sorted(steps))


def step_costs(table: np.ndarray, compute: Sequence[int]) -> np.ndarray:
    """Per step, the proxy term of one compute set (0 at computed steps); their sum is :func:`schedule_cost`."""
    t = table.shape[1]
    computed = set(compute)
    out = np.zeros(t)
    history: list[int] = []
    for s in range(t):
        if s in computed:
            history.insert(0, s)
            continue
        out[s] = table[history[1] if len(history) > 1 else t, history[0], s]
    return out


def schedule_cost(table: np.ndarray, compute: Sequence[int]) -> float:
    """The proxy of one compute set (what :func:`best_schedules` minimises)."""
    return float(step_costs(table, compute).sum())


def brute_force(table: np.ndarray, m: int) -> Schedule:
    """The best ``m``-step compute set by trying them all (small ``T`` only; checks :func:`best_schedules`)."""
    t = table.shape[1]
    best = Schedule((), math.inf)
    for rest in itertools.combinations(range(1, t), m - 1):
        compute = (0, *rest)
        cost = schedule_cost(table, compute)
        if cost < best.cost:
            best = Schedule(compute, cost)
    return best


def allocate(costs: Sequence[dict[int, float]], work: Sequence[float], budget: float, bins: int = 4000) -> list[int]:
    """How many steps each unit computes, ``m_u``, minimising ``sum_u costs[u][m_u]`` with ``sum_u m_u *
    work[u] <= budget``: a knapsack over the units, exact up to the budget's resolution (``bins``; the budget
    itself is checked exactly)."""
    scale = bins / budget if budget > 0 else 0.0
    best: dict[int, tuple[float, float, tuple[int, ...]]] = {0: (0.0, 0.0, ())}  # bin -> (cost, work, choices)
    for u, curve in enumerate(costs):
        nxt: dict[int, tuple[float, float, tuple[int, ...]]] = {}
        for cost, used, choice in best.values():
            for m, c in curve.items():
                total = used + m * work[u]
                if total > budget * (1 + 1e-12):
                    continue
                key = round(total * scale)
                if key not in nxt or cost + c < nxt[key][0]:
                    nxt[key] = (cost + c, total, (*choice, m))
        best, floor = {}, math.inf  # drop states a cheaper one with less work dominates
        for key in sorted(nxt):
            if nxt[key][0] < floor:
                best[key], floor = nxt[key], nxt[key][0]
        if not best:
            raise ValueError(f"the budget {budget} cannot hold unit {u} even computing once")
    return list(min(best.values())[2])
