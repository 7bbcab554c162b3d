"""Weights fitted per unit and step on calibration runs (``autotune``; L2P's idea, Learning-to-Predict, arXiv
2604.26365): at a skipped step the forecast is the fitted weighted sum of the outputs computed at the steps the
schedule implies. Where the stored outputs are not those (a unit was recomputed because its outputs were not
finite, or a run started late), it falls back to TaylorSeer's expansion of the same length, the weights the fit
was regularised toward."""

from __future__ import annotations

from dataclasses import dataclass

from difcache.core import Combination
from difcache.forecasters.taylor import taylor_weights

# per unit: step -> (the computed steps the weights apply to, newest first; the weights)
FittedTable = tuple[dict[int, tuple[tuple[int, ...], tuple[float, ...]]], ...]


@dataclass(frozen=True, eq=False)
class FittedForecaster:
    table: FittedTable
    history: int = 2

    def combination(self, step: int, entry_steps: tuple[int, ...], unit: int) -> Combination:
        fitted = self.table[unit].get(step) if unit < len(self.table) else None
        if fitted is not None and entry_steps[: len(fitted[0])] == fitted[0]:
            return Combination(fitted[1])
        order = min(self.history, len(entry_steps)) - 1
        return Combination(taylor_weights(order, 0, step, entry_steps[: order + 1]))
