"""Δ-DiT: a training-free acceleration method tailored for diffusion transformers (Chen et al., arXiv
2406.01125). No official code has been released; this follows the paper.

Δ-Cache caches the *deviation* of a block range, Δ = h_out − h_in, on full steps and adds it to the current
input on cached steps, so the current input still flows through (:mod:`difcache.engine.range_scope`). The
rear ``num_cached_blocks`` blocks are cached in the early stage and the front ones in the late stage,
switching at ``boundary`` (:class:`~difcache.policies.stage.StageSwitchSchedule`); both are refreshed every
``interval`` steps.

Defaults are ours (the paper's exact values were not available to us): ``interval=2`` (the paper's PixArt-α
setting reaches 1.6× at 20 steps, which an interval of 2 with a third to a half of the blocks cached matches),
``num_cached_blocks`` = a third of the blocks, ``boundary`` = half of the steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from difcache.adapters.layout import Layout
from difcache.config import CacheConfig, check_float, check_int
from difcache.core import Plan
from difcache.engine.scopes.block_range import BlockRangeScope
from difcache.errors import DifcacheError
from difcache.forecasters.reuse import ReuseForecaster
from difcache.methods.registry import register_method
from difcache.policies.stage import StageSwitchSchedule


@dataclass(frozen=True)
class DeltaDiTConfig(CacheConfig):
    """Args:
    interval: N, a full step every N steps (>= 1).
    num_cached_blocks: N_c, blocks in each cached range (>= 1, at most half the blocks); ``None`` = a third.
    boundary: b, the step where caching switches from rear to front blocks: a step index (int >= 0) or a
        fraction of the run (float in (0, 1)).
    """

    method: ClassVar[str] = "delta_dit"
    interval: int = 2
    num_cached_blocks: int | None = None
    boundary: int | float = 0.5

    def __post_init__(self) -> None:
        check_int(self, "interval", 1, 1000)
        check_int(self, "num_cached_blocks", 1, 10_000, allow_none=True)
        if isinstance(self.boundary, float):
            check_float(self, "boundary", 0.0, 1.0, lo_open=True)
        else:
            check_int(self, "boundary", 0, 100_000)


@register_method(DeltaDiTConfig, "Δ-DiT: Δ-cache rear blocks early and front blocks late, refresh every N steps")
def build(config: DeltaDiTConfig, layout: Layout) -> Plan:
    if layout.is_unet:
        raise DifcacheError("Δ-DiT caches transformer block ranges; for UNets use method='deepcache'.")
    n_blocks = len(layout.blocks)
    cached = config.num_cached_blocks or max(1, n_blocks // 3)
    if 2 * cached > n_blocks:
        raise DifcacheError(
            f"DeltaDiTConfig.num_cached_blocks={cached} is more than half of the model's {n_blocks} blocks; the "
            f"front and rear ranges would overlap. Use at most {n_blocks // 2}."
        )
    scope = BlockRangeScope(layout, [(0, cached - 1), (n_blocks - cached, n_blocks - 1)])
    return Plan(scope, StageSwitchSchedule(config.interval, config.boundary), ReuseForecaster())
