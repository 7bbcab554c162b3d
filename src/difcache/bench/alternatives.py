"""The caches users have today, applied the way their documentation says, so ``difcache bench`` can run them
in the same process and on the same pipeline as difcache.

Each alternative is a function ``apply(pipe, setting) -> remove`` plus an availability check. A missing package
is reported as missing (never silently skipped); one that fails on a model is reported with its error.

* diffusers' hooks (``TaylorSeerCacheConfig``, ``FirstBlockCacheConfig``, ``MagCacheConfig``,
  ``PyramidAttentionBroadcastConfig``), applied with ``diffusers.hooks.apply_*`` so they also reach models
  without ``CacheMixin`` (DiT, PixArt). Those hooks need a ``cache_context``; pipelines whose denoiser has no
  ``CacheMixin`` never set one, so a small outer hook sets ``"cond_uncond"`` for them, as a user would, and
  their state is reset before every pipeline call (diffusers only does that itself for ``CacheMixin`` models).
  TaylorSeer gets identifiers that match the model's real attention and FFN modules (its defaults match
  nothing on several families), and fp32 factors like difcache. MagCache is calibrated first
  (``calibrate=True``) and its printed ratios are parsed, as its docs instruct.
* cache-dit: ``cache_dit.enable_cache`` with ``DBCacheConfig`` (F1B0), without a calibrator and with each of
  its calibrators (TaylorSeer, FoCa, DMD).
* the DeepCache package (``DeepCacheSDHelper``) for UNet pipelines.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import CacheContext, StateManager, _set_cache_context

from difcache.adapters import layout_of
from difcache.denoiser import find_denoiser

Remove = Callable[[], None]


@dataclass(frozen=True)
class Alternative:
    name: str
    package: str  # import name that must be present
    apply: Callable[[Any, dict[str, Any], int], Remove]  # (pipe, setting, num_inference_steps) -> remove
    knob: str  # the setting swept to trade speed for quality

    def available(self) -> bool:
        return importlib.util.find_spec(self.package) is not None


# ---------------------------------------------------------------------------------------------- diffusers hooks
class _DefaultContext(ModelHook):
    """Sets a ``"cond_uncond"`` cache context on calls the pipeline made outside any ``cache_context``."""

    def __init__(self, managers: list[StateManager]) -> None:
        super().__init__()
        self.managers = managers

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        if all(m._context is None for m in self.managers):
            _set_cache_context(module, CacheContext("cond_uncond"))
        return args, kwargs


def _hook_names(model: torch.nn.Module) -> set[tuple[int, str]]:
    return {(id(m), name) for m in model.modules() if hasattr(m, "_diffusers_hook") for name in m._diffusers_hook.hooks}


def _apply_diffusers(pipe: Any, apply_fn: Callable[[torch.nn.Module], None]) -> Remove:
    model, _ = find_denoiser(pipe)
    before = _hook_names(model)
    apply_fn(model)
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.invalidate_child_registries_cache()
    managers = [
        attr
        for r in (registry, *registry._get_child_registries())
        for hook in r.hooks.values()
        for attr in vars(hook).values()
        if isinstance(attr, StateManager)
    ]
    registry.register_hook(_DefaultContext(managers), "bench_default_context")
    added = _hook_names(model) - before

    def remove() -> None:
        names = {name for _, name in added}
        for name in names:
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()

    # diffusers resets its hooks' state at the end of a pipeline call only for CacheMixin denoisers (through
    # `maybe_free_model_hooks`); on others (DiT, the bundled pipelines) a second call would start from the first
    # call's step counter and features. The bench calls `remove.reset()` before every call, as a user would.
    remove.reset = lambda: registry.reset_stateful_hooks(recurse=True)  # type: ignore[attr-defined]
    return remove


def _diffusers_taylorseer(pipe: Any, setting: dict, steps: int) -> Remove:
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    layout = layout_of(find_denoiser(pipe)[0])
    names = "|".join(re.escape(u.name) for u in layout.units if u.kind != "block")
    config = TaylorSeerCacheConfig(
        cache_interval=setting.get("interval", 5),
        disable_cache_before_step=setting.get("warmup", 3),
        max_order=setting.get("order", 1),
        taylor_factors_dtype=torch.float32,
        cache_identifiers=[f"^({names})$"],
    )
    return _apply_diffusers(pipe, lambda m: apply_taylorseer_cache(m, config))


def _diffusers_fbc(pipe: Any, setting: dict, steps: int) -> Remove:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    config = FirstBlockCacheConfig(threshold=setting.get("threshold", 0.05))
    return _apply_diffusers(pipe, lambda m: apply_first_block_cache(m, config))


def _diffusers_magcache(pipe: Any, setting: dict, steps: int) -> Remove:
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    ratios = setting.get("mag_ratios")
    if ratios is None:
        ratios = calibrate_magcache(pipe, steps, setting["calibration_call"])
    config = MagCacheConfig(
        threshold=setting.get("threshold", 0.06),
        max_skip_steps=setting.get("max_skip_steps", 3),
        num_inference_steps=steps,
        mag_ratios=ratios,
    )
    return _apply_diffusers(pipe, lambda m: apply_mag_cache(m, config))


def calibrate_magcache(pipe: Any, steps: int, call: Callable[[], Any]) -> list[float]:
    """Run diffusers' MagCache calibration mode once and parse the ratios it prints."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    remove = _apply_diffusers(
        pipe, lambda m: apply_mag_cache(m, MagCacheConfig(num_inference_steps=steps, calibrate=True))
    )
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            call()
    finally:
        remove()
    lists = re.findall(r"\[[^\[\]]+\]", printed.getvalue())
    if not lists:
        raise RuntimeError("MagCache calibration printed no ratios.")
    return [float(x) for x in ast.literal_eval(lists[-1])]


