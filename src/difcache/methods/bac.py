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
   ``max_entries`` entries, :func:`~difcache.calibration.subsample`). Per sample it builds each unit's ``[T, T]``
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

import torch
from torch.utils._pytree import tree_flatten

from difcache.adapters.layout import Layout
from difcache.calibration import CalibrationSession
from difcache.config import CacheConfig, check_choice, check_int
from difcache.engine.plan import Plan
from difcache.engine.scopes import ModuleScope
from difcache.errors import DifcacheError
from difcache.forecasters import FORECASTS, skipped_step
from difcache.methods.registry import register_calibrator, register_method
from difcache.policies.bac import (
    METRICS,
    MINIMISED,
    BACSchedule,
    bubbling_union,
    most_volatile,
    optimal_update_steps,
    similarity_matrix,
    volatility,
)
from difcache.profile import Profile

_DIGITS = 7  # significant digits kept in the profile's JSON


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
        if not isinstance(self.force_last, bool):
            raise TypeError(f"BACConfig.force_last must be True or False, got {self.force_last!r}.")
        check_int(self, "max_entries", 1)
        if (
            self.profile is not None
            and not isinstance(self.profile, Profile | str)
            and not hasattr(self.profile, "__fspath__")
        ):
            raise TypeError(
                f"BACConfig.profile must be a path or a difcache.Profile, got {type(self.profile).__name__}."
            )

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
    if config.profile is None:
        raise DifcacheError(
            "BAC needs a calibration profile: profile = difcache.calibrate(pipe, 'bac', call_kwargs=[...], "
            "num_inference_steps=N), then difcache.apply_cache(pipe, 'bac', profile=profile, budget=10)."
        )
    profile = Profile.load(config.profile)
    profile.check("bac", type(layout.model).__name__, layout.fingerprint)
    data, steps, units = profile.data, profile.num_steps, len(layout.units)

    def bad(name: str, why: str) -> DifcacheError:
        return DifcacheError(f"BAC profile: field `data.{name}` {why}; recalibrate with difcache.calibrate.")

    metric = data.get("metric")
    if metric not in METRICS:
        raise bad("metric", f"must be one of {list(METRICS)}, got {metric!r}")
    if metric != config.metric:
        raise DifcacheError(
            f"This BAC profile holds {metric!r} similarity matrices, but metric={config.metric!r} was asked for; "
            f"apply it with metric={metric!r}, or recalibrate with metric={config.metric!r}."
        )
    similarity = data.get("similarity")
    if not isinstance(similarity, list) or len(similarity) != units:
        raise bad("similarity", f"must be a list of one [{steps} x {steps}] matrix per unit ({units} units)")
    matrices = []
    for u, matrix in enumerate(similarity):
        if not isinstance(matrix, list) or len(matrix) != steps:
            raise bad(f"similarity[{u}]", f"must be a {steps} x {steps} matrix")
        rows = []
        for row in matrix:
            if not isinstance(row, list) or len(row) != steps or not all(_finite(v) for v in row):
                raise bad(f"similarity[{u}]", f"must be a {steps} x {steps} matrix of finite numbers")
            rows.append(tuple(float(v) for v in row))
        matrices.append(tuple(rows))
    vol = data.get("volatility")
    if not isinstance(vol, list) or len(vol) != units or not all(_finite(v) and v >= 0 for v in vol):
        raise bad("volatility", f"must be a list of {units} finite numbers >= 0 (one per unit)")
    return profile, BACPlanData(metric, tuple(matrices), tuple(float(v) for v in vol))


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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
    policy = BACSchedule(tuple(frozenset(s) for s in steps), profile.num_steps, skip_action, profile)
    return Plan(ModuleScope(layout.units), policy, forecaster)


