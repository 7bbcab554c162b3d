"""Reuse: return the last computed output unchanged (FORA, DeepCache, Δ-DiT; TaylorSeer at order 0)."""

from __future__ import annotations

from dataclasses import dataclass

from difcache.core import Combination

REUSE = Combination((1.0,))


@dataclass(frozen=True)
class ReuseForecaster:
    history: int = 1

    def combination(self, step: int, entry_steps: tuple[int, ...], unit: int) -> Combination:
        return REUSE
