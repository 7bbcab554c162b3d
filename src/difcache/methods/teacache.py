"""TeaCache (Liu et al., "Timestep Embedding Tells", CVPR 2025, arXiv 2411.19108; ali-vilab/TeaCache), and
first-block cache as its ``indicator="first_block_residual"`` variant.

Scope: the residual of the whole block stack (FLUX: double and single blocks) — reused while the accumulated,
polynomially rescaled change of an indicator stays below ``threshold``
(:class:`~difcache.policies.teacache.AccumulatedChangePolicy`). Indicators:

* ``"modulated_input"``: the first block's timestep-modulated input, as in the official FLUX, HunyuanVideo and
  DiT-family code (``norm1(hidden, emb=temb)[0]``; PixArt's ``adaLN-single`` modulation recomputed likewise).
* ``"timestep_embedding"``: the timestep projection the blocks receive (``temb``): the official Wan2.1 code in
  its ``use_ret_steps`` mode (``e0``) and the official CogVideoX code (``emb``).
* ``"first_block_residual"``: first-block cache (ParaAttention's FBCache, diffusers' ``FirstBlockCacheConfig``):
  block 0 always runs, its residual is the signal and blocks 1.. are the cached range. Unlike diffusers'
  version, changes accumulate across skipped steps exactly as TeaCache's do, so a run of small changes cannot
  skip forever.

**Presets** are the official ones (polynomial, indicator, threshold, forced first and last steps), picked from
the model's config (:func:`preset_name`; ``stats()`` names the one picked): FLUX.1-dev (0.6, ≈2×),
HunyuanVideo (0.15), LTX-Video (0.05, block 0's modulated input), Wan2.1 T2V 1.3B / 14B and I2V 480P / 720P in
``use_ret_steps`` mode (``e0``, the first 5 steps computed, the last *not* forced: the official cut-off is never
reached), CogVideoX 2B / 5B / 1.5-5B / 1.5-5B-I2V (``emb``, 0.2). Other families start from the identity
``(1, 0)`` with threshold 0.1 (ours) and should be fitted with ``difcache.calibrate(pipe, "teacache", ...)``,
which fits a degree-4 polynomial from the indicator's change to the stack output's change over calibration
runs, as the paper does. Deviation: the official LTX code caches the residual up to after the final norm; we
cache the block stack's, as for every other family.

``forecast="taylor"`` (ours; the paper reuses): a skipped step extrapolates the cached residual with
TaylorSeer's finite-difference expansion of order ``order``
(:class:`~difcache.forecasters.taylor.TaylorForecaster`, in step-index units over the irregular gaps the
dynamic policy leaves) instead of returning the last one. With the first-block indicator this is what
cache-dit calls DBCache with its TaylorSeer calibrator (``TaylorSeerCalibratorConfig``, order 1 by default, as
here). The policy is the same; only what a skipped step returns differs (and, through the latents, the
indicator's later values).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from difcache.adapters.layout import Layout
from difcache.config import CacheConfig, check_choice, check_float, check_int, check_profile
from difcache.core import Plan
from difcache.engine.scopes.signals import INDICATORS, indicator_scope
from difcache.forecasters import FORECASTS, skipped_step
from difcache.methods.registry import register_method
from difcache.methods.teacache_presets import FAMILY_DEFAULT, PRESETS, preset_name
from difcache.policies.teacache import AccumulatedChangePolicy
from difcache.profile import Profile

IDENTITY = (1.0, 0.0)
@dataclass(frozen=True)
class TeaCacheConfig(CacheConfig):
    """Args:
    threshold: skip while the accumulated rescaled change is below this (> 0). FLUX default 0.6.
    coefficients: rescaling polynomial, highest degree first; ``(1, 0)`` is the raw change.
    indicator: one of ``INDICATORS``.
    warmup: first steps always computed (>= 1). cooldown: last steps always computed (>= 0).
    max_consecutive: optional bound on consecutive skipped steps (>= 1), ``None`` for none.
    profile: a TeaCache profile from ``difcache.calibrate`` whose fitted coefficients replace ``coefficients``.
    forecast: what a skipped step returns, ``"reuse"`` (the paper) or ``"taylor"`` (ours, see above).
    order: Taylor order 1-4 when ``forecast="taylor"``. Default 1.
    """

    method: ClassVar[str] = "teacache"
    threshold: float = 0.1
    coefficients: tuple[float, ...] = IDENTITY
    indicator: str = "modulated_input"
    warmup: int = 1
    cooldown: int = 1
    max_consecutive: int | None = None
    profile: Any = field(default=None, compare=False)
    forecast: str = "reuse"
    order: int = 1
    preset: str | None = None

    def __post_init__(self) -> None:
        check_float(self, "threshold", 0.0, lo_open=True)
        check_choice(self, "indicator", INDICATORS)
        check_choice(self, "forecast", FORECASTS)
        check_int(self, "order", 1, 4)
        check_int(self, "warmup", 1, 1000)
        check_int(self, "cooldown", 0, 1000)
        check_int(self, "max_consecutive", 1, 1000, allow_none=True)
        coefficients = tuple(self.coefficients)
        if not coefficients or not all(isinstance(c, int | float) and np.isfinite(c) for c in coefficients):
            raise ValueError(f"TeaCacheConfig.coefficients must be finite numbers, got {self.coefficients!r}.")
        object.__setattr__(self, "coefficients", tuple(float(c) for c in coefficients))
        check_profile(self)
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"TeaCacheConfig.preset must be one of {sorted(PRESETS)} or None, got {self.preset!r}.")

    @classmethod
    def for_preset(cls, name: str | None) -> TeaCacheConfig:
        return cls(**PRESETS[name], preset=name) if name is not None else cls()

    @classmethod
    def for_family(cls, family: str) -> TeaCacheConfig:
        """The family's most common model's preset (FLUX.1-dev, Wan2.1-T2V-1.3B, CogVideoX-5B...)."""
        return cls.for_preset(FAMILY_DEFAULT.get(family))

    @classmethod
    def for_layout(cls, layout: Layout) -> TeaCacheConfig:
        """The official preset for this model, picked from its config (:func:`preset_name`), else the defaults."""
        return cls.for_preset(preset_name(layout))

    def replace(self, **overrides: Any) -> TeaCacheConfig:
        """As :meth:`CacheConfig.replace`; changing ``indicator`` without new ``coefficients`` resets them to the
        identity. A polynomial is fitted for one indicator (the Wan preset's maps changes of the timestep
        embedding), and carried over to another it rescales the wrong quantity: ``apply_cache(wan_pipe,
        "teacache", indicator="first_block_residual")`` would otherwise run with Wan's timestep polynomial."""
        if overrides.get("indicator", self.indicator) != self.indicator and "coefficients" not in overrides:
            overrides = {**overrides, "coefficients": IDENTITY}
        if "preset" not in overrides and set(overrides) & {"coefficients", "indicator", "threshold"}:
            overrides = {**overrides, "preset": None}  # no longer the preset it was made from
        return super().replace(**overrides)


def _coefficients(config: TeaCacheConfig, layout: Layout) -> tuple[float, ...]:
    """The config's polynomial, or the one a calibration profile fitted (for the same indicator)."""
    if config.profile is None:
        return config.coefficients
    profile = Profile.for_model(config.profile, "teacache", layout, "")
    profile.matching("indicator", INDICATORS, config.indicator)
    return tuple(profile.numbers("coefficients"))  # type: ignore[arg-type]


@register_method(TeaCacheConfig, "TeaCache: skip the block stack while the accumulated indicator change is small")
def build(config: TeaCacheConfig, layout: Layout) -> Plan:
    coefficients = _coefficients(config, layout)
    skip_action, forecaster = skipped_step(config.forecast, config.order)
    policy = AccumulatedChangePolicy(
        config.threshold, coefficients, config.warmup, config.cooldown, config.max_consecutive, skip_action
    )
    notes = (("preset", config.preset),) if config.preset else (("preset", "none (custom settings)"),)
    return Plan(indicator_scope(config.indicator, layout), policy, forecaster, notes=notes)