# ---------------------------------------------------------------------------------------------- calibration
class _Subsampler:
    """The entries :func:`~difcache.calibration.subsample` picks, with the index drawn once per (size, device).

    ``subsample`` draws a seeded permutation of all entries on every call. BAC records every unit at every step,
    and on a FLUX-size unit output (~10M entries) that permutation costs ~0.3 s on a CPU core, most of the
    calibration. The permutation depends only on the size (seed ``0 + numel``, as in ``subsample``), so it is
    drawn once and kept; ``tests/test_bac.py`` checks that the entries are the ones ``subsample`` picks.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._index: dict[tuple[int, torch.device], torch.Tensor] = {}

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        flat = tensor.detach().reshape(-1)
        numel = flat.numel()
        if numel <= self.max_entries:
            return flat.float().clone()
        key = (numel, flat.device)
        index = self._index.get(key)
        if index is None:
            gen = torch.Generator().manual_seed(numel)
            index = self._index[key] = torch.randperm(numel, generator=gen)[: self.max_entries].to(flat.device)
        return flat[index].float()


def _flat_output(output: Any, sampler: _Subsampler) -> torch.Tensor:
    """All tensor leaves of a unit's output, flattened and concatenated, as a fixed subsample (fp32)."""
    leaves, _ = tree_flatten(output)
    tensors = [leaf.detach().reshape(-1) for leaf in leaves if isinstance(leaf, torch.Tensor)]
    if not tensors:
        raise DifcacheError("BAC calibration: a unit returned no tensor; this model's adapter is not supported.")
    return sampler(tensors[0] if len(tensors) == 1 else torch.cat([t.float() for t in tensors]))


@register_calibrator(BACConfig)
def calibrate(config: BACConfig, layout: Layout, session: CalibrationSession, call_kwargs: list) -> dict:
    """Record every unit's output at every step of each call and CFG branch; return the mean similarity
    matrices and volatilities (see the module docstring)."""
    _check_units(layout)
    num_steps = session.num_steps
    units = len(layout.units)
    # (call, branch, unit) -> {step: features}; reduced and dropped as soon as all steps are in.
    pending: dict[tuple[int, str, int], dict[int, torch.Tensor]] = {}
    sums: list[torch.Tensor | None] = [None] * units
    vol_sums = [0.0] * units
    samples: dict[int, set[tuple[int, str]]] = {u: set() for u in range(units)}
    sampler = _Subsampler(config.max_entries)

    def reduce(key: tuple[int, str, int], record: dict[int, torch.Tensor]) -> None:
        unit = key[2]
        sizes = {t.numel() for t in record.values()}
        if len(sizes) != 1:
            raise DifcacheError(
                f"BAC calibration: {layout.units[unit].name} changed its output size within a run ({sorted(sizes)}); "
                "calibrate with a fixed resolution and batch size."
            )
        features = torch.stack([record[s] for s in range(num_steps)])
        matrix = similarity_matrix(features, config.metric)
        sums[unit] = matrix if sums[unit] is None else sums[unit] + matrix
        vol_sums[unit] += volatility(features)
        samples[unit].add(key[:2])

    def recorder(unit: int) -> Any:
        def record(info: Any, args: tuple, kwargs: dict, output: Any) -> None:
            if info.step >= num_steps:
                return
            key = (session.call_index, info.branch, unit)
            steps = pending.setdefault(key, {})
            steps[info.step] = _flat_output(output, sampler)
            if len(steps) == num_steps:
                reduce(key, pending.pop(key))

        return record

    for i, unit in enumerate(layout.units):
        session.probe(unit.module, recorder(i))
    session.run(call_kwargs, desc="bac calibration")
    if pending:
        (call, branch, unit), record = next(iter(pending.items()))
        missing = [s for s in range(num_steps) if s not in record]
        raise DifcacheError(
            f"BAC calibration: call {call} (branch {branch!r}) ran no {layout.units[unit].name} at steps "
            f"{missing[:5]}; calibrate full {num_steps}-step runs (no img2img strength)."
        )
    for u, matrix in enumerate(sums):
        if matrix is None:
            raise DifcacheError(
                f"BAC calibration: unit {layout.units[u].name} never ran; check that the pipeline calls the denoiser."
            )
    counts = {len(s) for s in samples.values()}
    if len(counts) != 1:
        raise DifcacheError("BAC calibration: units ran in different numbers of calls/branches; cannot average.")
    n = counts.pop()
    return {
        "metric": config.metric,
        "units": [u.name for u in layout.units],
        "similarity": [[[_round(v) for v in row] for row in (m / n).tolist()] for m in sums],  # type: ignore[operator]
        "volatility": [_round(v / n) for v in vol_sums],
        "samples": n,
        "entries": config.max_entries,
    }


def _round(value: float) -> float:
    return float(f"{value:.{_DIGITS}g}")
