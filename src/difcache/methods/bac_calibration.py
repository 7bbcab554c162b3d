"""BAC's calibration (:mod:`difcache.methods.bac`): every unit's output at every step of uncached runs, reduced
per sample to a ``[T, T]`` similarity matrix and a volatility, averaged over samples (prompts × CFG branches)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from difcache.adapters.layout import Layout
from difcache.engine.calibration import CalibrationSession, subsample
from difcache.errors import DifcacheError
from difcache.methods.bac import BACConfig, _check_units
from difcache.methods.registry import register_calibrator
from difcache.policies.bac import similarity_matrix, volatility

_DIGITS = 7  # significant digits kept in the profile's JSON


def _flat_output(output: Any, max_entries: int) -> torch.Tensor:
    """All tensor leaves of a unit's output, flattened and concatenated, as a fixed subsample (fp32)."""
    leaves, _ = tree_flatten(output)
    tensors = [leaf.detach().reshape(-1) for leaf in leaves if isinstance(leaf, torch.Tensor)]
    if not tensors:
        raise DifcacheError("BAC calibration: a unit returned no tensor; this model's adapter is not supported.")
    return subsample(tensors[0] if len(tensors) == 1 else torch.cat([t.float() for t in tensors]), max_entries)


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
            steps[info.step] = _flat_output(output, config.max_entries)
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
