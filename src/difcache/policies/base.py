"""Policies decide, per step and unit, whether to compute, reuse or forecast.

A *static* policy is a pure function of (step, number of steps, unit): the engine turns it into a table of
Python ints when a run starts, so per-step decisions read no tensors, need no host-device synchronisation and
are identical on every rank. A *dynamic* policy (TeaCache, first-block) reads live tensors and must say so.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from difcache.engine.actions import Action


class StaticPolicy(Protocol):
    """A schedule known before the run starts."""

    dynamic: ClassVar[bool]

    def decide(self, step: int, num_steps: int | None, unit: int) -> Action: ...


class DynamicPolicy(Protocol):
    """A rule that reads a live signal once per step; it keeps per-run state created by ``new_state``."""

    dynamic: ClassVar[bool]

    def new_state(self) -> Any: ...

    def decide_live(self, state: Any, info: Any, signal: Any) -> Action: ...


def schedule_table(policy: StaticPolicy, num_steps: int, num_units: int) -> list[list[Action]]:
    """The policy's decisions as ``table[step][unit]``."""
    return [[policy.decide(s, num_steps, u) for u in range(num_units)] for s in range(num_steps)]


def schedule_string(policy: StaticPolicy, num_steps: int, unit: int = 0) -> str:
    """Compact view of one unit's schedule, e.g. ``"CCCFFFFFC"`` (C compute, R reuse, F forecast)."""
    letters = {Action.COMPUTE: "C", Action.REUSE: "R", Action.FORECAST: "F"}
    return "".join(letters[policy.decide(s, num_steps, unit)] for s in range(num_steps))
