"""Range scope: a contiguous range of blocks cached as one residual per stream (output − input).

TeaCache, first-block cache and ERTACache cache the residual of the whole block stack; Δ-DiT the residual of a
front or rear range ("Δ-cache"). On a skipped step the blocks of the range return their inputs unchanged and
the last one returns ``input + residual``, so everything before and after the range runs as usual with the
*current* input. Block input/return conventions (which argument and output index is the image stream, which
the text stream) come from diffusers' ``TransformerBlockRegistry``, so every block class diffusers registers
works, including blocks that mix both streams (FLUX, SD3, HunyuanVideo, CogVideoX).

Residuals are differences, so they are kept in fp32 and added in fp32 before casting back.

A *signal* (TeaCache's modulated-input change, first-block residual) is computed by the range's first block
hook from that block's inputs and handed to the runtime's live decision (dynamic policies only), which arms the
range's slot before the rest of the range runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks._helpers import TransformerBlockRegistry

from difcache.adapters.layout import Layout, Unit
from difcache.core import Slot, UnitRuntime
from difcache.engine.hooks import ForwardHook, register
from difcache.errors import DifcacheError

RANGE_HOOK = "difcache_range"

# signal(first block module, bound block arguments) -> tensor whose relative change a dynamic policy watches
SignalFn = Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor]


@dataclass
class Streams:
    """How one block class takes and returns its streams."""

    params: list[str]
    hidden_arg: str
    encoder_arg: str | None
    hidden_out: int
    encoder_out: int | None

    @classmethod
    def of(cls, block: torch.nn.Module) -> Streams:
        try:
            meta = TransformerBlockRegistry.get(type(block))
        except ValueError:
            raise DifcacheError(
                f"{type(block).__name__} is not in diffusers' TransformerBlockRegistry, so difcache does not know "
                "which of its outputs is the image stream; register it with "
                "diffusers.hooks._helpers.TransformerBlockRegistry.register(cls, TransformerBlockMetadata(...))."
            ) from None
        params = list(inspect.signature(type(block).forward).parameters)[1:]
        encoder = meta.encoder_hidden_states_argument_name
        return cls(
            params,
            meta.hidden_states_argument_name,
            encoder if encoder in params else None,
            meta.return_hidden_states_index,
            meta.return_encoder_hidden_states_index,
        )

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        bound = dict(zip(self.params, args, strict=False))
        bound.update(kwargs)
        return bound

    def outputs(self, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.encoder_out is None:
            return (output[0] if isinstance(output, tuple) else output), None
        return output[self.hidden_out], output[self.encoder_out]

    def pack(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
        if self.encoder_out is None:
            return hidden
        out: list[Any] = [None, None]
        out[self.hidden_out], out[self.encoder_out] = hidden, encoder
        return tuple(out)


@dataclass
class _RangeCall:
    """Per-call state shared by the hooks of one range: the streams entering its first block."""

    inputs: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)


class BlockRangeScope:
    """Ranges of blocks (inclusive ``(first, last)`` indices into ``layout.blocks``), each one unit."""

    def __init__(self, layout: Layout, ranges: Sequence[tuple[int, int]], signal: SignalFn | None = None) -> None:
        blocks = layout.blocks
        units = []
        for first, last in ranges:
            if not 0 <= first <= last < len(blocks):
                raise DifcacheError(f"Block range ({first}, {last}) is outside the model's {len(blocks)} blocks.")
            members = tuple(b.module for b in blocks[first : last + 1])
            name = blocks[first].name if first == last else f"{blocks[first].name}..{blocks[last].name}"
            units.append(Unit(name, blocks[first].module, "range", first, members))
        self.units: tuple[Unit, ...] = tuple(units)
        self.ranges = tuple(ranges)
        self.signal = signal

    def install(self, runtime: UnitRuntime) -> list[Callable[[], None]]:
        removers = []
        for index, unit in enumerate(self.units):
            shared = _RangeCall()
            last = len(unit.modules) - 1
            for position, block in enumerate(unit.modules):
                head = position == 0
                signal = self.signal if head else None
                hook = RangeBlockHook(runtime, runtime.slots[index], shared, Streams.of(block), head, position == last,
                                      signal)  # fmt: skip
                removers.append(register(block, hook, f"{RANGE_HOOK}_{index}"))
        return removers


class RangeBlockHook(ForwardHook):
    """One block of a range: passes its input through on skipped calls (the last adds the residual)."""

    def __init__(
        self,
        runtime: UnitRuntime,
        slot: Slot,
        shared: _RangeCall,
        streams: Streams,
        head: bool,
        tail: bool,
        signal: SignalFn | None = None,
    ) -> None:
        super().__init__()
        self.runtime, self.slot, self.shared, self.streams = runtime, slot, shared, streams
        self.head, self.tail, self.signal = head, tail, signal

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        slot, shared, streams = self.slot, self.shared, self.streams
        if not slot.live.active:
            return self.fn_ref.original_forward(*args, **kwargs)
        bound = streams.bind(args, kwargs)
        hidden = bound[streams.hidden_arg]
        encoder = bound.get(streams.encoder_arg) if streams.encoder_arg else None
        if self.head:
            if self.signal is not None:
                signal = self.signal
                self.runtime.decide_live(slot, lambda: signal(module, bound))
            shared.inputs = (hidden, encoder)
        if slot.skip:
            if not self.tail:
                return streams.pack(hidden, encoder)
            r_hidden, r_encoder = slot.forecast()
            new_hidden = (hidden.float() + r_hidden).to(hidden.dtype)
            new_encoder = encoder
            if encoder is not None and r_encoder is not None:
                new_encoder = (encoder.float() + r_encoder).to(encoder.dtype)
            return streams.pack(new_hidden, new_encoder)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.tail and slot.wants():
            out_hidden, out_encoder = streams.outputs(output)
            in_hidden, in_encoder = shared.inputs
            residual: list[torch.Tensor | None] = [out_hidden.float() - in_hidden.float(), None]
            if out_encoder is not None and in_encoder is not None and out_encoder.shape == in_encoder.shape:
                residual[1] = out_encoder.float() - in_encoder.float()
            slot.keep(residual)
        return output
