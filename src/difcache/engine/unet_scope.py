"""Skip-branch scope: everything in a UNet deeper than one skip branch, cached as one feature (DeepCache).

For skip branch ``b`` (numbered as in :class:`~difcache.adapters.layout.SkipBranch`, 0 = ``conv_in`` output),
the *deep path* is every module that only matters for features deeper than ``b``: the down-path layers that
produce branches ``> b``, the mid block, and the up-path layers that consume branches ``> b``. A block whose
layers are all deep is hooked whole; in the block holding the branch, its resnets/attentions/downsamplers are
hooked one by one, so every branch id is supported, not only block boundaries.

On a *retrieve* step nothing in the deep path runs. The last deep module in execution order is the one whose
output enters the shallow up path (the output of up-block U_{m+1} in the paper, or of the layer just below the
branch inside its up block): it returns the feature cached at the last full step. Every other deep module
returns an uninitialised placeholder of the shape it had on the full step; those values are read only by
other deep modules or by concatenations whose results only deep modules read, so they never reach the output
(tests fill them with NaN to check). Placeholders are fresh ``torch.empty`` tensors, so code that writes into
a block output in place (T2I-Adapter residuals) still works; nothing but the one feature is kept across steps.
The feature is stored as a copy and handed out as a copy, because the shallow path may write into it in place
(FreeU scales the backbone half of an up block's input in place, T2I-Adapter-XL adds to the mid block output):
reusing the tensor itself would compound those writes on every retrieve step.

The shallow path runs as usual with the current inputs: ``conv_in``, the down layers up to branch ``b``, and
the up layers from the one consuming ``b`` onwards, including the concatenation of the fresh skip feature with
the cached one.

Decisions come from the plan's policy keyed on the tracker's step index *relative to the run's first step*
(img2img runs start mid-way; the official pipelines count their loop from 0 there too), one decision per
denoiser call, shared by all hooks of the call. Batched CFG is one call, so both halves share the cache, as in
the paper; sequential CFG gets one cached feature per branch (the feature store is keyed by CFG branch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import ModelHook
from torch.utils._pytree import tree_flatten, tree_unflatten

from difcache.adapters.layout import Layout, Unit
from difcache.engine.actions import Action
from difcache.engine.hooks import register
from difcache.engine.steps import StepInfo
from difcache.errors import DifcacheError

if TYPE_CHECKING:
    from difcache.engine.runtime import CacheRuntime

DEEP_HOOK = "difcache_deep_path"

# (shape, dtype, device) of each tensor leaf of a module output, None for non-tensor leaves.
_LeafMeta = tuple[torch.Size, torch.dtype, torch.device] | None


def placeholder(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """What a skipped deep module returns in place of each output tensor (module-level so tests can poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def deep_path(layout: Layout, branch: int) -> tuple[str, ...]:
    """Qualified names of the modules deeper than skip branch ``branch``, in execution order.

    Whole blocks where all their layers are deep, single layers inside the blocks that hold the branch. The last
    name is the module whose output feeds the shallow up path.
    """
    branches = layout.branches
    if not 0 <= branch < len(branches):
        raise DifcacheError(f"skip branch {branch} is outside [0, {len(branches) - 1}].")
    model = layout.model
    names: list[str] = []
    for k in range(len(model.down_blocks)):
        produced = [br for br in branches if br.down_block == k]
        deep = [br for br in produced if br.index > branch]
        if deep and len(deep) == len(produced):
            names.append(f"down_blocks.{k}")
        else:
            names += [name for br in deep for name in br.producer]
    if getattr(model, "mid_block", None) is not None:
        names.append("mid_block")
    for u in range(len(model.up_blocks)):
        consumed = sorted((br for br in branches if br.up_block == u), key=lambda br: br.up_layer)
        deep = [br for br in consumed if br.index > branch]
        if deep and len(deep) == len(consumed):
            names.append(f"up_blocks.{u}")
        else:
            names += [name for br in deep for name in br.consumer]
    return tuple(names)


class SkipBranchScope:
    """One unit: the deep path below skip branch ``branch`` (see the module docstring)."""

    def __init__(self, layout: Layout, branch: int) -> None:
        names = deep_path(layout, branch)
        if not names:
            raise DifcacheError(
                f"Nothing in this {type(layout.model).__name__} is deeper than skip branch {branch} (it has no mid "
                f"block); choose a branch below {branch}."
            )
        modules = tuple(layout.model.get_submodule(name) for name in names)
        self.branch = branch
        self.names = names
        self.units: tuple[Unit, ...] = (Unit(f"deeper_than_branch_{branch}", modules[0], "range", 0, modules),)

    def install(self, runtime: CacheRuntime) -> list[Callable[[], None]]:
        path = _DeepPath(runtime)
        last = len(self.names) - 1
        return [
            register(module, _DeepModuleHook(path, index, index == last), DEEP_HOOK)
            for index, module in enumerate(self.units[0].modules)
        ]


class _DeepPath:
    """Per-install state shared by the hooks of the deep path: this call's decision and the output shapes."""

    def __init__(self, runtime: CacheRuntime) -> None:
        self.runtime = runtime
        self.info: StepInfo | None = None
        self.skip = False
        self.store = False  # whether this full step's feature will be read by a later retrieve step
        self.run = -1
        self.start = 0
        self.meta: dict[tuple[str, int], tuple[Any, list[_LeafMeta]]] = {}
        self._last_reuse: tuple[int | None, int] = (None, -1)  # (steps in the run, last retrieve step)

    def enter(self, info: StepInfo) -> None:
        """Decide once per denoiser call (on whichever deep module runs first)."""
        if self.info is info:
            return
        self.info = info
        rt = self.runtime
        if info.run != self.run:  # new run: shapes may differ, and schedules count from its first step
            self.run, self.start = info.run, info.step
            self.meta.clear()
        policy = rt.plan.policy
        step = info.step - self.start
        total = None if info.num_steps is None else info.num_steps - self.start
        action = policy.decide(step, total, 0)
        self.skip = action != Action.COMPUTE and rt.store.get(info.branch, 0) is not None
        if self.skip:
            rt.counts[action][0] += 1
            rt.stats.skipped_flops += rt.unit_flops[0]
            self.store = False
        else:
            rt.counts[Action.COMPUTE][0] += 1
            self.store = total is None or step < self._last_reuse_of(total)

    def _last_reuse_of(self, total: int) -> int:
        if self._last_reuse[0] != total:
            self._last_reuse = (total, self.runtime.plan.policy.last_reuse(total))
        return self._last_reuse[1]


class _DeepModuleHook(ModelHook):
    def __init__(self, path: _DeepPath, index: int, feature: bool) -> None:
        super().__init__()
        self.path = path
        self.index = index
        self.feature = feature  # the last deep module: its output is the cached feature
        self._spec: Any = None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        path = self.path
        rt = path.runtime
        info = rt.tracker.info
        if info is None:  # called outside a tracked denoiser forward
            return self.fn_ref.original_forward(*args, **kwargs)
        path.enter(info)
        key = (info.branch, self.index)
        if path.skip:
            if self.feature:
                leaves = rt.plan.forecaster.predict(rt.store.get(info.branch, 0), info.step)
                return tree_unflatten([None if x is None else x.clone() for x in leaves], self._spec)
            meta = path.meta.get(key)
            if meta is not None:
                spec, leaves = meta
                return tree_unflatten([None if m is None else placeholder(*m) for m in leaves], spec)
            # Never ran in this run (cannot happen when a feature exists); computing it is harmless.
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.feature:
            if path.store:
                leaves, self._spec = tree_flatten(output)
                leaves = [leaf.clone() if torch.is_tensor(leaf) else None for leaf in leaves]
                previous = rt.store.get(info.branch, 0)
                rt.store.put(info.branch, 0, rt.plan.forecaster.update(previous, info.step, leaves))
        elif key not in path.meta:
            leaves, spec = tree_flatten(output)
            path.meta[key] = (spec, [(x.shape, x.dtype, x.device) if torch.is_tensor(x) else None for x in leaves])
        return output
