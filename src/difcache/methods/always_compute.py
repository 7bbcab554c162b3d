"""A control, not a method: every unit computed every step, with all of difcache's hooks installed.

Timing it against the bare model measures the engine's overhead (``BENCHMARKS.md``: hook overhead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from difcache.adapters.layout import Layout
from difcache.config import CacheConfig
from difcache.core import Plan
from difcache.engine.scopes.module import ModuleScope
from difcache.forecasters.reuse import ReuseForecaster
from difcache.methods.registry import register_method
from difcache.policies.interval import AlwaysCompute


@dataclass(frozen=True)
class AlwaysComputeConfig(CacheConfig):
    method: ClassVar[str] = "always_compute"


@register_method(AlwaysComputeConfig, "control: hooks installed, every unit computed (measures engine overhead)")
def build(config: AlwaysComputeConfig, layout: Layout) -> Plan:
    return Plan(ModuleScope(layout.units), AlwaysCompute(), ReuseForecaster())
