"""DeepCache: Accelerating Diffusion Models for Free (Ma, Fang, Wang; CVPR 2024, arXiv 2312.00858;
horseee/DeepCache).

High-level UNet features change slowly between adjacent steps, while the shallow skip branches carry the
details. On a *full* step the whole UNet runs and the feature entering skip branch ``cache_branch_id`` from
below (the output of the up-path module just deeper than the branch) is cached. On a *retrieve* step only the
shallow path runs: ``conv_in``, the down layers up to the branch, then the up layers from the one consuming the
branch, which concatenates the fresh skip feature with the cached deep one
(:mod:`difcache.engine.unet_scope`). Everything deeper (deeper down layers, the mid block, deeper up layers) is
not computed. The schedule is "1:N", uniform or the paper's non-uniform one
(:mod:`difcache.policies.deepcache`); the forecaster is plain reuse. Works on ``UNet2DConditionModel`` (SD 1.x/2.x,
SDXL; batched CFG shares one cache for both halves, as in the paper) and ``UNet2DModel`` (DDPM/DDIM pipelines).

Defaults are the official plugin's (``DeepCacheSDHelper.set_params``): ``cache_interval=3``,
``cache_branch_id=0``, uniform. The paper's Stable Diffusion 1.5 script uses N=5, non-uniform with
``pow=1.4, center=15``, and ``cache_layer_id=0, cache_block_id=0``, which is ``cache_branch_id=1`` here.

Branch numbering follows the plugin: branch ``b`` is the ``b``-th skip feature the UNet collects (0 = the
``conv_in`` output, then each down block's layers and downsampler), so the plugin's "block ``b // 3``, layer
``b % 3``" (up blocks with 3 resnets: SD, SDXL, DDPM) is reproduced exactly, layers inside a block included; for
UNets with another number of layers per block the same rule is applied to the real structure. The experimental
SD pipeline's ``(cache_layer_id=L, cache_block_id=B)`` is branch ``3L + B + 1``.

Deviations from the official code (outputs are bit-identical to the plugin's on SD, SDXL and UNet2DModel
pipelines, except with in-place writers such as FreeU, see below):

* Steps are the step tracker's index from the run's first step, not ``scheduler.timesteps.index(t)`` (which
  breaks on repeated timesteps); a retrieve step with nothing cached yet is computed in full.
* Only the one feature read on retrieve steps is kept; the plugin keeps every wrapped module's output. Other
  skipped modules return placeholders of the right shape that nothing computed reads.
* The feature is kept and handed out as a copy. The plugin returns the cached tensor itself, so FreeU (which
  scales an up block's input in place) compounds its scaling on every retrieve step when the branch is deep.
* The non-uniform schedule is offered for every pipeline (the plugin has only the uniform one; the paper's
  pipelines compute it over the steps actually run, as here).
* UNets with skip-sample blocks (score-SDE ``AttnSkipDownBlock2D``...) or other unknown block classes are
  refused with an error naming the block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from difcache.adapters.layout import Layout
from difcache.adapters.unet import unet_skip_branches
from difcache.config import CacheConfig, check_float, check_int
from difcache.core import Plan
from difcache.engine.scopes.skip_branch import SkipBranchScope
from difcache.errors import DifcacheError
from difcache.forecasters.reuse import ReuseForecaster
from difcache.methods.registry import register_method
from difcache.policies.deepcache import DeepCacheSchedule


@dataclass(frozen=True)
class DeepCacheConfig(CacheConfig):
    """Args:
    cache_interval: N, one full step every N steps (uniform) or ceil(T/N) full steps (non-uniform); 1 computes
        every step. Default 3 (official plugin).
    cache_branch_id: skip branch b; everything deeper is reused on retrieve steps. 0 (default) is the shallowest
        and skips the most; the valid range depends on the UNet (0-11 for SD 1.5, 0-8 for SDXL).
    uniform: uniform schedule (default) or the paper's non-uniform one.
    pow: starting exponent of the non-uniform placement, > 1 (paper 1.4).
    center: step around which non-uniform full steps are densest (paper 15).
    """

    method: ClassVar[str] = "deepcache"
    cache_interval: int = 3
    cache_branch_id: int = 0
    uniform: bool = True
    pow: float = 1.4
    center: int = 15

    def __post_init__(self) -> None:
        check_int(self, "cache_interval", 1, 1000)
        check_int(self, "cache_branch_id", 0, 1000)
        if not isinstance(self.uniform, bool):
            raise TypeError(f"DeepCacheConfig.uniform must be True or False, got {self.uniform!r}.")
        check_float(self, "pow", 1.0, 10.0, lo_open=True)
        check_int(self, "center", 0, 100_000)


@register_method(DeepCacheConfig, "DeepCache: reuse the UNet's deep features below a skip branch between full steps")
def build(config: DeepCacheConfig, layout: Layout) -> Plan:
    model_name = type(layout.model).__name__
    if not layout.branches:
        try:
            unet_skip_branches(layout.model)
            reason = "its adapter lists no skip branches"
        except DifcacheError as err:
            reason = str(err)
        raise DifcacheError(
            f"DeepCache caches a UNet's deep features and needs its skip branches: {reason} Use a UNet2DConditionModel"
            " or UNet2DModel with standard blocks, or a transformer method such as 'taylorseer'."
        )
    if config.cache_branch_id >= len(layout.branches):
        raise DifcacheError(
            f"DeepCacheConfig.cache_branch_id must be in [0, {len(layout.branches) - 1}] for this {model_name} "
            f"({len(layout.branches)} skip branches), got {config.cache_branch_id}."
        )
    schedule = DeepCacheSchedule(config.cache_interval, config.uniform, config.pow, config.center)
    return Plan(SkipBranchScope(layout, config.cache_branch_id), schedule, ReuseForecaster())
