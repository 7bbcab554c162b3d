"""Feature store: per (CFG branch, unit) forecaster state, reset when a run starts.

Sequential CFG (Wan) runs cond and uncond as separate denoiser calls whose features differ; each branch gets
its own slot so one never forecasts from the other. Memory is bounded by construction (each forecaster keeps
a fixed number of tensors per slot) and measured for the stats.
"""

from __future__ import annotations

from typing import Any

from difcache.forecasters.base import Forecaster


class FeatureStore:
    def __init__(self, forecaster: Forecaster) -> None:
        self.forecaster = forecaster
        self._slots: dict[tuple[str, int], Any] = {}

    def get(self, branch: str, unit: int) -> Any:
        return self._slots.get((branch, unit))

    def put(self, branch: str, unit: int, state: Any) -> None:
        self._slots[(branch, unit)] = state

    def clear(self) -> None:
        self._slots.clear()

    def nbytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for state in self._slots.values():
            for t in self.forecaster.tensors(state):
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return total
