"""Rectified reuse: the last computed feature with a per-step closed-form linear error correction (ERTACache).

ERTACache (Peng et al., "ERTACache: Error Rectification and Timesteps Adjustment for Efficient Diffusion",
arXiv 2508.21091, ICLR 2026) models the error of a reused feature ``f̃`` against the true one ``f`` as

    ε_i = f̃_i − f_i ≈ σ(K_i f̃_i + B_i),    σ(z) ≈ z/4 + 1/2   (first-order expansion at 0),

so, per step ``i``, the error is affine in the reused feature and its coefficients have a closed form: least
squares of ``ε`` on ``f̃`` over calibration runs gives slope ``a_i = Cov(f̃, ε)/Var(f̃)`` and intercept
``b_i = mean(ε) − a_i·mean(f̃)``; in the paper's parameterisation ``K_i = 4·a_i`` and ``B_i = 4·(b_i − 1/2)``.
The corrected feature is ``f̂_i = f̃_i − ε̂_i = (1 − a_i)·f̃_i − b_i``. The sigmoid is never evaluated: its
linearisation is the model, so fitting it is ordinary least squares (:func:`fit_rectification`).

Granularity (not stated in the sources we could read; our choice): one scalar pair per step and per leaf
(FLUX: one for the image stream, one for the text stream), pooled over every calibrated entry. Steps without
coefficients (computed steps, or leaves the calibration did not see) fall back to plain reuse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from difcache.core import Combination
from difcache.forecasters.reuse import REUSE

# coefficients[step][leaf] = (a, b), or None for plain reuse
Coefficients = tuple[tuple[tuple[float, float] | None, ...] | None, ...]


def fit_rectification(cached: torch.Tensor, true: torch.Tensor) -> tuple[float, float]:
    """Closed-form least squares of the reuse error ``ε = cached − true`` on ``cached``: returns ``(a, b)``
    with ``ε ≈ a·cached + b``, computed in float64. A constant ``cached`` gives ``a = 0``, ``b = mean(ε)``."""
    x = cached.detach().reshape(-1).double()
    eps = x - true.detach().reshape(-1).double()
    x_mean, eps_mean = x.mean(), eps.mean()
    dx = x - x_mean
    var = float((dx * dx).mean())
    a = float((dx * (eps - eps_mean)).mean()) / var if var > 0 else 0.0
    return a, float(eps_mean) - a * float(x_mean)


def to_paper(a: float, b: float) -> tuple[float, float]:
    """``(a, b)`` of ``ε ≈ a·f̃ + b`` as the paper's ``(K, B)`` of ``ε ≈ σ(K·f̃ + B)`` linearised at 0."""
    return 4.0 * a, 4.0 * (b - 0.5)


def from_paper(k: float, b: float) -> tuple[float, float]:
    """Inverse of :func:`to_paper`: the slope and intercept of the linearised error model."""
    return k / 4.0, b / 4.0 + 0.5


@dataclass(frozen=True)
class RectifiedForecaster:
    """Reuse with ``f̂ = (1 − a_step)·f̃ − b_step`` per leaf; ``coefficients`` indexed by step then leaf."""

    coefficients: Coefficients
    history: int = 1

    def combination(self, step: int, entry_steps: tuple[int, ...], unit: int) -> Combination:
        per_leaf = self.coefficients[step] if step < len(self.coefficients) else None
        if per_leaf is None or all(pair is None for pair in per_leaf):
            return REUSE
        scale = tuple(1.0 if pair is None else 1.0 - pair[0] for pair in per_leaf)
        bias = tuple(0.0 if pair is None else -pair[1] for pair in per_leaf)
        return Combination((1.0,), scale, bias)

    @classmethod
    def from_lists(cls, coefficients: Sequence[Sequence[Sequence[float] | None] | None]) -> RectifiedForecaster:
        """Build from nested lists (as stored in a profile), turning them into hashable tuples."""
        steps: list[tuple[tuple[float, float] | None, ...] | None] = []
        for per_leaf in coefficients:
            if per_leaf is None:
                steps.append(None)
                continue
            steps.append(tuple(None if pair is None else (float(pair[0]), float(pair[1])) for pair in per_leaf))
        return cls(tuple(steps))
