"""A schedule given as a table: each unit is computed at its listed steps and skipped at the others.

Calibrated methods produce one: BAC's per-unit update steps (:mod:`difcache.policies.bac`), ERTACache's reuse set
(the same set for every unit), ``autotune``'s fitted schedule. It was made for one step count, and running
another is an error that names the count to use, because step ``i`` of a 30-step run is not step ``i`` of a
50-step run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from difcache.core import Action
from difcache.errors import DifcacheError


@dataclass(frozen=True)
class TableSchedule:
    """Args:
    compute: per unit, the steps at which it is computed; a single set applies to every unit.
    num_steps: the step count the table was made for.
    skip_action: what a skipped step does (REUSE or FORECAST).
    origin: what made the table and how to make another, for error messages (e.g. ``"BAC profile", "recalibrate"``).
    """

    compute: tuple[frozenset[int], ...]
    num_steps: int
    skip_action: Action = Action.REUSE
    origin: tuple[str, str] = ("schedule", "recalibrate")
    dynamic: ClassVar[bool] = False

    def decide(self, step: int, num_steps: int | None, unit: int) -> Action:
        if num_steps is not None and num_steps != self.num_steps:
            what, remedy = self.origin
            raise DifcacheError(
                f"This {what} was made for {self.num_steps} steps, but the pipeline runs {num_steps}; call the "
                f"pipeline with num_inference_steps={self.num_steps} or {remedy}."
            )
        if step >= self.num_steps:  # unknown step count (bare module) running past the table: compute
            return Action.COMPUTE
        steps = self.compute[unit if len(self.compute) > 1 else 0]
        return Action.COMPUTE if step in steps else self.skip_action

    @classmethod
    def from_skips(cls, skip: tuple[bool, ...], skip_action: Action, origin: tuple[str, str]) -> TableSchedule:
        """The same skipped steps for every unit: ``skip[i]`` says whether step ``i`` is skipped."""
        compute = frozenset(i for i, skipped in enumerate(skip) if not skipped)
        return cls((compute,), len(skip), skip_action, origin)
