"""The signals dynamic policies watch, and the block-range scopes that compute them (TeaCache, first-block).

* **Modulated input** (TeaCache's own indicator, official FLUX, HunyuanVideo and DiT-family code): block 0's
  timestep-modulated input, ``norm1(hidden, emb=temb)[0]``; recomputed from the ``adaLN-single`` table where
  ``norm1`` is a plain norm (PixArt, LTX-Video). :class:`Norm1Memo` hands the indicator's ``norm1`` output to the
  block's own call, so a computed step runs ``norm1`` once.
* **Timestep embedding**: the ``temb`` the blocks receive (official Wan2.1 code in its ``use_ret_steps`` mode,
  ``e0``; CogVideoX ``emb``). Only for block classes that take ``temb``; others are refused at apply time.
* **First-block residual** (first-block cache: ParaAttention's FBCache, diffusers' ``FirstBlockCacheConfig``):
  block 0 always runs, its residual is the signal and blocks 1.. are the cached range.

Each scope covers the whole stack (FLUX: double and single blocks) as one residual
(:mod:`difcache.engine.scopes.block_range`); its first block's hook hands the signal to the runtime's live
decision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.hooks import ModelHook

from difcache.adapters.layout import Layout
from difcache.core import UnitRuntime
from difcache.engine.hooks import register
from difcache.engine.scopes.block_range import BlockRangeScope, Streams
from difcache.errors import DifcacheError

INDICATORS = ("modulated_input", "timestep_embedding", "first_block_residual")


def _norm1_arguments(family: str) -> Callable[[dict], tuple[tuple, dict]] | None:
    """How block 0 calls its own ``norm1`` (the modulated input is that call's first output), by family."""
    if family in ("flux", "hunyuanvideo", "sd3"):
        return lambda a: ((a["hidden_states"],), {"emb": a["temb"]})
    if family == "dit":
        return lambda a: (
            (a["hidden_states"], a["timestep"], a["class_labels"]),
            {"hidden_dtype": a["hidden_states"].dtype},
        )
    return None


def _table_modulated_input(block: torch.nn.Module, a: dict) -> torch.Tensor:
    """Block 0's input modulated by its ``adaLN-single`` table, recomputed as the block does (its ``norm1`` is a
    plain norm): PixArt (the table plus ``timestep``, ``[B, 6·D]``) and LTX-Video (plus ``temb``, ``[B, T, 6·D]``,
    the modulated input the official TeaCache4LTX watches)."""
    hidden = a["hidden_states"]
    table = block.scale_shift_table
    if a.get("temb") is not None:  # LTX-Video
        temb = a["temb"]
        values = table[None, None] + temb.reshape(hidden.shape[0], temb.size(1), table.shape[0], -1)
        shift, scale = values[:, :, 0], values[:, :, 1]
    else:  # PixArt
        values = table[None] + a["timestep"].reshape(hidden.shape[0], 6, -1)
        shift, scale = values[:, 0:1], values[:, 1:2]
    return block.norm1(hidden) * (1 + scale) + shift


class Norm1Memo(ModelHook):
    """Gives block 0 the ``norm1`` output the indicator already computed in this call.

    TeaCache's modulated input *is* block 0's ``norm1`` output (with its timestep/class embedding MLP); the
    official code computes it for the indicator and, on computed steps, again inside the block. The
    indicator's call is remembered here and returned for the block's own call when that comes with the same
    tensors (by identity) and arguments, so a computed step runs ``norm1`` once. Any other call runs normally.
    """

    def __init__(self) -> None:
        super().__init__()
        self._entry: tuple[tuple, dict, Any] | None = None

    def call(self, norm: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        output = norm(*args, **kwargs)
        self._entry = (args, kwargs, output)
        return output

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        entry, self._entry = self._entry, None
        if torch.compiler.is_compiling():  # the indicator ran eagerly (the live decision); no identity to compare
            return self.fn_ref.original_forward(*args, **kwargs)
        if entry is not None and _same_call(entry[0], entry[1], args, kwargs):
            return entry[2]
        return self.fn_ref.original_forward(*args, **kwargs)


def _same_call(args: tuple, kwargs: dict, other_args: tuple, other_kwargs: dict) -> bool:
    def same(a: Any, b: Any) -> bool:
        return a is b if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) else a == b

    return (
        len(args) == len(other_args)
        and kwargs.keys() == other_kwargs.keys()
        and all(same(a, b) for a, b in zip(args, other_args, strict=True))
        and all(same(v, other_kwargs[k]) for k, v in kwargs.items())
    )


class ModulatedInputScope(BlockRangeScope):
    """The whole stack, with block 0's modulated input as the signal, computed once per call (:class:`Norm1Memo`)."""

    def __init__(self, layout: Layout, arguments: Callable[[dict], tuple[tuple, dict]]) -> None:
        self.memo = Norm1Memo()
        self._first = layout.blocks[0].module
        super().__init__(
            layout, [(0, len(layout.blocks) - 1)], signal=lambda block, a: self.memo.call(block.norm1, *arguments(a))[0]
        )

    def install(self, runtime: UnitRuntime) -> list[Callable[[], None]]:
        return [register(self._first.norm1, self.memo, "difcache_norm1_memo"), *super().install(runtime)]


class FirstBlockProbe(ModelHook):
    """Records block 0's residual (output − input, image stream) as the first-block-cache signal."""

    def __init__(self, streams: Streams) -> None:
        super().__init__()
        self.streams = streams
        self.residual: torch.Tensor | None = None
        self._input: torch.Tensor | None = None

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self._input = self.streams.bind(args, kwargs)[self.streams.hidden_arg]
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        hidden, _ = self.streams.outputs(output)
        self.residual, self._input = hidden - self._input, None
        return output


class FirstBlockScope(BlockRangeScope):
    """Blocks 1.. as one range; block 0 always runs and its residual is the signal (first-block cache)."""

    def __init__(self, layout: Layout) -> None:
        if len(layout.blocks) < 2:
            raise DifcacheError("First-block cache needs at least 2 blocks.")
        self.probe = FirstBlockProbe(Streams.of(layout.blocks[0].module))
        self._first = layout.blocks[0].module
        super().__init__(layout, [(1, len(layout.blocks) - 1)], signal=lambda block, a: self.probe.residual)

    def install(self, runtime: UnitRuntime) -> list[Callable[[], None]]:
        return [register(self._first, self.probe, "difcache_first_block"), *super().install(runtime)]


def indicator_scope(indicator: str, layout: Layout) -> BlockRangeScope:
    """The whole block stack as one range, with ``indicator`` as its signal (see the module docstring)."""
    if layout.is_unet:
        raise DifcacheError("TeaCache caches a transformer block stack; for UNets use method='deepcache'.")
    if indicator == "first_block_residual":
        return FirstBlockScope(layout)
    whole = [(0, len(layout.blocks) - 1)]
    first = layout.blocks[0].module
    if indicator == "timestep_embedding":
        if "temb" not in Streams.of(first).params:
            raise DifcacheError(
                f"indicator='timestep_embedding' reads the `temb` its blocks receive, and {type(first).__name__} "
                f"takes none ({type(layout.model).__name__}); use indicator='modulated_input' or "
                "indicator='first_block_residual'."
            )
        return BlockRangeScope(layout, whole, signal=lambda block, a: a["temb"])
    arguments = _norm1_arguments(layout.family)
    if arguments is not None:
        return ModulatedInputScope(layout, arguments)
    if hasattr(first, "scale_shift_table") and hasattr(first, "norm1"):
        return BlockRangeScope(layout, whole, signal=_table_modulated_input)
    raise DifcacheError(
        f"TeaCache's modulated-input indicator is not available for {layout.family!r}; use "
        "indicator='timestep_embedding' or indicator='first_block_residual'."
    )
