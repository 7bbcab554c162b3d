"""Forecasters: what a unit returns on a step where it is not computed.

Every forecaster here is linear in the unit's stored outputs: it keeps the last ``history`` computed outputs
(the engine's feature store holds them, newest first, with their steps) and, for a step to forecast, returns
the weights of a :class:`~difcache.core.Combination` of them. Reuse is one weight of 1; TaylorSeer's expansion
from finite differences is the weights its recursion puts on each stored output; ERTACache adds a per-leaf
affine correction; ``autotune`` fits the weights per step on calibration runs. So a new forecaster needs no
storage code and no tensor code, and forecasts of every kind run through the same compiled graph.
"""

from difcache.core import Combination, Feature, Forecaster

__all__ = ["Combination", "Feature", "Forecaster"]
