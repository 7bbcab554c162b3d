"""Fixed-interval schedules: the same decision for every unit, a full step every N steps.

Two anchorings appear in the papers and their code, and they differ at the ends of the run:

* ``TaylorSeerSchedule`` (TaylorSeer, Liu et al., ICCV 2025; official ``cal_type``): the first ``warmup``
  steps are computed; after them a counter makes every N-th step full, i.e. full steps are
  ``warmup - 1 + k*N``. The last step is not forced.
* ``FORASchedule`` (FORA, Selvaraju et al., arXiv 2407.01425; official ``boost_infer_static``): the loop
  index counts *down* (T-1 .. 0); a step is full when that index is divisible by N, and the first step is
  always full. In ascending steps s: full iff s == 0 or (T - 1 - s) % N == 0, so the last step is full.
  With the step count unknown, it falls back to s % N == 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from difcache.core import Action


@dataclass(frozen=True)
class TaylorSeerSchedule:
    interval: int
    warmup: int
    skip_action: Action = Action.FORECAST
    dynamic: ClassVar[bool] = False

    def decide(self, step: int, num_steps: int | None, unit: int) -> Action:
        if step < self.warmup or (step - max(self.warmup - 1, 0)) % self.interval == 0:
            return Action.COMPUTE
        return self.skip_action


@dataclass(frozen=True)
class FORASchedule:
    interval: int
    skip_action: Action = Action.REUSE
    dynamic: ClassVar[bool] = False

    def decide(self, step: int, num_steps: int | None, unit: int) -> Action:
        if step == 0:
            return Action.COMPUTE
        remaining = (num_steps - 1 - step) if num_steps is not None else step
        return Action.COMPUTE if remaining % self.interval == 0 else self.skip_action


@dataclass(frozen=True)
class AlwaysCompute:
    """Every unit computed every step: measures the engine's own overhead (hooks, bookkeeping)."""

    dynamic: ClassVar[bool] = False
    never_skips: ClassVar[bool] = True  # by design: no "nothing is cached" warning

    def decide(self, step: int, num_steps: int | None, unit: int) -> Action:
        return Action.COMPUTE
