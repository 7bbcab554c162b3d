"""``autotune``'s profiles as a method: the scope, the per-unit schedule and the fitted forecast weights that
:func:`difcache.autotune` chose for one model, budget and step count (:mod:`difcache.tuning`), executed as a
static table (compile-clean like every static method).

    profile = difcache.autotune(pipe, speedup=3.0, call_kwargs=[...], num_inference_steps=50)
    difcache.apply_cache(pipe, profile=profile)          # or profile="dit-3x.json"

Scopes a profile can name: ``"ranges"`` (contiguous block ranges, each one residual: the whole stack is
TaylorSeer-Lite's scope, two ranges with the first block alone is first-block cache's), ``"modules"`` (every
attention / FFN unit before its gate) and ``"skip_branch"`` (a UNet's deep path below one skip branch, DeepCache's).
A profile is refused for another model layout, step count or scheduler class, with the fix (re-run autotune).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from difcache.adapters.layout import Layout
from difcache.config import CacheConfig, check_profile
from difcache.core import Action, Plan
from difcache.engine.scopes.block_range import BlockRangeScope
from difcache.engine.scopes.module import ModuleScope
from difcache.engine.scopes.skip_branch import SkipBranchScope
from difcache.errors import DifcacheError
from difcache.forecasters.fitted import FittedForecaster
from difcache.methods.registry import register_method
from difcache.policies.table import TableSchedule
from difcache.profile import Profile

SCOPES = ("ranges", "modules", "skip_branch")
USAGE = "profile = difcache.autotune(pipe, speedup=3.0, call_kwargs=[...], num_inference_steps=N)."


@dataclass(frozen=True)
class AutotuneConfig(CacheConfig):
    """Args:
    profile: a profile from ``difcache.autotune`` (path or :class:`~difcache.profile.Profile`); required.
    """

    method: ClassVar[str] = "autotune"
    profile: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_profile(self)


def _scope(profile: Profile, layout: Layout) -> Any:
    scope = profile.choice("scope", SCOPES)
    if scope == "ranges":
        ranges = profile.value("ranges")
        if not isinstance(ranges, list) or not ranges:
            raise profile.bad("ranges", "must be a non-empty list of [first, last] block indices")
        return BlockRangeScope(layout, [tuple(r) for r in ranges])
    if scope == "skip_branch":
        branch = profile.value("branch")
        if not isinstance(branch, int) or not 0 <= branch < len(layout.branches):
            raise profile.bad("branch", f"must be a skip branch of this UNet, 0..{len(layout.branches) - 1}")
        return SkipBranchScope(layout, branch)
    return ModuleScope(layout.units)


def _units(profile: Profile, count: int) -> tuple[tuple[frozenset[int], ...], FittedForecaster]:
    steps = profile.num_steps
    units = profile.value("units")
    if not isinstance(units, list) or len(units) != count:
        raise profile.bad("units", f"must hold one entry per cached unit ({count})")
    compute, table, history = [], [], 1
    for i, unit in enumerate(units):
        if not isinstance(unit, dict) or not isinstance(unit.get("compute"), list) or 0 not in unit["compute"]:
            raise profile.bad(f"units[{i}].compute", "must list the computed steps, step 0 included")
        if not all(isinstance(s, int) and 0 <= s < steps for s in unit["compute"]):
            raise profile.bad(f"units[{i}].compute", f"must hold steps in [0, {steps - 1}]")
        fitted = {}
        for key, value in dict(unit.get("weights", {})).items():
            entries, w = value.get("entries"), value.get("w")
            if not (isinstance(entries, list) and isinstance(w, list) and 0 < len(w) <= len(entries)):
                raise profile.bad(f"units[{i}].weights[{key}]", "must hold `entries` and as many or fewer `w`")
            fitted[int(key)] = (tuple(entries[: len(w)]), tuple(float(x) for x in w))
            history = max(history, len(w))
        compute.append(frozenset(unit["compute"]))
        table.append(fitted)
    return tuple(compute), FittedForecaster(tuple(table), history)


@register_method(AutotuneConfig, "autotune: schedule, scope and forecast fitted to the model and budget")
def build(config: AutotuneConfig, layout: Layout) -> Plan:
    profile = Profile.for_model(config.profile, "autotune", layout, USAGE)
    scope = _scope(profile, layout)
    compute, forecaster = _units(profile, len(scope.units))
    policy = TableSchedule(compute, profile.num_steps, Action.FORECAST, ("autotune profile", profile.remedy))
    notes = (("profile", f"{profile.data.get('name', '?')}, ideal {profile.data.get('ideal_speedup', 0):.2f}x"),)
    return Plan(scope, policy, forecaster, (_scheduler_check(profile),), notes)


def _scheduler_check(profile: Profile) -> Any:
    """A plan extra: refuse, at the start of every run, a scheduler other than the one the profile was made with."""

    def install(runtime: Any) -> Any:
        def check() -> None:
            schedulers = runtime.tracker._schedulers
            name = type(schedulers[-1]).__name__ if schedulers else ""
            if profile.scheduler and name and name != profile.scheduler:
                raise DifcacheError(
                    f"This autotune profile was made with a {profile.scheduler}, but the pipeline now runs a {name}; "
                    f"{profile.remedy} with this scheduler."
                )

        check()
        return runtime.tracker.on_new_run(check)

    return install
