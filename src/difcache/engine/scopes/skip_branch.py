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

Decisions come from the plan's policy keyed on the step index *relative to the run's first step* (img2img
runs start mid-way; the official pipelines count their loop from 0 there too), one decision per denoiser call
(the unit's slot), shared by all hooks of the call. Batched CFG is one call, so both halves share the cache, as
in the paper; sequential CFG gets one cached feature per branch (the feature store is keyed by CFG branch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from difcache.adapters.layout import Layout, Unit
from difcache.core import Slot, UnitRuntime
from difcache.engine.hooks import ForwardHook, register
from difcache.engine.scopes import module as _module
from difcache.engine.scopes.module import flatten, rebuild
from difcache.errors import DifcacheError

DEEP_HOOK = "difcache_deep_path"


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

    def install(self, runtime: UnitRuntime) -> list[Callable[[], None]]:
        slot = runtime.slots[0]
        last = len(self.names) - 1
        return [
            register(module, _DeepModuleHook(slot, index == last), DEEP_HOOK)
            for index, module in enumerate(self.units[0].modules)
        ]


class _DeepModuleHook(ForwardHook):
    def __init__(self, slot: Slot, feature: bool) -> None:
        super().__init__()
        self.slot = slot
        self.feature = feature  # the last deep module: its output is the cached feature
        self._spec: Any = None
        self._meta: Any = None  # (spec, [(shape, dtype, device) | None]) of the output on the last computed call

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        slot = self.slot
        if slot.live.active and slot.skip:
            if self.feature:
                return rebuild([None if x is None else x.clone() for x in slot.forecast()], self._spec)
            if self._meta is not None:
                spec, shapes = self._meta
                return rebuild([None if m is None else _module.placeholder(*m) for m in shapes], spec)
            # Never ran in this install (cannot happen when a feature exists); computing it is harmless.
        output = self.fn_ref.original_forward(*args, **kwargs)
        leaves, spec = flatten(output)
        if not self.feature:
            self._meta = (spec, [None if x is None else (x.shape, x.dtype, x.device) for x in leaves])
        elif slot.live.active:
            self._spec = spec
            if slot.wants():
                slot.keep([None if x is None else x.clone() for x in leaves])
        return output
