"""Reuse: return the last computed output unchanged (FORA, DeepCache, Δ-DiT; TaylorSeer at order 0)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difcache.forecasters.base import Feature


@dataclass(frozen=True)
class ReuseForecaster:
    def update(self, state: Feature | None, step: int, value: Feature) -> Feature:
        # The reference is kept, not copied: diffusers blocks never write into a sub-module's output in place.
        return value

    def predict(self, state: Feature, step: int) -> Feature:
        return state

    def tensors(self, state: Feature) -> list[torch.Tensor]:
        return [t for t in state if t is not None]
