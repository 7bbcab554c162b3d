"""Forecasters: what a unit returns on a step where it is not computed.

A forecaster keeps a small per-(branch, unit) state built from the unit's computed outputs and turns it into
an output for a later step. Outputs are lists of tensors (a unit may return a tuple, e.g. FLUX attention
returns image and text streams); ``None`` entries pass through. States are plain objects owned by the
engine's feature store, which reports their memory.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

Feature = list[torch.Tensor | None]


class Forecaster(Protocol):
    def update(self, state: Any, step: int, value: Feature) -> Any:
        """Fold the output computed at ``step`` into ``state`` (``None`` at the start of a run)."""

    def predict(self, state: Any, step: int) -> Feature | None:
        """The output to use at ``step`` from ``state``, or ``None`` if it would not be finite (recompute)."""

    def tensors(self, state: Any) -> list[torch.Tensor]:
        """Every tensor the state holds (for memory accounting)."""
