"""Residual block scope: whole blocks cached as per-stream residuals, safe with blocks that write in place.

Used for ComfyUI's FLUX (see :mod:`difcache.comfy.adapters` for why the unit is the whole block). On a computed
step the block runs and ``output - input`` of each stream is handed to the method's forecaster; on a skipped
step the block returns ``input + forecast`` for each stream, so the current input (and everything computed
before the block on this step) still flows through, and nothing inside the block runs.

ComfyUI's FLUX blocks write into their inputs (``txt += ...`` in ``DoubleStreamBlock``, ``x += ...`` in
``SingleStreamBlock``) and its ControlNet path writes into a block's output (``img[:, :n] += control``). So the
input is copied before the block runs (only when the residual will be kept), residuals are fresh fp32 tensors
no model code sees, and what a skipped block returns is a new tensor: nothing the model writes into is ever
held by the store. The residual is taken right after the block, before any ControlNet addition, which is
therefore applied afresh on every step.

Residuals are differences of nearly equal activations, so they are kept and added in fp32 (as difcache's
block-range scope does).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from difcache.adapters.layout import Unit
from difcache.core import Slot, UnitRuntime
from difcache.engine.hooks import ForwardHook, register
from difcache.engine.scopes.module import UNIT_HOOK
from difcache.errors import DifcacheError


class ResidualBlockScope:
    """Each unit (a whole block) cached as the residual of its streams; ``streams_of(block)`` names them."""

    def __init__(self, units: tuple[Unit, ...], streams_of: Callable[[torch.nn.Module], tuple[str, ...]]) -> None:
        self.units = units
        self._streams = [streams_of(u.module) for u in units]  # fails early, naming an unknown block class

    def install(self, runtime: UnitRuntime) -> list[Callable[[], None]]:
        return [
            register(u.module, _ResidualHook(slot, u.module, streams), UNIT_HOOK)
            for u, slot, streams in zip(self.units, runtime.slots, self._streams, strict=True)
        ]


class _ResidualHook(ForwardHook):
    def __init__(self, slot: Slot, block: torch.nn.Module, streams: tuple[str, ...]) -> None:
        super().__init__()
        self.slot, self.streams = slot, streams
        self.block_name = type(block).__name__
        params = list(inspect.signature(type(block).forward).parameters)[1:]
        missing = [s for s in streams if s not in params]
        if missing:
            raise DifcacheError(f"{self.block_name}.forward has no argument(s) {missing}; its streams are {params}.")
        self._positions = [params.index(s) for s in streams]

    def _inputs(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        return [args[p] if p < len(args) else kwargs[s] for p, s in zip(self._positions, self.streams, strict=True)]

    def _outputs(self, output: Any) -> list[torch.Tensor]:
        outs = [output] if isinstance(output, torch.Tensor) else list(output) if isinstance(output, tuple) else []
        if len(outs) != len(self.streams) or not all(isinstance(o, torch.Tensor) for o in outs):
            raise DifcacheError(
                f"{self.block_name} returned {type(output).__name__}, not the {len(self.streams)} tensor(s) "
                f"{self.streams} its adapter declares; fix the adapter's streams for this block class."
            )
        return outs

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        slot = self.slot
        if not slot.live.active:  # called outside a sampling step: behave as if uncached
            return self.fn_ref.original_forward(*args, **kwargs)
        inputs = self._inputs(args, kwargs)
        if slot.skip:
            residual = slot.forecast()
            if all(r.shape == x.shape for r, x in zip(residual, inputs, strict=True)):
                outs = [(x.float() + r).to(x.dtype) for x, r in zip(inputs, residual, strict=True)]
                return outs[0] if len(outs) == 1 else tuple(outs)
        if not slot.wants():
            return self.fn_ref.original_forward(*args, **kwargs)
        # A copy: the block may write into its input tensors.
        before = [x.detach().to(torch.float32, copy=True) for x in inputs]
        output = self.fn_ref.original_forward(*args, **kwargs)
        slot.keep([o.detach().float() - b for o, b in zip(self._outputs(output), before, strict=True)])
        return output
