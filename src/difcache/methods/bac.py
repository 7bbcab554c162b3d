"""BAC: Block-wise Adaptive Caching (Ji et al., "Block-wise Adaptive Caching for Accelerating Diffusion Policy",
arXiv 2506.13456, ICLR 2026; official code kyji/BAC, read through the public code index).

Scope: every unit of the layout on its own (:class:`~difcache.engine.scopes.ModuleScope`): the pre-gate outputs
of attention, cross-attention and FFN sub-modules, and whole single-stream blocks where the adapter caches those
(FLUX, HunyuanVideo). The paper caches the self-attention, cross-attention and FFN residual branches of each
decoder layer of a Diffusion-Policy transformer; the gates and modulation of diffusers' DiT blocks are
recomputed every step, as in FORA and TaylorSeer.

Two phases:

1. ``difcache.calibrate(pipe, "bac", call_kwargs=[...], num_inference_steps=T)`` runs the uncached pipeline and
   records each unit's output at every step, per call and CFG branch (a fixed seeded subsample of
   ``max_entries`` entries, :func:`~difcache.engine.calibration.subsample`). Per sample it builds each unit's ``[T, T]``
   similarity matrix and its volatility (:mod:`difcache.policies.bac`); the profile stores both, averaged over
   the samples (prompts × CFG branches). The *matrices* are stored, not a schedule, so the update budget is
   chosen when the cache is applied.
2. ``difcache.apply_cache(pipe, "bac", profile=..., budget=M)`` runs the Adaptive Caching Scheduler (a DP per
   unit), the Bubbling Union over the ``num_bu_units`` most volatile units, adds the last step, and installs the
   resulting table. Between its update steps a unit reuses its last output (``forecast="reuse"``, the paper) or
   extrapolates it to first order (``forecast="taylor"``, ours).

Defaults and choices:

* ``budget``: the paper uses M ∈ {5, 8, 10, 20} update steps for 100 DDPM steps. diffusers pipelines run 20-50
  steps, so the default is a *fraction*, ``0.2`` (the paper's most conservative ratio, 20 of 100): for 50 steps
  M = 10, the official README's example. An int is M itself (the official ``num_caches``), in ``[1, T]``.
* ``num_bu_units`` 3 (official ``num_bu_blocks`` default; 0 disables the union). The official wrapper applies
  the union only when at least two blocks are selected; here 1 selects one (deviation: the guard looks like a
  leftover of its disabled second phase).
* ``metric`` ``"cosine"`` (paper default); ``"l1"`` and ``"mse"`` are minimised. A profile holds the matrices of
  the metric it was calibrated with; applying it with another metric is an error that names both.
* ``force_last`` True: the official wrapper always updates step 99 of its 100 (on top of the M DP steps);
  generalised to the last step of any step count.
* Samples are averaged into one matrix per unit before the DP (the official code calibrates on one demo). The
  volatility is averaged the same way.

Usage::

    profile = difcache.calibrate(pipe, "bac", [dict(prompt=p) for p in prompts], num_inference_steps=50)
    profile.save("flux-50-bac.json")
    handle = difcache.apply_cache(pipe, "bac", profile="flux-50-bac.json", budget=10)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from difcache.adapters.layout import Layout
from difcache.config import CacheConfig, check_bool, check_choice, check_int, check_profile
from difcache.core import Plan
from difcache.engine.scopes.module import ModuleScope
from difcache.errors import DifcacheError
from difcache.forecasters import FORECASTS, skipped_step
from difcache.methods.registry import register_method
from difcache.policies.bac import (
    METRICS,
    MINIMISED,
    bubbling_union,
    most_volatile,
    optimal_update_steps,
)
from difcache.policies.table import TableSchedule
from difcache.profile import Profile


@dataclass(frozen=True)
class BACConfig(CacheConfig):
    """Args:
    budget: update steps per unit chosen by the DP, step 0 included: an int M in ``[1, T]``, or a float in
        ``(0, 1]``, the fraction of the profile's T steps (``M = max(1, round(budget·T))``). Default 0.2.
    num_bu_units: how many of the most volatile units take part in the Bubbling Union (0 disables it). Default 3.
    metric: similarity between steps, ``"cosine"`` (maximised), ``"l1"`` or ``"mse"`` (minimised). Default cosine.
    forecast: what a skipped step returns, ``"reuse"`` (paper) or ``"taylor"`` (first-order Taylor, ours).
    force_last: also compute every unit at the last step (official wrapper). Default True.
    max_entries: entries of each unit output recorded during calibration (a seeded subsample when larger).
    profile: a BAC profile from ``difcache.calibrate`` (path or :class:`~difcache.profile.Profile`); required by
        ``apply_cache``.
    """

    method: ClassVar[str] = "bac"
    budget: int | float = 0.2
    num_bu_units: int = 3
    metric: str = "cosine"
    forecast: str = "reuse"
    force_last: bool = True
    max_entries: int = 8192
    profile: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        budget = self.budget
        if isinstance(budget, bool) or not isinstance(budget, int | float):
            raise TypeError(
                f"BACConfig.budget must be an int >= 1 (update steps) or a float in (0, 1] (fraction of the steps), "
                f"got {budget!r}."
            )
        if isinstance(budget, int) and budget < 1:
            raise ValueError(f"BACConfig.budget must be an int >= 1 (update steps), got {budget}.")
        if isinstance(budget, float) and not (math.isfinite(budget) and 0.0 < budget <= 1.0):
            raise ValueError(f"BACConfig.budget as a fraction of the steps must be in (0, 1], got {budget}.")
        check_int(self, "num_bu_units", 0)
        check_choice(self, "metric", METRICS)
        check_choice(self, "forecast", FORECASTS)
        check_bool(self, "force_last")
        check_int(self, "max_entries", 1)
        check_profile(self)

    def update_budget(self, num_steps: int) -> int:
        """M for a run of ``num_steps`` steps; an int budget larger than ``num_steps`` is an error."""
        if isinstance(self.budget, float):
            return max(1, round(self.budget * num_steps))
        if self.budget > num_steps:
            raise DifcacheError(
                f"BACConfig.budget must be in [1, {num_steps}] for this {num_steps}-step profile, got {self.budget}; "
                f"pass a smaller budget, a fraction such as budget=0.2, or recalibrate with more steps."
            )
        return self.budget


# ---------------------------------------------------------------------------------------------- the schedule
@dataclass(frozen=True)
class BACPlanData:
    """What a profile gives the scheduler: per unit its ``[T, T]`` matrix and its volatility."""

    metric: str
    similarity: tuple[tuple[tuple[float, ...], ...], ...]
    volatility: tuple[float, ...]


def schedule(
    data: BACPlanData, kinds: list[str], blocks: list[int], budget: int, num_bu_units: int, force_last: bool
) -> list[tuple[int, ...]]:
    """Per unit, its update steps: ACS per unit, Bubbling Union over the most volatile units, last step."""
    minimize = data.metric in MINIMISED
    acs = [optimal_update_steps(matrix, budget, minimize) for matrix in data.similarity]
    steps = bubbling_union(acs, kinds, blocks, most_volatile(data.volatility, num_bu_units))
    if force_last:
        last = len(data.similarity[0]) - 1
        steps = [tuple(sorted({*s, last})) for s in steps]
    return steps


def _read_profile(config: BACConfig, layout: Layout) -> tuple[Profile, BACPlanData]:
    """The profile's matrices and volatilities, checked against the layout, with errors naming the bad field."""
    usage = ("profile = difcache.calibrate(pipe, 'bac', call_kwargs=[...], num_inference_steps=N), then "
             "difcache.apply_cache(pipe, 'bac', profile=profile, budget=10).")  # fmt: skip
    profile = Profile.for_model(config.profile, "bac", layout, usage)
    steps, units = profile.num_steps, len(layout.units)
    metric = profile.matching("metric", METRICS, config.metric)
    matrices = profile.matrices("similarity", units, steps)
    vol = profile.numbers("volatility", length=units, lo=0.0)
    similarity = tuple(tuple(tuple(row) for row in m) for m in matrices)
    return profile, BACPlanData(metric, similarity, tuple(float(v) for v in vol))  # type: ignore[arg-type]


def _check_units(layout: Layout) -> None:
    if not layout.units:
        raise DifcacheError(
            f"BAC caches attention/FFN units, and {type(layout.model).__name__} has none; for UNets without "
            "transformer blocks use method='deepcache'."
        )


@register_method(BACConfig, "BAC: per-unit update steps by DP on calibrated similarities, bubbling union")
def build(config: BACConfig, layout: Layout) -> Plan:
    _check_units(layout)
    profile, data = _read_profile(config, layout)
    budget = config.update_budget(profile.num_steps)
    kinds = [u.kind for u in layout.units]
    blocks = [u.block for u in layout.units]
    steps = schedule(data, kinds, blocks, budget, config.num_bu_units, config.force_last)
    skip_action, forecaster = skipped_step(config.forecast)
    origin = ("BAC profile", profile.remedy)
    policy = TableSchedule(tuple(frozenset(s) for s in steps), profile.num_steps, skip_action, origin)
    return Plan(ModuleScope(layout.units), policy, forecaster)
