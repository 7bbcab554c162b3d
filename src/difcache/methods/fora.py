"""FORA: Fast-Forward Caching in Diffusion Transformer Acceleration (Selvaraju et al., arXiv 2407.01425).

Each block's attention and MLP outputs are cached *before* their gates and reused for ``interval - 1`` steps;
gates and modulation are recomputed every step from the current timestep. The schedule follows the official
``boost_infer_static``: a full step whenever the descending step index is divisible by ``interval``, plus the
first step (so the last step is always full). Default interval 3, as in the official script
(``--cache-threshold 3``). Batched CFG shares one cache, as in the paper; sequential CFG (Wan) keeps one per
branch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from difcache.adapters.layout import Layout
from difcache.config import CacheConfig, check_int
from difcache.core import Plan
from difcache.engine.scopes.module import ModuleScope
from difcache.forecasters.reuse import ReuseForecaster
from difcache.methods.registry import register_method
from difcache.policies.interval import FORASchedule


@dataclass(frozen=True)
class FORAConfig(CacheConfig):
    """Args:
    interval: steps between full computations (N); 1 disables caching. Default 3 (paper).
    """

    method: ClassVar[str] = "fora"
    interval: int = 3

    def __post_init__(self) -> None:
        check_int(self, "interval", 1, 1000)


@register_method(FORAConfig, "FORA: reuse each block's pre-gate attention/FFN outputs for N-1 steps")
def build(config: FORAConfig, layout: Layout) -> Plan:
    return Plan(ModuleScope(layout.units), FORASchedule(config.interval), ReuseForecaster())
