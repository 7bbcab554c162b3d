"""``difcache bench --autotune``: autotune against every alternative's best setting at equal work (issue 20).

1. **Sweep** (untimed): every alternative over its whole knob range (diffusers' TaylorSeer at every warm-up 1-5
   and interval, FBC, calibrated MagCache, cache-dit's DBCache with each of its calibrators, the DeepCache
   package) and difcache's hand-set methods, plus ``autotune`` at each asked speedup, fitted on the target's
   calibration calls. Quality (PSNR/SSIM on the bench seeds, never the calibration ones) and ideal speedup per row.
2. **Timed**: the autotune rows and, for each of them and each other curve, that curve's best row at the same or
   less work (the one autotune must beat), with paired wall-clock timing, the oracle and engine efficiency.

The report is the sweep's, with the timed figures filled in for the rows that were timed, and the margins table
(:func:`~difcache.bench.run.autotune_margins`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from difcache.bench.run import (
    AUTOTUNE_GROUP,
    BenchTarget,
    Variant,
    alternative_variant,
    autotune_margins,
    autotune_variant,
    difcache_variant,
    run_bench,
)

Maker = Callable[[BenchTarget], Variant]

_THRESHOLDS = {
    "diffusers-fbc": (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5),
    "diffusers-magcache": (0.01, 0.03, 0.06, 0.1, 0.15, 0.25, 0.4),
    "cache-dit-dbcache": (0.04, 0.08, 0.12, 0.2, 0.3, 0.5),
}
_CACHE_DIT = ("cache-dit-dbcache", "cache-dit-dbcache-taylorseer", "cache-dit-dbcache-foca", "cache-dit-dbcache-dmd")


def sweep_variants(name: str) -> list[Maker]:
    """Every alternative and hand-set difcache method over the range of its knob that spans 1.5x-6x on the
    bundled models (``name``: ``"unet"`` or a transformer target)."""
    if name == "unet":
        return [
            *(alternative_variant("deepcache-package", interval=n) for n in range(2, 9)),
            *(difcache_variant("deepcache", cache_interval=n, cache_branch_id=b) for b in (0, 1) for n in range(2, 9)),
            *(alternative_variant("diffusers-pab", skip_range=n) for n in (2, 3, 4)),
        ]
    return [
        *(alternative_variant("diffusers-taylorseer", interval=n, warmup=w) for n in range(2, 9) for w in range(1, 6)),
        *(alternative_variant("diffusers-fbc", threshold=t) for t in _THRESHOLDS["diffusers-fbc"]),
        *(alternative_variant("diffusers-magcache", threshold=t) for t in _THRESHOLDS["diffusers-magcache"]),
        *(alternative_variant(alt, threshold=t) for alt in _CACHE_DIT for t in _THRESHOLDS["cache-dit-dbcache"]),
        *(difcache_variant("taylorseer", interval=n, order=o, warmup=3) for o in (1, 2) for n in range(2, 9)),
        *(difcache_variant("taylorseer", interval=n, order=2, warmup=3, lite=True) for n in range(2, 9)),
        *(difcache_variant("fora", interval=n) for n in range(2, 7)),
        *(difcache_variant("delta_dit", interval=n) for n in (2, 3, 5, 8)),
        *(difcache_variant("teacache", threshold=t, indicator="first_block_residual") for t in (0.05, 0.1, 0.2, 0.4)),
    ]


def _prebuilt(variant: Variant) -> Maker:
    return lambda target: variant


def run_autotune_bench(
    target: BenchTarget,
    speedups: Sequence[float],
    others: Sequence[Maker],
    calls: int = 4,
    repeats: int = 5,
    progress: Callable[[str], None] = print,
    **options: Any,
) -> dict:
    """The two-stage comparison in the module docstring; returns the merged report (``run_bench``'s shape)."""
    tuned = [autotune_variant(speedup, calls=calls, **options)(target) for speedup in speedups]  # fitted once
    variants = [make(target) for make in others] + tuned
    progress(f"sweep: {len(variants)} variants, quality and FLOPs")
    report = run_bench(target, [_prebuilt(v) for v in variants], repeats=0, progress=progress)
    if repeats == 0:
        return report
    chosen = {m["label"] for m in autotune_margins(report)}
    for margins in autotune_margins(report):
        chosen |= {best["label"] for best in margins["margins"].values() if best is not None}
    timed = [v for v in variants if v.label in chosen]
    progress(f"timing: {len(timed)} variants (autotune and each curve's best at its work)")
    timing = run_bench(target, [_prebuilt(v) for v in timed], repeats=repeats, progress=progress)
    measured = {r["label"]: r for r in timing["rows"]}
    for row in report["rows"]:
        if row["label"] in measured:
            for key in ("seconds", "measured_speedup", "oracle_speedup", "engine_efficiency"):
                row[key] = measured[row["label"]][key]
    report.update({key: timing[key] for key in ("repeats", "uncached_seconds")})
    report["autotune"] = {
        "speedups": list(speedups), "calls": calls, "group": AUTOTUNE_GROUP,
        "margins": autotune_margins(report),
    }  # fmt: skip
    return report
