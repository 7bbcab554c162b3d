"""The hooks difcache installs, built on diffusers' ``ModelHook``/``HookRegistry``.

* ``CacheRootHook`` on the denoiser counts calls, measures FLOPs once per input shape and the store's memory.
* ``UnitHook`` on each unit (module scope) asks the runtime for the step's action and either runs the module
  and records its output, or returns the forecaster's prediction. A prediction that is not finite falls back
  to computing the unit (counted in the stats).

Hook names are module constants so removal finds them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils._pytree import tree_flatten, tree_unflatten

from difcache.engine.flops import measure_flops
from difcache.engine.steps import _shape_key

if TYPE_CHECKING:
    from difcache.engine.runtime import CacheRuntime

ROOT_HOOK = "difcache_cache_root"
_FLAT = object()
UNIT_HOOK = "difcache_unit"


def register(module: torch.nn.Module, hook: ModelHook, name: str) -> Callable[[], None]:
    """Register ``hook`` on ``module`` under ``name``; return a function that removes exactly that hook."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, name)
    return lambda: registry.remove_hook(name, recurse=False)


# FLOPs per (model, input shapes, units): they do not change while the weights' shapes don't, so a cache that
# is removed and applied again (benchmarks do this every round) does not measure them again.
_FLOPS_MEMO: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, tuple[int, list[int]]]] = (
    weakref.WeakKeyDictionary()
)


class CacheRootHook(ModelHook):
    def __init__(self, runtime: CacheRuntime) -> None:
        super().__init__()
        self.runtime = runtime
        self._units = tuple(u.name for u in runtime.plan.scope.units)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        rt = self.runtime
        key = (_shape_key(args, kwargs), self._units)
        memo = _FLOPS_MEMO.setdefault(module, {})
        measured = memo.get(key)
        if measured is None:
            units = [u.modules for u in rt.plan.scope.units]
            output, total, per_unit = measure_flops(units, lambda: self.fn_ref.original_forward(*args, **kwargs))
            memo[key] = measured = (total, per_unit)
        else:
            output = self.fn_ref.original_forward(*args, **kwargs)
        if rt.unit_flops is not measured[1]:
            rt.unit_flops = measured[1]
            rt.on_flops_measured(*measured)
        rt.stats.calls += 1
        rt.stats.full_flops += measured[0]
        rt.after_call()
        return output


class UnitHook(ModelHook):
    def __init__(self, runtime: CacheRuntime, unit: int) -> None:
        super().__init__()
        self.runtime = runtime
        self.unit = unit
        # How the output is rebuilt from its tensor leaves: None for a single tensor, _FLAT for a flat tuple of
        # tensors/None (attention returning image and text streams), else a pytree spec.
        self._spec: Any = None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        rt = self.runtime
        info = rt.tracker.info
        if info is None:  # called outside a tracked denoiser forward: behave as if uncached
            return self.fn_ref.original_forward(*args, **kwargs)
        unit = self.unit
        action = (rt.row if rt.row_info is info else rt.refresh_row(info))[unit]
        if action:  # REUSE or FORECAST
            state = rt.store.get(info.branch, unit)
            if state is not None:
                leaves = rt.plan.forecaster.predict(state, info.step)
                if leaves is not None:
                    rt.counts[action][unit] += 1
                    rt.stats.skipped_flops += rt.unit_flops[unit]
                    spec = self._spec
                    if spec is None:
                        return leaves[0]
                    return tuple(leaves) if spec is _FLAT else tree_unflatten(leaves, spec)
                rt.stats.units[unit].nonfinite_fallbacks += 1
        output = self.fn_ref.original_forward(*args, **kwargs)
        rt.counts[0][unit] += 1
        if rt.needs_update(info.step, unit):
            if isinstance(output, torch.Tensor):
                leaves, self._spec = [output], None
            elif type(output) is tuple and all(o is None or isinstance(o, torch.Tensor) for o in output):
                leaves, self._spec = list(output), _FLAT
            else:
                leaves, self._spec = tree_flatten(output)
                leaves = [leaf if isinstance(leaf, torch.Tensor) else None for leaf in leaves]
            previous = rt.store.get(info.branch, unit)
            rt.store.put(info.branch, unit, rt.plan.forecaster.update(previous, info.step, leaves))
        return output
