"""Caching and sparse attention for ComfyUI ``MODEL``s (``ModelPatcher``s), through keyed wrappers only.

:func:`patch_cache` returns a ``clone()`` of the patcher with two keyed wrappers and changes nothing else:

* ``OUTER_SAMPLE`` / :data:`CACHE_KEY`: a :class:`CacheSampleWrapper`. When a sampling call starts it builds
  the method's plan for the model's layout (the percent window applied to this call's sigma schedule),
  installs difcache's hooks on the shared ``diffusion_model``, and in a ``finally`` reads the stats, removes
  every hook and forgets all features. So hooks exist only while this patcher samples: other clones of the
  same model (an uncached KSampler in the same workflow) never see them, and no state survives a run.
* ``DIFFUSION_MODEL`` / ``difcache_steps``: tells each call its step and branch (:mod:`difcache.comfy.run`).

:func:`patch_sparse_attention` does the same with an ``OUTER_SAMPLE`` wrapper that sets up
:class:`~difcache.comfy.sparse.ComfyWanSparse` for the call. Both share one run (one step tracker) when stacked.

Applying again replaces the earlier difcache wrapper of the same kind instead of stacking a second cache.
The single ``model_function_wrapper`` slot and class-level monkey-patching are never used.

Which methods fit: those whose plan caches units with difcache's module scope under a static schedule
(:func:`comfy_methods` probes the registry). Methods that cache block ranges (TeaCache, first-block, Δ-DiT,
ERTACache) or UNet skip branches (DeepCache) read diffusers' block conventions or scheduler and are refused
with an error that says so.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from difcache.adapters.layout import Block, Layout, Unit
from difcache.comfy.adapters import ComfyAdapter, comfy_layout
from difcache.comfy.run import OUTER_SAMPLE, add_step_wrapper, sampling_run
from difcache.comfy.scope import ResidualBlockScope
from difcache.comfy.sparse import ComfyWanSparse, SparseOverride, check_supported, parse_blocks, sparse_api
from difcache.config import CacheConfig
from difcache.core import Action, Plan, StaticPolicy
from difcache.engine.runtime import CacheRuntime
from difcache.engine.scopes.module import ModuleScope
from difcache.engine.stats import CacheStats
from difcache.errors import DifcacheError
from difcache.methods import list_methods, method_spec, resolve_config

log = logging.getLogger("difcache.comfy")

CACHE_KEY = "difcache_cache"
SPARSE_KEY = "difcache_sparse_attention"
ON_PREPARE_STATE, ON_CLEANUP = "on_prepare_state", "on_cleanup"  # comfy.patcher_extension.CallbacksMP
_PROBE_FAMILIES = ("flux", "wan", "unet")


# ---------------------------------------------------------------------------------------------- methods
def _fits(plan: Plan) -> bool:
    return type(plan.scope) is ModuleScope and not plan.policy.dynamic and not plan.extras


@functools.lru_cache(1)
def comfy_methods() -> tuple[str, ...]:
    """Registered methods that work on ComfyUI models: a static schedule over module-scope units, no extras.

    Probed by building each method's plan on a one-unit layout of every supported family; a method that
    raises (it needs skip branches, block ranges, a profile...) does not fit.
    """
    probe = torch.nn.Module()
    probe.attn = torch.nn.Identity()
    fitting = []
    for name in list_methods():
        for family in _PROBE_FAMILIES:
            layout = Layout(family, probe, (Block("b.0", probe, "b", 0),), (Unit("b.0.attn", probe.attn, "attn", 0),))
            try:
                config = resolve_config(name, layout, {})
                if _fits(method_spec(config).build(config, layout)):
                    fitting.append(name)
                    break
            except Exception:  # noqa: BLE001  (any failure means: does not fit)
                continue
    return tuple(fitting)


@dataclass(frozen=True)
class WindowedPolicy:
    """The method's schedule on the steps in ``active``; every unit is computed on the others."""

    inner: StaticPolicy
    active: frozenset[int]
    dynamic: ClassVar[bool] = False

    def decide(self, step: int, num_steps: int | None, unit: int) -> Action:
        return self.inner.decide(step, num_steps, unit) if step in self.active else Action.COMPUTE


