"""Forecasters: what a unit returns when it is not computed."""

from difcache.forecasters.base import Feature, Forecaster
from difcache.forecasters.reuse import ReuseForecaster
from difcache.forecasters.taylor import TaylorForecaster, TaylorState

__all__ = ["Feature", "Forecaster", "ReuseForecaster", "TaylorForecaster", "TaylorState"]
