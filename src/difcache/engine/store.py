"""Feature store: per (CFG branch, unit), the unit's last computed outputs, newest first, reset when a run starts.

Each entry is a unit output (its tensor leaves), the step it was computed at, and its *peak* (``max |x|``): a
0-dim tensor when stored, replaced by a float once the engine has read it (once per step, outside any compiled
graph), then used to refuse non-finite entries and forecasts that would overflow fp16. A forecaster keeps at
most ``history`` entries per slot, so memory is bounded by construction; it is measured for the stats.

Sequential CFG (Wan) runs cond and uncond as separate denoiser calls whose features differ; each branch gets its
own entries so one never forecasts from the other. Entries hold the module outputs themselves, not copies:
diffusers blocks never write into a sub-module's output in place (scopes that cannot promise this, the UNet's
deep path and ComfyUI's blocks, store copies).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difcache.core import Feature


@dataclass
class Entry:
    leaves: Feature
    step: int
    peak: torch.Tensor | float | None


class FeatureStore:
    def __init__(self, history: int) -> None:
        self.history = history
        self._slots: dict[tuple[str, int], list[Entry]] = {}

    def entries(self, branch: str, unit: int) -> list[Entry]:
        return self._slots.get((branch, unit), [])

    def push(self, branch: str, unit: int, entry: Entry) -> None:
        entries = self._slots.setdefault((branch, unit), [])
        entries.insert(0, entry)
        del entries[self.history :]

    def drop(self, branch: str, unit: int) -> None:
        self._slots.pop((branch, unit), None)

    def clear(self) -> None:
        self._slots.clear()

    def nbytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for entries in self._slots.values():
            for entry in entries:
                for t in entry.leaves:
                    if t is not None and id(t) not in seen:
                        seen.add(id(t))
                        total += t.numel() * t.element_size()
        return total