def active_steps(
    schedule: list[float], start_percent: float, end_percent: float, percent_to_sigma: Callable | None
) -> frozenset[int]:
    """Steps whose sigma lies in ComfyUI's ``(sigma(end_percent), sigma(start_percent)]``; without the model's
    ``percent_to_sigma``, the steps in ``[start, end)`` of the step range."""
    steps = range(max(len(schedule) - 1, 0))
    if percent_to_sigma is None:
        n = len(steps)
        return frozenset(s for s in steps if start_percent <= s / max(n, 1) < end_percent)
    start, end = float(percent_to_sigma(start_percent)), float(percent_to_sigma(end_percent))
    return frozenset(s for s in steps if schedule[s] <= start * (1 + 1e-6) and schedule[s] > end)


# ---------------------------------------------------------------------------------------------- cache
@dataclass(frozen=True)
class CacheSpec:
    """What the Apply Cache node asked for: a method, config overrides and the active part of the schedule."""

    method: str
    overrides: tuple[tuple[str, Any], ...] = ()
    start_percent: float = 0.0
    end_percent: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.start_percent < self.end_percent <= 1.0:
            raise DifcacheError(
                f"difcache needs 0 <= start_percent < end_percent <= 1, got {self.start_percent} and "
                f"{self.end_percent}; set end_percent above start_percent."
            )

    def config(self, layout: Layout) -> CacheConfig:
        try:
            return resolve_config(self.method, layout, dict(self.overrides))
        except (TypeError, ValueError) as err:
            raise DifcacheError(f"difcache {self.method!r} on {type(layout.model).__name__}: {err}") from None

    def plan(self, layout: Layout, adapter: ComfyAdapter, active: frozenset[int] | None = None) -> Plan:
        """The method's plan for a ComfyUI model, with the adapter's scope and the percent window."""
        config = self.config(layout)
        plan = method_spec(config).build(config, layout)
        if not _fits(plan):
            raise DifcacheError(
                f"difcache {self.method!r} caches {type(plan.scope).__name__} units or needs a live signal or a "
                f"scheduler, which the ComfyUI nodes do not support; use one of {list(comfy_methods())}."
            )
        if adapter.scope == "residual":
            plan = dataclasses.replace(plan, scope=ResidualBlockScope(plan.scope.units, adapter.streams_of))
        if active is not None:
            plan = dataclasses.replace(plan, policy=WindowedPolicy(plan.policy, active))
        return plan

    def check(self, diffusion_model: torch.nn.Module) -> Layout:
        """Fail now (on the node) rather than at sampling time if the method does not fit this model."""
        layout, adapter = comfy_layout(diffusion_model)
        self.plan(layout, adapter)
        return layout


