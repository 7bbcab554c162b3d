"""What a cached run did: decisions per unit, ideal (FLOPs) speedup, feature-store memory."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class UnitStats:
    name: str
    kind: str
    compute: int = 0
    reuse: int = 0
    forecast: int = 0
    nonfinite_fallbacks: int = 0
    flops_share: float = 0.0

    @property
    def skipped(self) -> int:
        return self.reuse + self.forecast


@dataclass
class CacheStats:
    """Counts since the cache was applied (or since ``handle.reset_stats()``).

    ``ideal_speedup`` is FLOPs of the same denoiser calls uncached / FLOPs the cached calls executed, counting
    everything in the denoiser that is never cached (embeddings, norms, projections): measured/ideal shows the
    engine's overhead and everything outside the denoiser.
    """

    method: str
    calls: int = 0
    runs: int = 0
    full_flops: float = 0.0
    skipped_flops: float = 0.0
    store_bytes: int = 0
    peak_store_bytes: int = 0
    units: list[UnitStats] = field(default_factory=list)
    steps_source: str = ""  # where the last run's step indices came from (scheduler, cache_context, calls)
    notes: dict[str, str] = field(default_factory=dict)  # what the method chose for this model (e.g. a preset)
    flops_measured: bool = True  # False when no call could be measured (the ideal speedup is then unknown: 1.0)

    @property
    def ideal_speedup(self) -> float:
        executed = self.full_flops - self.skipped_flops
        return self.full_flops / executed if executed > 0 else 1.0

    def totals(self) -> dict[str, int]:
        return {
            "compute": sum(u.compute for u in self.units),
            "reuse": sum(u.reuse for u in self.units),
            "forecast": sum(u.forecast for u in self.units),
            "nonfinite_fallbacks": sum(u.nonfinite_fallbacks for u in self.units),
        }

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "calls": self.calls,
            "runs": self.runs,
            "ideal_speedup": self.ideal_speedup,
            "peak_store_bytes": self.peak_store_bytes,
            "steps_source": self.steps_source,
            "notes": dict(self.notes),
            **self.totals(),
            "units": [vars(u) for u in self.units],
        }

    def __str__(self) -> str:
        totals = self.totals()
        lines = [
            f"difcache {self.method}: {self.calls} denoiser calls in {self.runs} run(s), "
            f"ideal speedup {self.ideal_speedup:.2f}x, feature store peak {self.peak_store_bytes / 2**20:.1f} MiB",
            *(f"{key}: {value}" for key, value in {"steps from": self.steps_source, **self.notes}.items() if value),
            f"units: {totals['compute']} computed, {totals['reuse']} reused, {totals['forecast']} forecast"
            + (
                f", {totals['nonfinite_fallbacks']} non-finite forecasts recomputed"
                if totals["nonfinite_fallbacks"]
                else ""
            ),
            f"{'unit':<40} {'kind':<10} {'FLOPs%':>7} {'compute':>8} {'reuse':>6} {'forecast':>9}",
        ]
        for u in self.units:
            lines.append(
                f"{u.name:<40} {u.kind:<10} {100 * u.flops_share:>6.1f}% {u.compute:>8} {u.reuse:>6} {u.forecast:>9}"
            )
        return "\n".join(lines)