def _diffusers_pab(pipe: Any, setting: dict, steps: int) -> Remove:
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    model, _ = find_denoiser(pipe)
    current = {"t": 1000}

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        # The pipeline's own current timestep when it keeps one; else the denoiser's argument, rescaled to 0-1000
        # for flow models that pass sigmas (PAB's skip ranges are in timestep units).
        t = getattr(pipe, "_current_timestep", None)
        if t is None:
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if isinstance(t, torch.Tensor):
            value = float(t.reshape(-1)[0])
            current["t"] = int(value * 1000 if value <= 1.0 else value)

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=setting.get("skip_range", 2),
        spatial_attention_timestep_skip_range=setting.get("timestep_range", (100, 800)),
        current_timestep_callback=lambda: current["t"],
    )
    remove = _apply_diffusers(pipe, lambda m: apply_pyramid_attention_broadcast(m, config))
    return lambda: (remove(), handle.remove())


# ---------------------------------------------------------------------------------------------- cache-dit
def _cache_dit(kind: str | None) -> Callable[[Any, dict, int], Remove]:
    """DBCache (F1B0 by default), with one of cache-dit's calibrators on the cached residual or none."""

    def apply(pipe: Any, setting: dict, steps: int) -> Remove:
        import cache_dit

        config = cache_dit.DBCacheConfig(
            Fn_compute_blocks=setting.get("Fn", 1),
            Bn_compute_blocks=setting.get("Bn", 0),
            residual_diff_threshold=setting.get("threshold", 0.08),
            max_warmup_steps=setting.get("warmup", 4),
            num_inference_steps=steps,
        )
        calibrator = {
            None: lambda: None,
            "taylorseer": lambda: cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=setting.get("order", 1)),
            "foca": lambda: cache_dit.FoCaCalibratorConfig(),
            "dmd": lambda: cache_dit.DMDCalibratorConfig(),
        }[kind]()
        target = _cache_dit_target(pipe)
        with contextlib.redirect_stdout(io.StringIO()):
            cache_dit.enable_cache(target, cache_config=config, calibrator_config=calibrator)
        return lambda: cache_dit.disable_cache(target)

    return apply


def _cache_dit_target(pipe: Any) -> Any:
    """What to hand ``cache_dit.enable_cache``: the pipeline, or cache-dit's own adapter for its transformer.

    cache-dit finds its adapters by the class-name prefix of the *official* pipeline (``DiTPipeline``), so it
    refuses a custom pipeline around a transformer it supports (the bundled ``ShapesDiTPipeline`` around a
    ``DiTTransformer2DModel``). We then call the adapter cache-dit registered for that transformer's family
    (with its patch functor), which is what its error message asks for ("set BlockAdapter").
    """
    from cache_dit.caching.block_adapters.block_registers import BlockAdapterRegister

    transformer = getattr(pipe, "transformer", None)
    if BlockAdapterRegister.is_supported(pipe) or transformer is None:
        return pipe
    name = type(transformer).__name__
    factories = BlockAdapterRegister._adapters  # cache-dit has no public lookup by transformer class
    prefix = max((p for p in factories if name.startswith(p)), key=len, default=None)
    return pipe if prefix is None else factories[prefix](pipe)


# ---------------------------------------------------------------------------------------------- DeepCache package
def _deepcache_package(pipe: Any, setting: dict, steps: int) -> Remove:
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=setting.get("interval", 3), cache_branch_id=setting.get("branch", 0))
    helper.enable()
    return helper.disable


ALTERNATIVES: dict[str, Alternative] = {
    a.name: a
    for a in (
        Alternative("diffusers-taylorseer", "diffusers", _diffusers_taylorseer, "interval"),
        Alternative("diffusers-fbc", "diffusers", _diffusers_fbc, "threshold"),
        Alternative("diffusers-magcache", "diffusers", _diffusers_magcache, "threshold"),
        Alternative("diffusers-pab", "diffusers", _diffusers_pab, "skip_range"),
        Alternative("cache-dit-dbcache", "cache_dit", _cache_dit(None), "threshold"),
        Alternative("cache-dit-dbcache-taylorseer", "cache_dit", _cache_dit("taylorseer"), "threshold"),
        Alternative("cache-dit-dbcache-foca", "cache_dit", _cache_dit("foca"), "threshold"),
        Alternative("cache-dit-dbcache-dmd", "cache_dit", _cache_dit("dmd"), "threshold"),
        Alternative("deepcache-package", "DeepCache", _deepcache_package, "interval"),
    )
}
