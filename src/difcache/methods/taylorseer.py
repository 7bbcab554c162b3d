"""TaylorSeer: From Reusing to Forecasting (Liu et al., ICCV 2025, arXiv 2503.06923; Shenyi-Z/TaylorSeer).

The pre-gate outputs of every attention and feed-forward module (and, for FLUX/HunyuanVideo single-stream
blocks, the whole block output, as the official FLUX code caches ``total``) are computed on full steps and
forecast in between by a Taylor expansion built from finite differences in step-index units
(:mod:`difcache.forecasters.taylor`). Schedule: ``warmup`` full steps, then one full step every ``interval``
(:class:`~difcache.policies.interval.TaylorSeerSchedule`, the official ``cal_type``).

Per-family defaults are those of the official code: FLUX N=6, O=1, 3 warm-up (``first_enhance``);
HunyuanVideo and Wan2.1 N=5, O=1, 1 warm-up; DiT N=4, O=4, 2 warm-up (README). Families the official code
does not cover (SD3, PixArt, CogVideoX, LTX, UNet) get N=5, O=1, 3 warm-up — diffusers' TaylorSeer hook
defaults — documented as our choice, not the paper's. Deviation: factors are kept in fp32, not bf16.

``lite=True`` is TaylorSeer-Lite, the authors' later variant (Shenyi-Z/Cache4Diffusion, README and
``HunyuanImage-2.1/run_hyimage_taylorseer_lite.py``): one feature per step (per stream) is forecast instead of
one or two per block, so the cache holds ``order + 1`` tensors per stream instead of ``order + 1`` per module,
and the forecast's own memory traffic, which on a small model costs more than the hooks (``BENCHMARKS.md``),
shrinks by the same factor. Deviation: the official code forecasts the output of the final layer; we forecast
the residual of the whole block stack (output − input, :class:`~difcache.engine.scopes.block_range.BlockRangeScope`),
so each skipped step still adds the *current* patch embedding and runs the final norm with the *current*
timestep, as this engine's TeaCache, first-block cache and ERTACache do. Both skip every block; ours keeps the
exact parts exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from difcache.adapters.layout import Layout
from difcache.config import CacheConfig, check_bool, check_int
from difcache.core import Action, Plan
from difcache.engine.scopes.block_range import BlockRangeScope
from difcache.engine.scopes.module import ModuleScope
from difcache.errors import DifcacheError
from difcache.forecasters.taylor import TaylorForecaster
from difcache.methods.registry import register_method
from difcache.policies.interval import TaylorSeerSchedule

_PRESETS = {
    "flux": {"interval": 6, "order": 1, "warmup": 3},
    "hunyuanvideo": {"interval": 5, "order": 1, "warmup": 1},
    "wan": {"interval": 5, "order": 1, "warmup": 1},
    "dit": {"interval": 4, "order": 4, "warmup": 2},
}
_OTHER_FAMILIES = {"interval": 5, "order": 1, "warmup": 3}


@dataclass(frozen=True)
class TaylorSeerConfig(CacheConfig):
    """Args:
    interval: N, one full step every N steps after warm-up (1 = every step). FLUX default 6.
    order: O, Taylor order 0-4 (0 = plain reuse). FLUX default 1.
    warmup: full steps at the start of each run (``first_enhance``). FLUX default 3.
    lite: TaylorSeer-Lite: forecast one residual of the whole block stack instead of every attention and
        feed-forward output (transformers only). Default False, as the paper.
    """

    method: ClassVar[str] = "taylorseer"
    interval: int = 6
    order: int = 1
    warmup: int = 3
    lite: bool = False

    def __post_init__(self) -> None:
        check_int(self, "interval", 1, 1000)
        check_int(self, "order", 0, 4)
        check_int(self, "warmup", 0, 1000)
        check_bool(self, "lite")

    @classmethod
    def for_family(cls, family: str) -> TaylorSeerConfig:
        return cls(**_PRESETS.get(family, _OTHER_FAMILIES))


@register_method(TaylorSeerConfig, "TaylorSeer: Taylor-forecast pre-gate attention/FFN outputs between full steps")
def build(config: TaylorSeerConfig, layout: Layout) -> Plan:
    skip = Action.FORECAST if config.order > 0 else Action.REUSE
    if config.lite and layout.is_unet:
        raise DifcacheError(
            "TaylorSeerConfig.lite forecasts a transformer block stack; for UNets use lite=False or "
            "method='deepcache'."
        )
    scope = BlockRangeScope(layout, [(0, len(layout.blocks) - 1)]) if config.lite else ModuleScope(layout.units)
    return Plan(
        scope,
        TaylorSeerSchedule(config.interval, config.warmup, skip),
        TaylorForecaster(config.order, config.warmup),
    )
