"""A model's layout: the ordered blocks of its denoiser and the cacheable units inside them.

A *unit* is what a step-level cache decides about: an attention or feed-forward sub-module whose output is
taken *before* the block applies its gate (FORA, TaylorSeer, BAC), or a whole block where the paper caches
the block output (FLUX single-stream blocks). Blocks are kept too, for methods whose scope is a range of
blocks or the whole stack (Δ-DiT, TeaCache, ERTACache). UNets also list their *skip branches* (DeepCache).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

UNIT_KINDS = ("attn", "cross_attn", "ffn", "block", "range")


@dataclass(frozen=True)
class Block:
    """One transformer block: its qualified name in the denoiser, the module, and its list and position."""

    name: str
    module: torch.nn.Module = field(repr=False, compare=False)
    group: str
    index: int


@dataclass(frozen=True)
class Unit:
    """One cacheable sub-module (or whole block), in execution order."""

    name: str
    module: torch.nn.Module = field(repr=False, compare=False)
    kind: str
    block: int  # index into Layout.blocks (the first block, for a range)
    # Modules whose work the unit stands for, when more than ``module`` (a range of blocks): FLOPs and timings
    # of a unit are summed over these.
    members: tuple[torch.nn.Module, ...] = field(default=(), repr=False, compare=False)

    @property
    def modules(self) -> tuple[torch.nn.Module, ...]:
        return self.members or (self.module,)


@dataclass(frozen=True)
class SkipBranch:
    """One skip connection of a UNet: a down-path feature that an up-path layer concatenates to its input.

    Branches are numbered in the order the UNet collects them (``down_block_res_samples``): 0 is the output of
    ``conv_in``, then each down block's layers and downsampler. Up blocks consume them in reverse, so branch 0 is
    the shallowest and the last one sits just above the mid block.

    Attributes:
        index: position in that order.
        producer: qualified names of the down-path modules computing the feature (a resnet and its attention, a
            downsampler, or ``conv_in``).
        down_block: index into ``model.down_blocks`` of the producer (``None`` for ``conv_in``).
        consumer: qualified names of the up-path layer taking it (a resnet and its attention).
        up_block: index into ``model.up_blocks`` of the consumer.
        up_layer: position of the consumer in its up block's ``resnets``.
    """

    index: int
    producer: tuple[str, ...]
    down_block: int | None
    consumer: tuple[str, ...]
    up_block: int
    up_layer: int


@dataclass(frozen=True)
class Layout:
    """Where the blocks and units of one denoiser are; built by an adapter (see ``adapters.registry``)."""

    family: str
    model: torch.nn.Module = field(repr=False, compare=False)
    blocks: tuple[Block, ...]
    units: tuple[Unit, ...]
    branches: tuple[SkipBranch, ...] = ()  # UNets only, shallowest first

    @property
    def is_unet(self) -> bool:
        """A UNet of either family (``unet``: conditional, ``unet2d``: ``UNet2DModel``), cached by its skip
        branches (DeepCache), not as a transformer block stack."""
        return self.family in ("unet", "unet2d")

    @property
    def fingerprint(self) -> str:
        """Stable hash of the model class and unit names: a calibration profile is only valid for this layout."""
        text = type(self.model).__name__ + "|" + "|".join(f"{u.name}:{u.kind}" for u in self.units)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def units_of_block(self, block: int) -> tuple[Unit, ...]:
        return tuple(u for u in self.units if u.block == block)
