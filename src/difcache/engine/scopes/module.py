"""Module scope: each unit's output is cached on its own (pre-gate attention/FFN outputs, whole blocks).

FORA, TaylorSeer and BAC cache the outputs of the attention and feed-forward sub-modules *before* their block
applies its gate, so the gate and the modulation are recomputed every step from the current timestep. A
composite unit (FLUX and HunyuanVideo single-stream blocks, :attr:`~difcache.adapters.layout.Unit.members`) is
the pre-gate output of several modules: its last member (``proj_out``) returns the forecast, and the members
whose outputs only feed it (the attention and the MLP's first projection) return placeholders of the right shape
on skipped steps, so the block still applies its *current* gate and residual to the forecast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from difcache.adapters.layout import Unit
from difcache.core import Feature, Slot, UnitRuntime
from difcache.engine.hooks import ForwardHook, register

UNIT_HOOK = "difcache_unit"
_FLAT = object()


class ModuleScope:
    """Each unit cached on its own; see the module docstring."""

    def __init__(self, units: tuple[Unit, ...]) -> None:
        self.units = units

    def install(self, runtime: UnitRuntime) -> list[Callable[[], None]]:
        removers = []
        for unit, slot in zip(self.units, runtime.slots, strict=True):
            *feeders, last = unit.modules
            removers += [register(m, FeederHook(slot), UNIT_HOOK) for m in feeders]
            removers.append(register(last, UnitHook(slot), UNIT_HOOK))
        return removers


class UnitHook(ForwardHook):
    """Runs the module and hands its output in, or returns the forecast on skipped calls."""

    def __init__(self, slot: Slot) -> None:
        super().__init__()
        self.slot = slot
        # How the output is rebuilt from its tensor leaves: None for a single tensor, _FLAT for a flat tuple of
        # tensors/None (attention returning image and text streams), else a pytree spec.
        self._spec: Any = None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        slot = self.slot
        if not slot.live.active:  # called outside a tracked denoiser call: behave as if uncached
            return self.fn_ref.original_forward(*args, **kwargs)
        if slot.skip:
            return rebuild(slot.forecast(), self._spec)
        output = self.fn_ref.original_forward(*args, **kwargs)
        leaves, self._spec = flatten(output)
        if slot.wants():
            slot.keep(leaves)
        return output


class FeederHook(ForwardHook):
    """A member of a composite unit whose output only feeds the unit's last module: a placeholder when skipped."""

    def __init__(self, slot: Slot) -> None:
        super().__init__()
        self.slot = slot
        self._meta: Any = None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        slot = self.slot
        if slot.live.active and slot.skip and self._meta is not None:
            spec, shapes = self._meta
            return rebuild([None if m is None else placeholder(*m) for m in shapes], spec)
        output = self.fn_ref.original_forward(*args, **kwargs)
        leaves, spec = flatten(output)  # the shapes to stand in with (they change with the resolution)
        self._meta = (spec, [None if x is None else (x.shape, x.dtype, x.device) for x in leaves])
        return output


def placeholder(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """What a skipped module whose output nothing reads returns (module-level so tests can poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def flatten(output: Any) -> tuple[Feature, Any]:
    """A module output as its tensor leaves and how to rebuild it (see :func:`rebuild`)."""
    if isinstance(output, torch.Tensor):
        return [output], None
    if type(output) is tuple and all(o is None or isinstance(o, torch.Tensor) for o in output):
        return list(output), _FLAT
    leaves, spec = tree_flatten(output)
    return [leaf if isinstance(leaf, torch.Tensor) else None for leaf in leaves], spec


def rebuild(leaves: Feature, spec: Any) -> Any:
    if spec is None:
        return leaves[0]
    return tuple(leaves) if spec is _FLAT else tree_unflatten(leaves, spec)
