"""Stage-switch schedule (Δ-DiT, Chen et al., arXiv 2406.01125).

Two units, the front and the rear block range. Every ``interval``-th step (from step 0) is a full step for
both; in between, the rear range is reused before the boundary step ``boundary`` (early steps shape the
outline, which the front blocks carry) and the front range from the boundary on (late steps refine details,
carried by the rear blocks). The last step is full so the final details are computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from difcache.core import Action

FRONT, REAR = 0, 1


@dataclass(frozen=True)
class StageSwitchSchedule:
    interval: int
    boundary: int | float  # a step index, or a fraction of the run in (0, 1)
    dynamic: ClassVar[bool] = False

    def boundary_step(self, num_steps: int | None) -> int:
        if isinstance(self.boundary, float):
            return round(self.boundary * num_steps) if num_steps is not None else 10**9
        return self.boundary

    def decide(self, step: int, num_steps: int | None, unit: int) -> Action:
        if step % self.interval == 0 or (num_steps is not None and step == num_steps - 1):
            return Action.COMPUTE
        cached = REAR if step < self.boundary_step(num_steps) else FRONT
        return Action.REUSE if unit == cached else Action.COMPUTE
