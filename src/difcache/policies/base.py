"""Policies decide, per step and unit, whether to compute, reuse or forecast.

A *static* policy (:class:`~difcache.core.StaticPolicy`) is a pure function of (step, number of steps, unit): the
engine turns it into a table with :func:`schedule_table` when a run starts, so per-step decisions read no
tensors, need no host-device synchronisation and are identical on every rank. A *dynamic* policy
(:class:`~difcache.core.DynamicPolicy`: TeaCache, first-block) reads a live signal once per step and says so.
Steps are counted from the run's first step (img2img runs start part-way through the schedule).
"""

from __future__ import annotations

from difcache.core import Action, DynamicPolicy, StaticPolicy

__all__ = ["DynamicPolicy", "StaticPolicy", "schedule_string", "schedule_table"]


def schedule_table(policy: StaticPolicy, num_steps: int, num_units: int) -> list[list[Action]]:
    """The policy's decisions as ``table[step][unit]`` (what the engine executes)."""
    return [[policy.decide(s, num_steps, u) for u in range(num_units)] for s in range(num_steps)]


def schedule_string(policy: StaticPolicy, num_steps: int, unit: int = 0) -> str:
    """Compact view of one unit's schedule, e.g. ``"CCCFFFFFC"`` (C compute, R reuse, F forecast)."""
    letters = {Action.COMPUTE: "C", Action.REUSE: "R", Action.FORECAST: "F"}
    return "".join(letters[policy.decide(s, num_steps, unit)] for s in range(num_steps))
