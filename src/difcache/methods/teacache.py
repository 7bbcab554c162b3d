"""TeaCache (Liu et al., "Timestep Embedding Tells", CVPR 2025, arXiv 2411.19108; ali-vilab/TeaCache), and
first-block cache as its ``indicator="first_block_residual"`` variant.

Scope: the residual of the whole block stack (FLUX: double and single blocks) — reused while the accumulated,
polynomially rescaled change of an indicator stays below ``threshold``
(:class:`~difcache.policies.teacache.AccumulatedChangePolicy`). Indicators:

* ``"modulated_input"``: the first block's timestep-modulated input, as in the official FLUX, HunyuanVideo and
  DiT-family code (``norm1(hidden, emb=temb)[0]``; PixArt's ``adaLN-single`` modulation recomputed likewise).
* ``"timestep_embedding"``: the timestep projection the blocks receive (``temb``): the official Wan2.1 code in
  its ``use_ret_steps`` mode (``e0``). Also used for CogVideoX and LTX, where we have not verified the official
  indicator — a documented choice, not the paper's.
* ``"first_block_residual"``: first-block cache (ParaAttention's FBCache, diffusers' ``FirstBlockCacheConfig``):
  block 0 always runs, its residual is the signal and blocks 1.. are the cached range. Unlike diffusers'
  version, changes accumulate across skipped steps exactly as TeaCache's do, so a run of small changes cannot
  skip forever.

Coefficients (``np.poly1d`` order, highest degree first) are the official ones for FLUX.1-dev, HunyuanVideo
and Wan2.1-T2V-1.3B (ret-steps); other families start from the identity ``(1, 0)`` and should be fitted with
``difcache.calibrate(pipe, "teacache", ...)``, which fits a degree-4 polynomial from the indicator's change to
the stack output's change over calibration runs, as the paper does. Default thresholds are the official
scripts' (FLUX 0.6 ≈ 2.0×, HunyuanVideo 0.15, Wan 0.08); 0.1 elsewhere (ours). First and last steps are
always computed (Wan: the first 5, as with ``ret_steps``).

``forecast="taylor"`` (ours; the paper reuses): a skipped step extrapolates the cached residual with
TaylorSeer's finite-difference expansion of order ``order``
(:class:`~difcache.forecasters.taylor.TaylorForecaster`, in step-index units over the irregular gaps the
dynamic policy leaves) instead of returning the last one. With the first-block indicator this is what
cache-dit calls DBCache with its TaylorSeer calibrator (``TaylorSeerCalibratorConfig``, order 1 by default, as
here). The policy is the same; only what a skipped step returns differs (and, through the latents, the
indicator's later values).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers.hooks import ModelHook

from difcache.adapters.layout import Layout
from difcache.calibration import CalibrationSession
from difcache.config import CacheConfig, check_choice, check_float, check_int
from difcache.engine.hooks import register
from difcache.engine.plan import Plan
from difcache.engine.range_scope import BlockRangeScope, _Streams
from difcache.errors import DifcacheError
from difcache.forecasters import FORECASTS, skipped_step
from difcache.methods.registry import register_calibrator, register_method
from difcache.policies.teacache import AccumulatedChangePolicy, relative_l1
from difcache.profile import Profile

INDICATORS = ("modulated_input", "timestep_embedding", "first_block_residual")
IDENTITY = (1.0, 0.0)
_PRESETS: dict[str, dict[str, Any]] = {
    "flux": {"threshold": 0.6, "coefficients": (498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861)},
    "hunyuanvideo": {
        "threshold": 0.15,
        "coefficients": (733.226126, -401.131952, 67.5869174, -3.149879, 0.0961237896),
    },
    "wan": {
        "threshold": 0.08,
        "indicator": "timestep_embedding",
        "warmup": 5,
        "coefficients": (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
    },
    "cogvideox": {"indicator": "timestep_embedding"},
    "ltx": {"indicator": "timestep_embedding"},
}


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

    @classmethod
    def for_family(cls, family: str) -> TeaCacheConfig:
        return cls(**_PRESETS.get(family, {}))

    def replace(self, **overrides: Any) -> TeaCacheConfig:
        """As :meth:`CacheConfig.replace`; changing ``indicator`` without new ``coefficients`` resets them to the
        identity. A polynomial is fitted for one indicator (the Wan preset's maps changes of the timestep
        embedding), and carried over to another it rescales the wrong quantity: ``apply_cache(wan_pipe,
        "teacache", indicator="first_block_residual")`` would otherwise run with Wan's timestep polynomial."""
        if overrides.get("indicator", self.indicator) != self.indicator and "coefficients" not in overrides:
            overrides = {**overrides, "coefficients": IDENTITY}
        return super().replace(**overrides)


