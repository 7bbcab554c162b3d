"""``difcache.autotune``: the schedule, scope and forecast fitted to one model, budget and step count.

1. **Record** (:mod:`.record`): one uncached pass over the calibration calls.
2. **Search** (:mod:`.search`), offline, for every candidate scope: the whole block stack as one residual
   (TaylorSeer-Lite's scope), block ranges each with its own budget (the first block alone, then the rest: a
   static first-block cache; halves; every block), every attention/FFN unit on one shared schedule (TaylorSeer's
   and FORA's scope) and, for UNets, the deep path below each skip branch (DeepCache's). Per scope unit and
   forecaster family (reuse, Taylor orders 1-3, affine fits over the last 2 or 3 computed features), an exact dynamic
   program gives the best compute set for every number of computed steps; a knapsack then splits the FLOPs
   budget over the units of a scope. Every candidate's ideal speedup is at least the one asked for, and as close
   to it as the scope's granularity allows.
3. **Choose on the final output**: the candidates are run for real on the calibration calls (same noise as the
   recording) and the one whose outputs are closest to the uncached ones (PSNR) wins; a short hill climb then
   moves its computed steps one at a time while that improves the calibration PSNR (``refine``). The proxy
   optimised offline is the scheduler-gain-weighted squared forecast error (:mod:`.search`); it ranks
   candidates, the final output decides. How well it ranks them (Spearman's ρ against the calibration PSNR, per
   scope) is stored in the profile (``data["proxy_tracking"]``, :func:`proxy_tracking`) and reported in
   ``BENCHMARKS.md``.

The result is a :class:`~difcache.profile.Profile` (method ``"autotune"``) that ``apply_cache`` executes as a
static table: ``difcache.apply_cache(pipe, profile=profile)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from difcache.adapters import layout_of
from difcache.adapters.layout import Layout
from difcache.denoiser import check_calibration_call, find_denoiser
from difcache.errors import DifcacheError
from difcache.profile import Profile
from difcache.tuning.record import Recording, Replay, pipeline_output, record
from difcache.tuning.search import (
    FAMILIES,
    allocate,
    best_schedules,
    error_tables,
    gram,
    history_of,
    schedule_cost,
    step_costs,
    weights,
)
from difcache.version import __version__

SCOPES = ("ranges", "modules", "skip_branch")  # what a candidate caches (see autotune's ``scopes``)
TOLERANCE = 0.025  # how far above the asked speedup a profile's ideal speedup may be
REFINED = 2  # candidates the hill climb starts from


@dataclass
class UnitPlan:
    """One cached unit of a candidate: its computed steps and forecaster family."""

    compute: tuple[int, ...]
    family: str


@dataclass
class Candidate:
    name: str
    scope: str  # "ranges" | "modules" | "skip_branch"
    units: list[UnitPlan]
    grams: list[np.ndarray] = field(repr=False)
    skipped_flops: list[float] = field(repr=False)  # per unit, FLOPs a skipped step saves
    ranges: list[tuple[int, int]] | None = None
    branch: int | None = None
    proxy: float = math.inf
    ideal: float = 1.0
    psnr: float | None = None


def _ideal(rec: Recording, cand: Candidate) -> float:
    t = rec.num_steps
    saved = sum((t - len(u.compute)) * f for u, f in zip(cand.units, cand.skipped_flops, strict=True))
    return t * rec.flops_call / max(t * rec.flops_call - saved, 1e-9)


def _weights_of(cand: Candidate) -> list[dict[str, dict[str, list]]]:
    """Per unit, the forecast weights of every skipped step for the history its compute set implies."""
    out = []
    for unit, g in zip(cand.units, cand.grams, strict=True):
        computed, fitted, history = set(unit.compute), {}, []
        for s in range(g.shape[0]):
            if s in computed:
                history.insert(0, s)
                continue
            entries = tuple(history[: history_of(unit.family)])
            w = weights(g, unit.family, s, entries)
            fitted[str(s)] = {"entries": list(entries), "w": [float(x) for x in w]}
        out.append(fitted)
    return out


def _profile(cand: Candidate, rec: Recording, layout: Layout, speedup: float, extra: dict) -> Profile:
    data: dict[str, Any] = {
        "name": cand.name,
        "scope": cand.scope,
        "units": [
            {"compute": list(u.compute), "family": u.family, "weights": w}
            for u, w in zip(cand.units, _weights_of(cand), strict=True)
        ],
        "ideal_speedup": cand.ideal,
        "proxy": cand.proxy,
        "calibration_psnr": cand.psnr,
        **extra,
    }
    if cand.ranges is not None:
        data["ranges"] = [list(r) for r in cand.ranges]
    if cand.branch is not None:
        data["branch"] = cand.branch
    return Profile(
        method="autotune", model_class=type(layout.model).__name__, fingerprint=layout.fingerprint,
        num_steps=rec.num_steps, data=data, config={"method": "autotune", "speedup": speedup},
        version=Profile.VERSION, difcache_version=__version__, scheduler=rec.scheduler,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ candidates
def _allocated(
    name: str, scope: str, grams: list[np.ndarray], work: list[float], rec: Recording, speedup: float, family: str,
    **where: Any,
) -> Candidate | None:  # fmt: skip
    """Units with their own budgets (block ranges): the knapsack over their error curves, one family."""
    t = rec.num_steps
    budget = t * rec.flops_call / speedup - t * (rec.flops_call - sum(work))  # FLOPs the units may spend
    schedules = [best_schedules(error_tables(g, rec.gains, family)) for g in grams]
    curves = [{m: plan.cost for m, plan in found.items()} for found in schedules]
    try:
        counts = allocate(curves, work, budget)
    except ValueError:
        return None
    units = [UnitPlan(found[m].compute, family) for found, m in zip(schedules, counts, strict=True)]
    cand = Candidate(f"{name} / {family}", scope, units, grams, work, **where)
    cand.proxy = float(sum(curve[m] for curve, m in zip(curves, counts, strict=True)))
    cand.ideal = _ideal(rec, cand)
    return cand


def _most_steps(rec: Recording, saved_per_step: float, speedup: float) -> int:
    """The most computed steps a shared schedule may have and still reach ``speedup`` (0 if none)."""
    t = rec.num_steps
    for m in range(t, 0, -1):
        if t * rec.flops_call / max(t * rec.flops_call - (t - m) * saved_per_step, 1e-9) >= speedup:
            return m
    return 0


def _shared(
    name: str, scope: str, grams: list[np.ndarray], work: list[float], rec: Recording, speedup: float,
    family: str, **where: Any,
) -> Candidate | None:  # fmt: skip
    """Units on one shared schedule (every attention/FFN unit; a UNet's deep path): the best schedule with the most
    computed steps that still reach ``speedup``; the units' errors normalised by their energy and summed."""
    m = _most_steps(rec, sum(work), speedup)
    if m == 0:
        return None
    t = rec.num_steps
    table = sum(error_tables(g, rec.gains, family) / _energy(g, t) for g in grams)
    plan = best_schedules(table, m)[m]
    cand = Candidate(name, scope, [UnitPlan(plan.compute, family) for _ in grams], grams, work, proxy=plan.cost,
                     **where)  # fmt: skip
    cand.ideal = _ideal(rec, cand)
    return cand


def _fixed(rec: Recording, gram_: np.ndarray, work: float, speedup: float, family: str, last: int) -> list[Candidate]:
    """TaylorSeer's schedules (``warmup`` full steps, then one every ``interval``) that fit the budget, each at
    the interval closest to it: the hand-set schedules, run beside the searched ones when their ideal speedup
    lands within TOLERANCE of the budget (so the result is then never worse on the calibration calls)."""
    from difcache.policies import TaylorSeerSchedule, schedule_string

    out = []
    for warmup in range(1, 6):
        for interval in range(2, rec.num_steps):
            pattern = schedule_string(TaylorSeerSchedule(interval, warmup), rec.num_steps)
            compute = tuple(s for s, c in enumerate(pattern) if c == "C")
            cand = Candidate(f"stack, TaylorSeer N={interval} W={warmup} / {family}", "ranges",
                             [UnitPlan(compute, family)], [gram_], [work], ranges=[(0, last)])  # fmt: skip
            cand.ideal = _ideal(rec, cand)
            if cand.ideal >= speedup:
                cand.proxy = proxy(cand, rec)
                out.append(cand)
                break
    return out


def proxy(cand: Candidate, rec: Recording) -> float:
    """A candidate's proxy as the search scores it: summed over its units, each unit's error relative to its
    energy where the units share one schedule (their outputs differ in scale), absolute where each has its own
    budget (block ranges: residuals of one stream, so their errors add up to the output's)."""
    total = 0.0
    for unit, g in zip(cand.units, cand.grams, strict=True):
        cost = schedule_cost(error_tables(g, rec.gains, unit.family), unit.compute)
        total += cost if cand.scope == "ranges" else cost / _energy(g, rec.num_steps)
    return total


def _energy(g: np.ndarray, steps: int) -> float:
    return max(float(np.trace(g)) / steps, 1e-30)


def _partitions(blocks: int) -> list[tuple[str, list[tuple[int, int]]]]:
    last = blocks - 1
    out = [("stack", [(0, last)])]
    if blocks >= 2:
        out.append(("first block + rest", [(0, 0), (1, last)]))
    if blocks >= 4:
        out.append(("halves", [(0, blocks // 2 - 1), (blocks // 2, last)]))
    if 2 < blocks <= 12:
        out.append(("every block", [(b, b) for b in range(blocks)]))
    return out


def range_residual(rec: Recording, first: int, end: int) -> torch.Tensor:
    """The residual of blocks ``first..end`` as one cached range sees it: the sum of the blocks' residuals per
    stream (they telescope), the text stream's only where every block of the range returns it (as
    :class:`~difcache.engine.scopes.block_range.BlockRangeScope` caches it)."""
    members = range(first, end + 1)
    parts = [sum(rec.blocks[b] for b in members)]
    texts = [rec.blocks_text[b] for b in members] if rec.blocks_text else [None]
    if all(t is not None for t in texts):
        parts.append(sum(texts))
    return torch.cat(parts, dim=-1)


def candidates(rec: Recording, speedup: float, families: Sequence[str] = FAMILIES) -> list[Candidate]:
    """Every candidate scope and forecaster family with its best schedule at ``speedup`` (module docstring)."""
    out: list[Candidate | None] = []
    for branch, feature in rec.deep.items():  # UNets
        grams, work = [gram(feature)], [rec.flops_deep[branch]]
        for family in families:
            out.append(_shared(f"deep path below branch {branch} / {family}", "skip_branch", grams, work, rec,
                               speedup, family, branch=branch))  # fmt: skip
    last = len(rec.blocks) - 1
    for name, ranges in _partitions(len(rec.blocks)) if rec.blocks else ():
        features = [range_residual(rec, first, end) for first, end in ranges]
        grams = [gram(f) for f in features]
        work = [sum(rec.flops_blocks[first : end + 1]) for first, end in ranges]
        for family in families:
            out.append(_allocated(name, "ranges", grams, work, rec, speedup, family, ranges=ranges))
        if name == "stack":
            for family in ("taylor", "taylor2"):
                out += _fixed(rec, grams[0], work[0], speedup, family, last) if family in families else []
    if rec.units:
        grams, work = [gram(u) for u in rec.units], rec.flops_units
        for family in families:
            out.append(_shared(f"modules / {family}", "modules", grams, work, rec, speedup, family))
    return [c for c in out if c is not None]


# ------------------------------------------------------------------------------------------------ closed loop
def psnr(output: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """PSNR of each image (first dimension) of ``output`` against ``reference``, with their data range (1 for
    [0, 1] images, 255 for uint8-like), as ``difcache bench`` reports it."""
    peak = 255.0 if float(reference.max()) > 2.0 else 1.0
    mse = (output.float() - reference.float()).pow(2).flatten(1).mean(dim=1)
    return [math.inf if m == 0 else 10 * math.log10(peak**2 / float(m)) for m in mse]


def _evaluator(pipe: Any, rec: Recording, layout: Layout, replay: Replay, speedup: float, apply: Callable) -> Callable:
    def evaluate(cand: Candidate) -> float:
        handle = apply(pipe, profile=_profile(cand, rec, layout, speedup, {}))
        try:
            scores = []
            with torch.no_grad():
                for kwargs, reference in zip(replay, rec.outputs, strict=True):
                    out = pipeline_output(pipe(**{**kwargs, "num_inference_steps": rec.num_steps}))
                    scores += psnr(out.reshape(-1, *out.shape[-3:]), reference.reshape(-1, *reference.shape[-3:]))
        finally:
            handle.remove()
        finite = [s for s in scores if math.isfinite(s)]
        return sum(finite) / len(finite) if finite else math.inf

    return evaluate


# Families in the order they are run when time is short: the ones that won most often on the bundled models first.
PRIORITY = ("taylor", "fit", "taylor2", "fit3", "reuse", "taylor3")


def _group(cand: Candidate) -> str:
    """Candidates whose proxies compare: one scope (and branch); hand-set schedules apart, so the best of them
    is always run and the result is never worse on the calibration calls than TaylorSeer's own schedule."""
    if cand.name.startswith("stack, TaylorSeer"):
        return "fixed"
    return cand.scope if cand.branch is None else f"{cand.scope} {cand.branch}"


def shortlist(found: list[Candidate], speedup: float) -> list[Candidate]:
    """The candidates to run, in order: those within TOLERANCE of the asked speedup (all, if none is; one that
    overshoots competes only then), and of those the lowest proxy per group of comparable candidates
    (:func:`_group`) and forecaster family, families in :data:`PRIORITY` order."""
    close = [c for c in found if c.ideal <= speedup * (1 + TOLERANCE)] or found
    best: dict[tuple[str, str], Candidate] = {}
    for cand in sorted(close, key=lambda c: c.proxy):
        best.setdefault((_group(cand), cand.units[0].family), cand)
    rank = {family: i for i, family in enumerate(PRIORITY)}
    return [best[key] for key in sorted(best, key=lambda k: (rank.get(k[1], len(rank)), k[0]))]


def refine(cand: Candidate, evaluate: Callable[[Candidate], float], deadline: float, steps: int) -> Candidate:
    """Hill climbing on the final output: move one computed step of one unit by one step while the calibration
    PSNR improves (BudCache's local search, on the schedule the exact search found)."""
    best = cand
    improved = True
    while improved and time.monotonic() < deadline:
        improved = False
        for u, unit in enumerate(best.units):
            for i, step in enumerate(unit.compute):
                if i == 0:
                    continue  # step 0 is always computed
                for move in (-1, 1):
                    target = step + move
                    if not 0 < target < steps or target in unit.compute or time.monotonic() >= deadline:
                        continue
                    compute = tuple(sorted((*unit.compute[:i], target, *unit.compute[i + 1 :])))
                    units = [*best.units[:u], UnitPlan(compute, unit.family), *best.units[u + 1 :]]
                    if best.scope == "modules":  # one shared schedule: move it for every unit
                        units = [UnitPlan(compute, x.family) for x in best.units]
                    trial = replace(best, units=units)
                    trial.psnr = evaluate(trial)
                    if trial.psnr > (best.psnr or -math.inf) + 1e-3:
                        best, improved = trial, True
                        break
                if improved:
                    break
            if improved:
                break
    return best


def autotune(
    pipe: Any,
    speedup: float,
    call_kwargs: Sequence[dict[str, Any]],
    num_inference_steps: int,
    *,
    apply: Callable[..., Any],
    families: Sequence[str] = FAMILIES,
    scopes: Sequence[str] = SCOPES,
    seconds: float = 75.0,
    progress: bool = True,
) -> Profile:
    """Fit a cache to ``pipe`` for ``speedup`` (ideal, FLOPs) at ``num_inference_steps``; returns a profile.

    Args:
        pipe: a diffusers pipeline (its scheduler gives step indices and its outputs the quality measure).
        speedup: the ideal speedup to reach (> 1); the profile's is at least this, and as close as the chosen
            scope allows.
        call_kwargs: the calibration calls (prompts or classes, seeds); report quality on other ones.
        num_inference_steps: the step count the profile is for (another count is refused when applied).
        apply: ``difcache.apply_cache`` (passed in by the public verb; the candidates run through it).
        families: the forecaster families to search (``difcache.tuning.search.FAMILIES``).
        scopes: the scopes to search (:data:`SCOPES`): ``"ranges"`` (the block stack, first block + rest, halves,
            every block), ``"modules"`` (every attention/FFN unit) and ``"skip_branch"`` (a UNet's deep path).
            autotune chooses by fidelity at a FLOPs budget; a fine scope pays more hook overhead per FLOP saved,
            so where wall time matters more on a small model, ``scopes=("ranges",)`` (or ``("skip_branch",)``)
            keeps to the coarse ones, and skips recording the modules.
        seconds: time for running candidates after the recording: the shortlist in :data:`PRIORITY` order (at
            least one candidate always runs), then the hill climb on the best two until the time is up (0: no
            hill climb). A faster machine runs more of the shortlist and climbs further.
        progress: show progress bars.

    Example::

        profile = difcache.autotune(pipe, speedup=3.0, call_kwargs=[dict(prompt=p) for p in prompts],
                                    num_inference_steps=50)
        profile.save("flux-50-3x.json")
        difcache.apply_cache(pipe, profile="flux-50-3x.json")
    """
    if isinstance(speedup, bool) or not isinstance(speedup, int | float) or not math.isfinite(speedup) or speedup <= 1:
        raise DifcacheError(f"autotune's speedup must be a number > 1 (the ideal FLOPs speedup), got {speedup!r}.")
    bad = sorted(set(families) - set(FAMILIES))
    if bad or not families:
        raise DifcacheError(f"autotune's families must be among {list(FAMILIES)}, got {list(families)}.")
    if isinstance(scopes, str) or not scopes or set(scopes) - set(SCOPES):
        raise DifcacheError(f"autotune's scopes must be among {list(SCOPES)}, got {scopes!r}.")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds >= 0:
        raise DifcacheError(f"autotune's seconds must be a number >= 0, got {seconds!r}.")
    check_calibration_call(pipe, call_kwargs, num_inference_steps)
    model, source = find_denoiser(pipe)
    if source is None:
        raise DifcacheError("autotune needs the pipeline (its scheduler and outputs), not a bare denoiser module.")
    layout = layout_of(model)
    usable = {"skip_branch", "modules"} if layout.is_unet else {"ranges", "modules"}
    if not usable & set(scopes):
        raise DifcacheError(
            f"None of the scopes {list(scopes)} applies to {type(model).__name__}; it has {sorted(usable)}."
        )
    replay = Replay(call_kwargs)
    rec = record(pipe, layout, replay, num_inference_steps, units="modules" in scopes, progress=progress)
    found = [c for c in candidates(rec, speedup, families) if c.scope in scopes]
    if not found:
        raise DifcacheError(
            f"No schedule of {num_inference_steps} steps reaches {speedup}x on this model (the parts difcache can "
            "skip are too small a share of its work); ask for less speedup or run more steps."
        )
    evaluate = _evaluator(pipe, rec, layout, replay, speedup, apply)
    deadline = time.monotonic() + seconds
    queue = shortlist(found, speedup)
    for number, cand in enumerate(tqdm(queue, desc="autotune: candidates", unit="candidate", disable=not progress)):
        if number > 0 and time.monotonic() >= deadline:
            break
        cand.psnr = evaluate(cand)
    ranked = sorted((c for c in found if c.psnr is not None), key=lambda c: (c.psnr, -c.ideal), reverse=True)
    best = ranked[0]
    for k, cand in enumerate(ranked[:REFINED]):  # hill-climb the best few, sharing the time left
        share = time.monotonic() + (deadline - time.monotonic()) / (min(REFINED, len(ranked)) - k)
        climbed = refine(cand, evaluate, share, num_inference_steps)
        if climbed.psnr > best.psnr:
            best = climbed
    refined = all(best is not c for c in ranked)
    if refined:
        best.name, best.proxy = f"{best.name}, refined", proxy(best, rec)
    table = [
        {"name": c.name, "scope": c.scope, "ideal_speedup": c.ideal, "proxy": c.proxy, "calibration_psnr": c.psnr,
         "computed": [len(u.compute) for u in c.units], "families": sorted({u.family for u in c.units}),
         "step_error": _step_errors(c, rec).tolist()}
        for c in [*ranked, *([best] if refined else [])]
    ]  # fmt: skip
    extra = {"candidates": table, "gains": rec.gains.tolist(), "requested_speedup": speedup,
             "proxy_tracking": proxy_tracking(table)}  # fmt: skip
    return _profile(best, rec, layout, speedup, extra)


def proxy_tracking(table: Sequence[dict[str, Any]]) -> dict[str, float]:
    """How well the offline proxy ranks what it is meant to: per scope with at least three candidates run, the
    Spearman rank correlation between the proxy (lower is better) and the calibration PSNR (higher is better),
    sign-flipped so 1 means the proxy orders them exactly as the final output does."""
    out: dict[str, float] = {}
    for scope in sorted({c["scope"] for c in table}):
        rows = [c for c in table if c["scope"] == scope and c["calibration_psnr"] is not None]
        if len(rows) < 3:
            continue
        proxy = _ranks([c["proxy"] for c in rows])
        psnr = _ranks([c["calibration_psnr"] for c in rows])
        if proxy.std() > 0 and psnr.std() > 0:
            out[scope] = float(-np.corrcoef(proxy, psnr)[0, 1])
    return out


def _ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks (0-based, ties averaged) of ``values``."""
    x = np.asarray(values, dtype=float)
    order = x.argsort(kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _step_errors(cand: Candidate, rec: Recording) -> np.ndarray:
    """Per step, the candidate's proxy error relative to each unit's energy, averaged over units (the figure's
    top panel: comparable across scopes in shape, not in scale)."""
    total = np.zeros(rec.num_steps)
    for unit, g in zip(cand.units, cand.grams, strict=True):
        total += step_costs(error_tables(g, rec.gains, unit.family), unit.compute) / _energy(g, rec.num_steps)
    return total / len(cand.units)
