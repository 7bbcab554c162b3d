"""The public verbs: ``apply_cache`` and ``remove_cache``, and the handle they return."""

from __future__ import annotations

from typing import Any

import torch

from difcache.adapters import layout_of
from difcache.config import CacheConfig
from difcache.engine.runtime import CacheRuntime
from difcache.engine.stats import CacheStats
from difcache.errors import DifcacheError
from difcache.methods import method_spec, resolve_config

_HANDLE_ATTR = "_difcache_cache"


def find_denoiser(target: Any) -> tuple[torch.nn.Module, Any]:
    """The denoiser (``transformer`` or ``unet``) and scheduler of a pipeline, or ``(target, None)`` for a module."""
    if isinstance(target, torch.nn.Module):
        return target, None
    for name in ("transformer", "unet"):
        module = getattr(target, name, None)
        if isinstance(module, torch.nn.Module):
            return module, getattr(target, "scheduler", None)
    raise DifcacheError(
        f"Cannot find a denoiser in {type(target).__name__}: expected a diffusers pipeline with a `transformer` "
        "or `unet`, or the denoiser module itself (e.g. apply_cache(pipe.transformer, ...))."
    )


class CacheHandle:
    """What ``apply_cache`` returns: ``stats()``, ``remove()``, and a context manager that removes on exit."""

    def __init__(self, runtime: CacheRuntime, config: CacheConfig) -> None:
        self._runtime: CacheRuntime | None = runtime
        self.config = config
        self.layout = runtime.layout

    @property
    def active(self) -> bool:
        return self._runtime is not None

    def stats(self) -> CacheStats:
        """Decisions per unit, ideal speedup and store memory since the cache was applied."""
        if self._runtime is None:
            raise DifcacheError("This cache was removed; stats are gone. Read stats() before remove().")
        return self._runtime.sync_stats()

    def reset_stats(self) -> None:
        """Start counting afresh (e.g. after a warm-up call)."""
        self._require().reset_stats()

    def remove(self) -> None:
        """Remove every hook and restore the scheduler; outputs become bit-identical to the uncached model."""
        if self._runtime is None:
            return
        model = self._runtime.model
        self._runtime.remove()
        self._runtime = None
        if getattr(model, _HANDLE_ATTR, None) is self:
            delattr(model, _HANDLE_ATTR)

    def _require(self) -> CacheRuntime:
        if self._runtime is None:
            raise DifcacheError("This cache was removed; apply a new one with difcache.apply_cache(...).")
        return self._runtime

    def __enter__(self) -> CacheHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        units = len(self._runtime.plan.scope.units) if self._runtime is not None else "?"
        return f"CacheHandle({self.config!r}, {units} units, {state})"


def apply_cache(target: Any, method: str | CacheConfig = "taylorseer", **overrides: Any) -> CacheHandle:
    """Cache the denoiser of ``target`` (a diffusers pipeline or the denoiser module) with ``method``.

    Args:
        target: a pipeline (its ``transformer`` or ``unet`` is cached, and its scheduler gives exact step
            indices) or a denoiser module.
        method: a method name (``difcache.list_methods()``), which takes the paper's defaults for this model
            family, or a config instance such as ``difcache.TaylorSeerConfig(interval=6)``.
        **overrides: config fields to override, e.g. ``interval=3``.

    Returns:
        A :class:`CacheHandle`; the pipeline is called exactly as before.
    """
    model, scheduler = find_denoiser(target)
    existing = getattr(model, _HANDLE_ATTR, None)
    if existing is not None:
        raise DifcacheError(
            f"{type(model).__name__} already has a difcache cache ({existing.config!r}); call handle.remove() "
            "or difcache.remove_cache(target) before applying another."
        )
    if getattr(model, "is_cache_enabled", False):
        raise DifcacheError(
            f"{type(model).__name__} already has a diffusers cache ({type(model._cache_config).__name__}); "
            "call model.disable_cache() first: the two would both skip work and stack errors."
        )
    layout = layout_of(model)
    try:
        config = resolve_config(method, layout.family, overrides)
    except DifcacheError as err:
        raise DifcacheError(f"apply_cache({method!r}) on {type(model).__name__}: {err}") from None
    plan = method_spec(config).build(config, layout)
    if not plan.scope.units:  # never report caching as enabled when nothing would be hooked
        raise DifcacheError(
            f"{config.method!r} finds nothing to cache in {type(model).__name__}; for UNets without transformer "
            "blocks use method='deepcache', or register an adapter with difcache.register_adapter(...)."
        )
    runtime = CacheRuntime(config.method, layout, plan, scheduler)
    runtime.install()
    handle = CacheHandle(runtime, config)
    setattr(model, _HANDLE_ATTR, handle)
    return handle


def remove_cache(target: Any) -> bool:
    """Remove difcache's cache from ``target`` (pipeline or module); returns whether one was active."""
    model, _ = find_denoiser(target)
    handle = getattr(model, _HANDLE_ATTR, None)
    if handle is None:
        return False
    handle.remove()
    return True