# ---------------------------------------------------------------------------------------------- indicators
def _norm1_arguments(family: str) -> Callable[[dict], tuple[tuple, dict]] | None:
    """How block 0 calls its own ``norm1`` (the modulated input is that call's first output), by family."""
    if family in ("flux", "hunyuanvideo", "sd3"):
        return lambda a: ((a["hidden_states"],), {"emb": a["temb"]})
    if family == "dit":
        return lambda a: (
            (a["hidden_states"], a["timestep"], a["class_labels"]),
            {"hidden_dtype": a["hidden_states"].dtype},
        )
    return None


def _pixart_modulated_input(block: torch.nn.Module, a: dict) -> torch.Tensor:
    """PixArt's ``adaLN-single`` modulation of block 0's input, recomputed (its ``norm1`` is a plain LayerNorm)."""
    hidden, timestep = a["hidden_states"], a["timestep"]
    table = block.scale_shift_table[None] + timestep.reshape(hidden.shape[0], 6, -1)
    shift, scale = table[:, 0:1], table[:, 1:2]
    return block.norm1(hidden) * (1 + scale) + shift


class _Norm1Memo(ModelHook):
    """Gives block 0 the ``norm1`` output the indicator already computed in this call.

    TeaCache's modulated input *is* block 0's ``norm1`` output (with its timestep/class embedding MLP); the
    official code computes it for the indicator and, on computed steps, again inside the block. The
    indicator's call is remembered here and returned for the block's own call when that comes with the same
    tensors (by identity) and arguments, so a computed step runs ``norm1`` once. Any other call runs normally.
    """

    def __init__(self) -> None:
        super().__init__()
        self._entry: tuple[tuple, dict, Any] | None = None

    def call(self, norm: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        output = norm(*args, **kwargs)
        self._entry = (args, kwargs, output)
        return output

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        entry, self._entry = self._entry, None
        if entry is not None and _same_call(entry[0], entry[1], args, kwargs):
            return entry[2]
        return self.fn_ref.original_forward(*args, **kwargs)


def _same_call(args: tuple, kwargs: dict, other_args: tuple, other_kwargs: dict) -> bool:
    def same(a: Any, b: Any) -> bool:
        return a is b if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) else a == b

    return (
        len(args) == len(other_args)
        and kwargs.keys() == other_kwargs.keys()
        and all(same(a, b) for a, b in zip(args, other_args, strict=True))
        and all(same(v, other_kwargs[k]) for k, v in kwargs.items())
    )


class _ModulatedInputScope(BlockRangeScope):
    """The whole stack, with block 0's modulated input as the signal, computed once per call (:class:`_Norm1Memo`)."""

    def __init__(self, layout: Layout, arguments: Callable[[dict], tuple[tuple, dict]]) -> None:
        self.memo = _Norm1Memo()
        self._first = layout.blocks[0].module
        super().__init__(
            layout, [(0, len(layout.blocks) - 1)], signal=lambda block, a: self.memo.call(block.norm1, *arguments(a))[0]
        )

    def install(self, runtime: Any) -> list:
        return [register(self._first.norm1, self.memo, "difcache_norm1_memo"), *super().install(runtime)]


class _FirstBlockProbe(ModelHook):
    """Records block 0's residual (output − input, image stream) as the first-block-cache signal."""

    def __init__(self, streams: _Streams) -> None:
        super().__init__()
        self.streams = streams
        self.residual: torch.Tensor | None = None
        self._input: torch.Tensor | None = None

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self._input = self.streams.bind(args, kwargs)[self.streams.hidden_arg]
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        hidden, _ = self.streams.outputs(output)
        self.residual, self._input = hidden - self._input, None
        return output


