"""Timing as ``BENCHMARKS.md`` defines it: interleaved medians, per-unit times, oracle speedup, efficiency.

Wall times on shared machines are noisy; ratios of runs interleaved in one process (A, B, A, B, ...) after a
warm-up each are much less so, and ratios of adjacent pairs (:func:`paired_speedups`) least. The *oracle*
speedup is what a zero-overhead engine would reach with the same decisions on this machine:
``T / (T - time of the skipped units)``, with unit times from an instrumented uncached run.
``measured / oracle`` is the engine's efficiency.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from difcache.adapters.layout import Unit


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _time_once(
    name: str,
    variants: dict[str, Callable[[], Any]],
    setup: dict[str, Callable[[], Any]],
    teardown: dict[str, Callable[[], Any]],
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Seconds of one call of ``variants[name]``; its ``setup``/``teardown`` run around it, outside the timing."""
    if name in setup:
        setup[name]()
    start = clock()
    variants[name]()
    elapsed = clock() - start
    if name in teardown:
        teardown[name]()
    return elapsed


def _timed_rounds(
    order: list[str],
    variants: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int,
    setup: dict[str, Callable[[], Any]] | None,
    teardown: dict[str, Callable[[], Any]] | None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[list[float]]:
    """Seconds of each call in ``order``, for each of ``repeats`` rounds after ``warmup`` untimed-in-result ones."""
    setup, teardown = setup or {}, teardown or {}
    rounds = []
    for round_index in range(warmup + repeats):
        seconds = [_time_once(name, variants, setup, teardown, clock) for name in order]
        if round_index >= warmup:
            rounds.append(seconds)
    return rounds


def interleaved_medians(
    variants: dict[str, Callable[[], Any]],
    repeats: int = 5,
    warmup: int = 1,
    setup: dict[str, Callable[[], Any]] | None = None,
    teardown: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, float]:
    """Median wall time of each variant, run in turn A, B, C, A, B, C, ... after ``warmup`` runs each.

    ``setup[name]``/``teardown[name]`` run around each timed call of that variant (outside the timing), e.g. to
    apply and remove a cache so the variants share one pipeline.
    """
    names = list(variants)
    rounds = _timed_rounds(names, variants, repeats, warmup, setup, teardown)
    return {name: statistics.median(r[i] for r in rounds) for i, name in enumerate(names)}


def paired_speedups(
    variants: dict[str, Callable[[], Any]], reference: str, **timing: Any
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall times, and each variant's median speedup over ``variants[reference]`` from *paired* runs.

    Every round times, for each other variant, the reference immediately followed by that variant, and takes
    the ratio of the pair. A slow drift of the machine (another process, thermal or frequency changes) then
    cancels within each pair instead of landing on whichever variants ran during it, as it does with one
    reference run per round of many variants. Costs one extra reference run per variant and round.
    ``timing`` is :func:`paired_ratios`'s ``repeats``, ``warmup``, ``setup``, ``teardown`` and ``clock``;
    ``setup``/``teardown`` run around each variant's timed call, outside the timing.
    """
    times, ratios = paired_ratios(variants, reference, **timing)
    medians = {name: statistics.median(values) for name, values in times.items() if values}
    return medians, {name: statistics.median(values) for name, values in ratios.items() if values}


def paired_ratios(
    variants: dict[str, Callable[[], Any]],
    reference: str,
    repeats: int = 5,
    warmup: int = 1,
    setup: dict[str, Callable[[], Any]] | None = None,
    teardown: dict[str, Callable[[], Any]] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """The timings behind :func:`paired_speedups`: every wall time, and every pair's ratio, per variant."""
    others = [name for name in variants if name != reference]
    order = [name for other in others for name in (reference, other)]
    times: dict[str, list[float]] = {name: [] for name in variants}
    ratios: dict[str, list[float]] = {name: [] for name in others}
    for seconds in _timed_rounds(order, variants, repeats, warmup, setup, teardown, clock):
        for k, other in enumerate(others):
            base, elapsed = seconds[2 * k], seconds[2 * k + 1]
            times[reference].append(base)
            times[other].append(elapsed)
            ratios[other].append(base / elapsed)
    return times, ratios


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how far apart repeated measurements of one ratio are."""
    middle = statistics.median(values)
    return (max(values) - min(values)) / middle if middle else math.inf


@dataclass
class UnitTimes:
    """Mean seconds per call of each unit in instrumented uncached runs, and those runs' mean wall time."""

    per_unit: list[float]
    calls_per_unit: list[int]
    total: float


def time_units(units: Sequence[Unit], run: Callable[[], Any], repeats: int = 1) -> UnitTimes:
    """Run ``run()`` ``repeats`` times with forward pre/post hooks timing every unit (uncached, instrumented)."""
    totals = [0.0] * len(units)
    counts = [0] * len(units)
    handles = []
    for i, module in ((i, m) for i, unit in enumerate(units) for m in unit.modules):
        start: list[float] = []
        handles.append(module.register_forward_pre_hook(lambda *_, s=start: s.append(time.perf_counter())))

        def post(*_: Any, i: int = i, s: list[float] = start) -> None:
            totals[i] += time.perf_counter() - s.pop()
            counts[i] += 1

        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            elapsed = sum(timed(run)[0] for _ in range(repeats))
    finally:
        for h in handles:
            h.remove()
    # A unit standing for several modules (a range) is counted once per module call; divide by members.
    calls = [c // max(len(u.modules), 1) for c, u in zip(counts, units, strict=True)]
    per_call = [t / c if c else 0.0 for t, c in zip(totals, calls, strict=True)]
    return UnitTimes(per_call, [c // repeats for c in calls], elapsed / repeats)


def oracle_speedup(unit_times: UnitTimes, skipped_per_unit: Sequence[float]) -> float:
    """``T / (T - time of the skipped units)`` for one pipeline call, ``skipped_per_unit`` skips per unit.

    Both ``T`` and the unit times come from the same instrumented runs, so machine noise between those runs
    and the timed ones cancels in the ratio.
    """
    saved = sum(t * n for t, n in zip(unit_times.per_unit, skipped_per_unit, strict=True))
    saved = min(saved, unit_times.total * 0.999)
    return unit_times.total / (unit_times.total - saved)
