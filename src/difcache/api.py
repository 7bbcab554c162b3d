"""The public verbs: ``apply_cache``, ``remove_cache``, ``calibrate`` and ``autotune``, and the handle
``apply_cache`` returns."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from difcache.adapters import layout_of
from difcache.config import CacheConfig
from difcache.denoiser import HANDLE_ATTR, check_calibration_call, find_denoiser
from difcache.engine.calibration import CalibrationSession
from difcache.engine.runtime import CacheRuntime
from difcache.engine.stats import CacheStats
from difcache.errors import DifcacheError
from difcache.handle import Handle
from difcache.methods import method_spec, resolve_config
from difcache.profile import Profile
from difcache.tuning import autotune as tuning
from difcache.version import __version__


class CacheHandle(Handle[CacheRuntime]):
    """What ``apply_cache`` returns: ``stats()``, ``remove()``, and a context manager that removes on exit."""

    kind = "cache"
    verb = "difcache.apply_cache(...)"
    attr = HANDLE_ATTR

    def __init__(self, runtime: CacheRuntime, config: CacheConfig) -> None:
        super().__init__(runtime.model, config, runtime)
        self.layout = runtime.layout

    def stats(self) -> CacheStats:
        """Decisions per unit, ideal speedup and store memory since the cache was applied."""
        return super().stats()

    def _read_stats(self, runtime: CacheRuntime) -> CacheStats:
        return runtime.sync_stats()

    def _release(self, runtime: CacheRuntime) -> None:
        runtime.remove()

    def _describe(self) -> str:
        return f"{len(self._runtime.plan.scope.units)} units" if self._runtime is not None else "? units"


def apply_cache(
    target: Any,
    method: str | CacheConfig | None = None,
    *,
    profile: str | os.PathLike | Profile | None = None,
    **overrides: Any,
) -> CacheHandle:
    """Cache the denoiser of ``target`` (a diffusers pipeline or the denoiser module) with ``method``.

    Args:
        target: a pipeline (its ``transformer`` or ``unet`` is cached, and its scheduler gives exact step
            indices) or a denoiser module; either may be compiled (``torch.compile``) before or after.
        method: a method name (``difcache.list_methods()``), which takes the paper's defaults for this model,
            or a config instance such as ``difcache.TaylorSeerConfig(interval=6)``. Default ``"taylorseer"``,
            or the method a ``profile`` was made for.
        profile: a profile from ``difcache.autotune`` or ``difcache.calibrate`` (path or object).
        **overrides: config fields to override, e.g. ``interval=3``.

    Returns:
        A :class:`CacheHandle`; the pipeline is called exactly as before.
    """
    model, source = find_denoiser(target)
    CacheHandle.check_free(model)
    if getattr(model, "is_cache_enabled", False):
        raise DifcacheError(
            f"{type(model).__name__} already has a diffusers cache ({type(model._cache_config).__name__}); "
            "call model.disable_cache() first: the two would both skip work and stack errors."
        )
    if profile is not None:
        loaded = Profile.load(profile)
        method = loaded.method if method is None else method
        overrides = {**overrides, "profile": loaded}
    layout = layout_of(model)
    try:
        config = resolve_config("taylorseer" if method is None else method, layout, overrides)
    except (DifcacheError, TypeError, ValueError) as err:
        raise DifcacheError(f"apply_cache({method!r}) on {type(model).__name__}: {err}") from None
    plan = method_spec(config).build(config, layout)
    if not plan.scope.units:  # never report caching as enabled when nothing would be hooked
        raise DifcacheError(
            f"{config.method!r} finds nothing to cache in {type(model).__name__}; for UNets without transformer "
            "blocks use method='deepcache', or register an adapter with difcache.register_adapter(...)."
        )
    runtime = CacheRuntime(config.method, layout, plan, source)
    runtime.install()
    handle = CacheHandle(runtime, config)
    handle.attach()
    return handle


def remove_cache(target: Any) -> bool:
    """Remove difcache's cache from ``target`` (pipeline or module); returns whether one was active."""
    model, _ = find_denoiser(target)
    handle = getattr(model, HANDLE_ATTR, None)
    if handle is None:
        return False
    handle.remove()
    return True


def calibrate(
    pipe: Any,
    method: str,
    call_kwargs: Sequence[dict[str, Any]],
    num_inference_steps: int,
    **overrides: Any,
) -> Profile:
    """Calibrate ``method`` on ``pipe`` with uncached runs over ``call_kwargs``; returns a :class:`Profile`.

    Example::

        profile = difcache.calibrate(pipe, "bac", [dict(prompt=p) for p in prompts], num_inference_steps=50)
        profile.save("flux-50.json")
        difcache.apply_cache(pipe, "bac", profile="flux-50.json")
    """
    check_calibration_call(pipe, call_kwargs, num_inference_steps)
    model, source = find_denoiser(pipe)
    if source is None:
        raise DifcacheError("calibrate() needs the pipeline (its scheduler gives step indices), not a bare module.")
    layout = layout_of(model)
    config = resolve_config(method, layout, overrides)
    spec = method_spec(config)
    if spec.calibrate is None:
        raise DifcacheError(f"{config.method!r} needs no calibration; apply it directly with apply_cache.")
    session = CalibrationSession(pipe, model, num_inference_steps)
    try:
        data = spec.calibrate(config, layout, session, list(call_kwargs))
    finally:
        session.close()
    return Profile(
        method=config.method,
        model_class=type(model).__name__,
        fingerprint=layout.fingerprint,
        num_steps=num_inference_steps,
        data=data,
        config={k: v for k, v in config.to_dict().items() if k != "profile"},
        version=Profile.VERSION,
        difcache_version=__version__,
    )


def autotune(
    pipe: Any, speedup: float, call_kwargs: Sequence[dict[str, Any]], num_inference_steps: int, **options: Any
) -> Profile:
    """Fit the schedule, scope and forecast to ``pipe`` for an ideal ``speedup``; returns a :class:`Profile` that
    ``apply_cache(pipe, profile=...)`` runs. See :func:`difcache.tuning.autotune.autotune` for the options.

    Example::

        profile = difcache.autotune(pipe, speedup=3.0, call_kwargs=[dict(prompt=p) for p in prompts],
                                    num_inference_steps=50)
        profile.save("flux-50-3x.json")
        difcache.apply_cache(pipe, profile="flux-50-3x.json")
    """
    return tuning.autotune(pipe, speedup, call_kwargs, num_inference_steps, apply=apply_cache, **options)