class _FirstBlockScope(BlockRangeScope):
    def __init__(self, layout: Layout) -> None:
        if len(layout.blocks) < 2:
            raise DifcacheError("First-block cache needs at least 2 blocks.")
        self.probe = _FirstBlockProbe(_Streams.of(layout.blocks[0].module))
        self._first = layout.blocks[0].module
        super().__init__(layout, [(1, len(layout.blocks) - 1)], signal=lambda block, a: self.probe.residual)

    def install(self, runtime: Any) -> list:
        return [register(self._first, self.probe, "difcache_first_block"), *super().install(runtime)]


def _scope(config: TeaCacheConfig, layout: Layout) -> BlockRangeScope:
    if layout.is_unet:
        raise DifcacheError("TeaCache caches a transformer block stack; for UNets use method='deepcache'.")
    if config.indicator == "first_block_residual":
        return _FirstBlockScope(layout)
    if config.indicator == "timestep_embedding":
        return BlockRangeScope(layout, [(0, len(layout.blocks) - 1)], signal=lambda block, a: a["temb"])
    arguments = _norm1_arguments(layout.family)
    if arguments is not None:
        return _ModulatedInputScope(layout, arguments)
    if layout.family == "pixart":
        return BlockRangeScope(layout, [(0, len(layout.blocks) - 1)], signal=_pixart_modulated_input)
    raise DifcacheError(
        f"TeaCache's modulated-input indicator is not available for {layout.family!r}; use "
        "indicator='timestep_embedding' or indicator='first_block_residual'."
    )


@register_method(TeaCacheConfig, "TeaCache: skip the block stack while the accumulated indicator change is small")
def build(config: TeaCacheConfig, layout: Layout) -> Plan:
    coefficients = config.coefficients
    if config.profile is not None:
        profile = Profile.load(config.profile)
        profile.check("teacache", type(layout.model).__name__, layout.fingerprint)
        coefficients = tuple(profile.data["coefficients"])
    skip_action, forecaster = skipped_step(config.forecast, config.order)
    policy = AccumulatedChangePolicy(
        config.threshold, coefficients, config.warmup, config.cooldown, config.max_consecutive, skip_action
    )
    return Plan(_scope(config, layout), policy, forecaster)


@register_calibrator(TeaCacheConfig)
def calibrate(config: TeaCacheConfig, layout: Layout, session: CalibrationSession, call_kwargs: list) -> dict:
    """Fit the rescaling polynomial (degree 4) from the indicator's relative change to the stack output's."""
    scope = _scope(config, layout)
    head, tail = scope.units[0].modules[0], scope.units[0].modules[-1]
    head_streams, tail_streams = _Streams.of(head), _Streams.of(tail)
    previous: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    pending: dict[tuple, torch.Tensor] = {}
    xs: list[float] = []
    ys: list[float] = []
    if isinstance(scope, _FirstBlockScope):
        session.probe_inputs(layout.blocks[0].module, lambda info, a, k: scope.probe.pre_forward(None, *a, **k))
        session.probe(layout.blocks[0].module, lambda info, a, k, out: scope.probe.post_forward(None, out))

    def on_head(info: Any, args: tuple, kwargs: dict) -> None:
        pending[(session.call_index, info.branch)] = scope.signal(head, head_streams.bind(args, kwargs)).float()

    def on_tail(info: Any, args: tuple, kwargs: dict, output: Any) -> None:
        key = (session.call_index, info.branch)
        signal, out = pending.pop(key), tail_streams.outputs(output)[0].float()
        if key in previous:
            prev_signal, prev_out = previous[key]
            xs.append(relative_l1(signal, prev_signal))
            ys.append(relative_l1(out, prev_out))
        previous[key] = (signal, out)

    session.probe_inputs(head, on_head)
    session.probe(tail, on_tail)
    session.run(call_kwargs, desc="teacache calibration")
    if len(xs) < 5:
        raise DifcacheError("TeaCache calibration needs more steps or calls (fewer than 5 step pairs recorded).")
    coefficients = np.polyfit(np.asarray(xs), np.asarray(ys), 4).tolist()
    return {"coefficients": coefficients, "indicator": config.indicator, "pairs": len(xs)}
