"""ERTACache's calibration (:mod:`difcache.methods.ertacache`): the offline reuse set (part a), the closed-form
rectification (part c) and the step factors φ of the timestep adjustment (part b), from the true stack residual
of every step of uncached calibration runs."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from difcache.adapters.layout import Layout
from difcache.core import combine
from difcache.engine.calibration import CalibrationSession, subsample
from difcache.engine.scopes.block_range import Streams
from difcache.errors import DifcacheError
from difcache.forecasters.rectified import RectifiedForecaster, fit_rectification, to_paper
from difcache.methods.ertacache import ERTACacheConfig, _scope
from difcache.methods.registry import register_calibrator

# one calibration sample (a prompt and CFG branch): residual[step][leaf] (leaf 0 image stream, 1 text stream)
Residuals = Sequence[Sequence[torch.Tensor | None]]


def relative_l1(approx: torch.Tensor, true: torch.Tensor) -> float:
    """``‖approx − true‖₁ / ‖true‖₁`` in float64 (``inf`` when ``true`` is zero and ``approx`` is not)."""
    num = float((approx.double() - true.double()).abs().sum())
    den = float(true.double().abs().sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def select_reuse_steps(
    samples: Sequence[Residuals], threshold: float, merge: str = "mean", warmup: int = 1, cooldown: int = 1
) -> tuple[tuple[bool, ...], list[float | None]]:
    """ERTACache's offline reuse set: the greedy walk described in the module docstring (part a).

    Args:
        samples: per calibration sample, the true residual of every step (``samples[k][step][leaf]``); the
            error is measured on leaf 0.
    Returns:
        ``reuse[step]`` and the merged error of reusing the cached residual at each step that was tested
        (``None`` for the forced warm-up and cool-down steps).
    """
    if not samples:
        raise DifcacheError("ERTACache calibration recorded no residuals.")
    num_steps = len(samples[0])
    aggregate = max if merge == "max" else (lambda values: sum(values) / len(values))
    reuse = [False] * num_steps
    errors: list[float | None] = [None] * num_steps
    cached = 0
    for step in range(num_steps):
        if step < warmup or step >= num_steps - cooldown:
            cached = step
            continue
        error = aggregate([relative_l1(sample[cached][0], sample[step][0]) for sample in samples])
        errors[step] = error
        if error < threshold:
            reuse[step] = True
        else:
            cached = step
    return tuple(reuse), errors


def last_computed(reuse: Sequence[bool]) -> list[int]:
    """For each step, the step whose residual the cache holds then (itself when computed)."""
    source, cached = [], 0
    for step, reused in enumerate(reuse):
        if not reused:
            cached = step
        source.append(cached)
    return source


def fit_coefficients(
    samples: Sequence[Residuals], reuse: Sequence[bool]
) -> list[list[tuple[float, float] | None] | None]:
    """Per reused step and leaf, the closed-form ``(a, b)`` of ``r̃ − r ≈ a·r̃ + b`` pooled over samples (part c)."""
    source = last_computed(reuse)
    coefficients: list[list[tuple[float, float] | None] | None] = []
    for step, reused in enumerate(reuse):
        if not reused:
            coefficients.append(None)
            continue
        per_leaf: list[tuple[float, float] | None] = []
        for leaf in range(len(samples[0][step])):
            pairs = [(s[source[step]][leaf], s[step][leaf]) for s in samples]
            if any(c is None or t is None or c.shape != t.shape for c, t in pairs):
                per_leaf.append(None)
                continue
            cached = torch.cat([c.reshape(-1) for c, _ in pairs])
            true = torch.cat([t.reshape(-1) for _, t in pairs])
            per_leaf.append(fit_rectification(cached, true))
        coefficients.append(per_leaf)
    return coefficients


def step_factors(
    samples: Sequence[Residuals],
    reuse: Sequence[bool],
    coefficients: Sequence[Sequence[tuple[float, float] | None] | None],
) -> list[float]:
    """φ per step (part b): 1 on computed steps; on a reused step the mean over samples of
    ``clip(1 − ‖r̂_i − r_i‖₁ / ‖r_i − r_{i−1}‖₁, 0, 1)``, with ``r̂_i`` the feature the cache returns."""
    forecaster = RectifiedForecaster.from_lists(coefficients)
    source = last_computed(reuse)
    phi = []
    for step, reused in enumerate(reuse):
        if not reused or step == 0:
            phi.append(1.0)
            continue
        values = []
        for sample in samples:
            (returned,) = combine([[sample[source[step]][0]]], forecaster.combination(step, (source[step],), 0))
            true, previous = sample[step][0], sample[step - 1][0]
            num = float((returned.double() - true.double()).abs().sum())
            den = float((true.double() - previous.double()).abs().sum())
            ratio = (0.0 if num == 0.0 else math.inf) if den == 0.0 else num / den
            values.append(min(max(1.0 - ratio, 0.0), 1.0))
        phi.append(sum(values) / len(values))
    return phi


@register_calibrator(ERTACacheConfig)
def calibrate(config: ERTACacheConfig, layout: Layout, session: CalibrationSession, call_kwargs: list) -> dict:
    """Record the true stack residual of every step, then select the reuse set, fit (K, B) and φ."""
    scope = _scope(layout)
    head, tail = scope.units[0].modules[0], scope.units[0].modules[-1]
    head_streams, tail_streams = Streams.of(head), Streams.of(tail)
    inputs: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
    records: dict[tuple, dict[int, list[torch.Tensor | None]]] = {}

    def on_head(info: Any, args: tuple, kwargs: dict) -> None:
        bound = head_streams.bind(args, kwargs)
        encoder = bound.get(head_streams.encoder_arg) if head_streams.encoder_arg else None
        inputs[(session.call_index, info.branch)] = (bound[head_streams.hidden_arg], encoder)

    def on_tail(info: Any, args: tuple, kwargs: dict, output: Any) -> None:
        key = (session.call_index, info.branch)
        (in_hidden, in_encoder), (out_hidden, out_encoder) = inputs.pop(key), tail_streams.outputs(output)
        leaves = [subsample(out_hidden.float() - in_hidden.float(), config.max_entries), None]
        if out_encoder is not None and in_encoder is not None and out_encoder.shape == in_encoder.shape:
            leaves[1] = subsample(out_encoder.float() - in_encoder.float(), config.max_entries)
        records.setdefault(key, {})[info.step] = leaves

    session.probe_inputs(head, on_head)
    session.probe(tail, on_tail)
    session.run(call_kwargs, desc="ertacache calibration")
    num_steps = session.num_steps
    samples = []
    for key in sorted(records):
        missing = [s for s in range(num_steps) if s not in records[key]]
        if missing:
            raise DifcacheError(
                f"ERTACache calibration: call {key[0]} (branch {key[1]!r}) ran no denoiser at steps {missing[:5]}; "
                f"calibrate full {num_steps}-step runs (no img2img strength)."
            )
        samples.append([records[key][s] for s in range(num_steps)])
    if num_steps < 3:
        raise DifcacheError(
            f"ERTACache needs at least 3 steps to reuse any (first and last are computed); got {num_steps}."
        )
    reuse, errors = select_reuse_steps(samples, config.threshold, config.merge, config.warmup, config.cooldown)
    if not any(reuse):
        warnings.warn(
            f"ERTACache: at threshold={config.threshold:g} no step's residual is close enough to the last computed "
            "one on these calls, so the profile reuses nothing; raise threshold (0.1 reuses about half of 50 "
            "steps on the bundled models).",
            stacklevel=2,
        )
    coefficients = fit_coefficients(samples, reuse)
    plain = [None if c is None else [None] * len(c) for c in coefficients]
    paper = [None if c is None else [None if p is None else to_paper(*p) for p in c] for c in coefficients]
    return {
        "threshold": config.threshold,
        "merge": config.merge,
        "reuse_steps": [s for s, r in enumerate(reuse) if r],
        "rel_l1": errors,
        "K": [None if c is None else [None if p is None else p[0] for p in c] for c in paper],
        "B": [None if c is None else [None if p is None else p[1] for p in c] for c in paper],
        "phi": step_factors(samples, reuse, coefficients),
        "phi_reuse": step_factors(samples, reuse, plain),
        "samples": len(samples),
        "entries": config.max_entries,
    }