@dataclass
class CacheSampleWrapper:
    """``OUTER_SAMPLE`` wrapper: difcache's hooks for the duration of one sampling call."""

    spec: CacheSpec
    last_stats: CacheStats | None = field(default=None, compare=False)

    def __call__(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        with sampling_run(executor, args, kwargs) as run:
            layout, adapter = comfy_layout(run.model)
            sampling = _model_sampling(executor.class_obj)
            active = active_steps(run.schedule, self.spec.start_percent, self.spec.end_percent, sampling)
            window = None if not run.schedule or len(active) == len(run.schedule) - 1 else active
            plan = self.spec.plan(layout, adapter, window)
            runtime = CacheRuntime(self.spec.method, layout, plan)
            runtime.install()
            try:
                return executor(*args, **kwargs)
            finally:
                self.last_stats = runtime.sync_stats()
                runtime.remove()
                _log_stats(self.last_stats, run, type(run.model).__name__)


def _model_sampling(guider: Any) -> Callable | None:
    try:
        return guider.model_patcher.get_model_object("model_sampling").percent_to_sigma
    except AttributeError:
        return None


def _log_stats(stats: CacheStats, run: Any, model_name: str) -> None:
    totals = stats.totals()
    if stats.calls and not run.calls:
        log.warning(
            "difcache: %s never called ComfyUI's DIFFUSION_MODEL wrappers, so no step was known and nothing was "
            "cached. Update ComfyUI: recent versions call them from every model's forward.",
            model_name,
        )
    log.info(
        "difcache %s on %s: %d model calls, units %d computed / %d reused / %d forecast, ideal speedup %.2fx, "
        "feature store peak %.1f MiB",
        stats.method, model_name, stats.calls, totals["compute"], totals["reuse"], totals["forecast"],
        stats.ideal_speedup, stats.peak_store_bytes / 2**20,
    )  # fmt: skip
    log.debug("%s", stats)


def patch_cache(model: Any, spec: CacheSpec) -> Any:
    """A clone of ``model`` (a ``ModelPatcher``) that samples with difcache's cache; ``model`` is untouched."""
    spec.check(model.get_model_object("diffusion_model"))
    patched = model.clone()
    patched.remove_wrappers_with_key(OUTER_SAMPLE, CACHE_KEY)
    patched.add_wrapper_with_key(OUTER_SAMPLE, CACHE_KEY, CacheSampleWrapper(spec))
    add_step_wrapper(patched)
    return patched


# ---------------------------------------------------------------------------------------------- sparse attention
@dataclass
class SparseSampleWrapper:
    """``OUTER_SAMPLE`` wrapper: difcache's sparse attention on the diffusion model for one sampling call.

    The override itself is installed when the node patches the model and on every ``ON_PREPARE_STATE``
    (:class:`~difcache.comfy.sparse.SparseOverride`); this wrapper gives it the run's state (step tracker, hooks,
    the sigma window's steps) and clears that state in a ``finally``.
    """

    config: Any
    start_percent: float = 0.0
    end_percent: float = 1.0
    dense_blocks: frozenset[int] = frozenset()
    override: SparseOverride = field(default_factory=SparseOverride, compare=False)
    last_stats: Any = field(default=None, compare=False)

    def __call__(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        with sampling_run(executor, args, kwargs) as run:
            options = executor.class_obj.model_options.setdefault("transformer_options", {})
            window = None
            if run.schedule and (self.start_percent > 0.0 or self.end_percent < 1.0):
                sampling = _model_sampling(executor.class_obj)
                window = active_steps(run.schedule, self.start_percent, self.end_percent, sampling)
            sparse = ComfyWanSparse(run.model, self.config, run.tracker, window, self.dense_blocks)
            self.override.sparse = sparse
            self.override.install(options)
            try:
                return executor(*args, **kwargs)
            finally:
                self.last_stats = sparse.stats()
                self.override.on_cleanup()  # ComfyUI's ON_CLEANUP may have run already, inside the sampler
                log.info("difcache on %s: %s", type(run.model).__name__, self.last_stats)


def patch_sparse_attention(
    model: Any,
    method: str = "psa",
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    dense_blocks: str = "",
    **settings: Any,
) -> Any:
    """A clone of ``model`` that samples with difcache's sparse attention; ``model`` is untouched.

    ``method`` and ``settings`` are those of :func:`difcache.apply_sparse_attention` (a method name and its config
    fields); ``start_percent``/``end_percent`` gate by sigma and ``dense_blocks`` (``"0, 1, 47-49"``) keeps blocks
    dense, as ComfyUI's own block-sparse node does. Fails here if the model or the settings are not supported.
    """
    resolve, _ = sparse_api()
    check_supported(model.get_model_object("diffusion_model"))
    if not 0.0 <= start_percent < end_percent <= 1.0:
        raise DifcacheError(
            f"difcache Sparse Attention needs 0 <= start_percent < end_percent <= 1, got {start_percent} and "
            f"{end_percent}; set end_percent above start_percent."
        )
    try:
        config = resolve(method, settings)
    except (TypeError, ValueError) as err:
        raise DifcacheError(f"difcache Sparse Attention: {err}") from None
    wrapper = SparseSampleWrapper(config, start_percent, end_percent, parse_blocks(dense_blocks))
    patched = model.clone()
    patched.remove_wrappers_with_key(OUTER_SAMPLE, SPARSE_KEY)
    patched.add_wrapper_with_key(OUTER_SAMPLE, SPARSE_KEY, wrapper)
    wrapper.override.install(patched.model_options.setdefault("transformer_options", {}))
    callbacks = {ON_PREPARE_STATE: wrapper.override.on_prepare_state, ON_CLEANUP: wrapper.override.on_cleanup}
    for event, callback in callbacks.items():
        patched.remove_callbacks_with_key(event, SPARSE_KEY)
        patched.add_callback_with_key(event, SPARSE_KEY, callback)
    add_step_wrapper(patched)
    return patched
