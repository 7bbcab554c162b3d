"""Forecasters: what a unit returns when it is not computed (weights over its stored outputs)."""

from difcache.core import Action, Combination, Feature, Forecaster
from difcache.forecasters.reuse import REUSE, ReuseForecaster
from difcache.forecasters.taylor import TaylorForecaster, taylor_weights

# The ``forecast`` setting of methods whose paper reuses and that offer a Taylor forecast as well (BAC, TeaCache).
FORECASTS = ("reuse", "taylor")


def skipped_step(forecast: str, order: int = 1) -> tuple[Action, Forecaster]:
    """The action and forecaster for a ``forecast`` setting: ``"reuse"`` returns the last computed output,
    ``"taylor"`` extrapolates it with TaylorSeer's expansion of ``order``."""
    if forecast == "taylor":
        return Action.FORECAST, TaylorForecaster(order)
    return Action.REUSE, ReuseForecaster()


__all__ = [
    "FORECASTS",
    "REUSE",
    "Combination",
    "Feature",
    "Forecaster",
    "ReuseForecaster",
    "TaylorForecaster",
    "skipped_step",
    "taylor_weights",
]
