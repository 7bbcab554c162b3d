"""The hooks difcache installs, built on diffusers' ``ModelHook``/``HookRegistry``.

* ``CacheRootHook`` on the denoiser counts calls, measures FLOPs once per input shape and the store's memory.
* ``UnitHook`` on each unit (module scope) asks the runtime for the step's action and either runs the module
  and records its output, or returns the forecaster's prediction. A prediction that is not finite falls back
  to computing the unit (counted in the stats).

Hook names are module constants so removal finds them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils._pytree import tree_flatten, tree_unflatten

from difcache.engine.actions import Action
from difcache.engine.flops import measure_flops
from difcache.engine.steps import _shape_key

if TYPE_CHECKING:
    from difcache.engine.runtime import CacheRuntime

ROOT_HOOK = "difcache_cache_root"
UNIT_HOOK = "difcache_unit"


def register(module: torch.nn.Module, hook: ModelHook, name: str) -> Callable[[], None]:
    """Register ``hook`` on ``module`` under ``name``; return a function that removes exactly that hook."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, name)
    return lambda: registry.remove_hook(name, recurse=False)


class CacheRootHook(ModelHook):
    def __init__(self, runtime: CacheRuntime) -> None:
        super().__init__()
        self.runtime = runtime
        self._flops: dict[tuple, tuple[int, list[int]]] = {}

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        rt = self.runtime
        key = _shape_key(args, kwargs)
        measured = self._flops.get(key)
        if measured is None:
            units = [u.module for u in rt.plan.scope.units]
            output, total, per_unit = measure_flops(
                module, units, lambda: self.fn_ref.original_forward(*args, **kwargs)
            )
            self._flops[key] = measured = (total, per_unit)
            rt.unit_flops = per_unit
            rt.on_flops_measured(total, per_unit)
        else:
            rt.unit_flops = measured[1]
            output = self.fn_ref.original_forward(*args, **kwargs)
        rt.stats.calls += 1
        rt.stats.full_flops += measured[0]
        rt.after_call()
        return output


class UnitHook(ModelHook):
    def __init__(self, runtime: CacheRuntime, unit: int) -> None:
        super().__init__()
        self.runtime = runtime
        self.unit = unit
        self._spec: Any = None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        rt = self.runtime
        info = rt.tracker.info
        if info is None:  # called outside a tracked denoiser forward: behave as if uncached
            return self.fn_ref.original_forward(*args, **kwargs)
        action = rt.action(info, self.unit)
        if action != Action.COMPUTE:
            state = rt.store.get(info.branch, self.unit)
            if state is not None:
                forecaster = rt.plan.forecaster
                leaves = forecaster.predict(state, info.step)
                if not forecaster.extrapolates or _all_finite(leaves):
                    rt.stats.count(self.unit, action)
                    rt.stats.skipped_flops += rt.unit_flops[self.unit]
                    return tree_unflatten(leaves, self._spec)
                rt.stats.units[self.unit].nonfinite_fallbacks += 1
        output = self.fn_ref.original_forward(*args, **kwargs)
        rt.stats.count(self.unit, Action.COMPUTE)
        if rt.needs_update(info.step, self.unit):
            leaves, self._spec = tree_flatten(output)
            leaves = [leaf if isinstance(leaf, torch.Tensor) else None for leaf in leaves]
            previous = rt.store.get(info.branch, self.unit)
            rt.store.put(info.branch, self.unit, rt.plan.forecaster.update(previous, info.step, leaves))
        return output


def _all_finite(leaves: list[torch.Tensor | None]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in leaves if t is not None)
