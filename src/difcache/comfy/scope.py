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
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import ModelHook

from difcache.adapters.layout import Unit
from difcache.engine.hooks import UNIT_HOOK, register
from difcache.errors import DifcacheError

if TYPE_CHECKING:
    from difcache.engine.runtime import CacheRuntime


class ResidualBlockScope:
    """Each unit (a whole block) cached as the residual of its streams; ``streams_of(block)`` names them."""

    def __init__(self, units: tuple[Unit, ...], streams_of: Callable[[torch.nn.Module], tuple[str, ...]]) -> None:
        self.units = units
        self._streams = [streams_of(u.module) for u in units]  # fails early, naming an unknown block class

    def install(self, runtime: CacheRuntime) -> list[Callable[[], None]]:
        return [
            register(u.module, _ResidualHook(runtime, i, u.module, streams), UNIT_HOOK)
            for i, (u, streams) in enumerate(zip(self.units, self._streams, strict=True))
        ]


def _no_signal() -> None:
    return None


class _ResidualHook(ModelHook):
    def __init__(self, runtime: CacheRuntime, unit: int, block: torch.nn.Module, streams: tuple[str, ...]) -> None:
        super().__init__()
        self.runtime, self.unit, self.streams = runtime, unit, streams
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
        rt = self.runtime
        info = rt.tracker.info
        if info is None:  # called outside a sampling step: behave as if uncached
            return self.fn_ref.original_forward(*args, **kwargs)
        unit = self.unit
        inputs = self._inputs(args, kwargs)
        action = rt.decide(info, unit, _no_signal)
        if action:  # REUSE or FORECAST
            state = rt.store.get(info.branch, unit)
            if state is not None:
                residual = rt.plan.forecaster.predict(state, info.step)
                if residual is None:
                    rt.stats.units[unit].nonfinite_fallbacks += 1
                elif all(r.shape == x.shape for r, x in zip(residual, inputs, strict=True)):
                    rt.counts[action][unit] += 1
                    rt.stats.skipped_flops += rt.unit_flops[unit]
                    outs = [(x.float() + r).to(x.dtype) for x, r in zip(inputs, residual, strict=True)]
                    return outs[0] if len(outs) == 1 else tuple(outs)
        keep = rt.needs_update(info.step, unit)
        # A copy: the block may write into its input tensors.
        before = [x.detach().to(torch.float32, copy=True) for x in inputs] if keep else None
        output = self.fn_ref.original_forward(*args, **kwargs)
        rt.counts[0][unit] += 1
        if before is not None:
            residual = [o.detach().float() - b for o, b in zip(self._outputs(output), before, strict=True)]
            previous = rt.store.get(info.branch, unit)
            rt.store.put(info.branch, unit, rt.plan.forecaster.update(previous, info.step, residual))
        return output
