"""UNet skip branches: which down-path modules compute each skip feature and which up-path layer takes it.

diffusers' ``UNet2DConditionModel`` and ``UNet2DModel`` collect skip features in ``down_block_res_samples``:
the ``conv_in`` output, then, for every down block, one feature per resnet (after its attention, if any) and
one after the downsampler. Each up block pops as many features as it has resnets, last first, so
``up_blocks[u].resnets[i]`` concatenates feature ``rem_u - 1 - i`` to its input, where ``rem_u`` is the number
of features left when up block ``u`` starts. This module turns that bookkeeping into
:class:`~difcache.adapters.layout.SkipBranch` records for the layout (DeepCache's scope reads them).

Only block classes whose forward follows that pattern are accepted (listed below); anything else raises, so a
UNet with unknown blocks is never cached on a guessed structure.
"""

from __future__ import annotations

import dataclasses

import torch

from difcache.adapters.layout import Layout, SkipBranch
from difcache.adapters.registry import AdapterFn
from difcache.errors import DifcacheError

# Blocks whose forward runs resnets[i] then attentions[i] (if any), appends one skip feature per pair and one
# after the downsampler(s) (down), or pops one feature per resnet and upsamples at the end (up).
DOWN_BLOCKS = frozenset(
    {"DownBlock2D", "CrossAttnDownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"}
)
UP_BLOCKS = frozenset(
    {"UpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"}
)


def _pairs(block: torch.nn.Module, name: str) -> list[tuple[str, ...]]:
    """Qualified names of each (resnet, attention) layer of ``block``; attention omitted where there is none."""
    resnets = block.resnets
    attentions = getattr(block, "attentions", None)
    if attentions is not None and len(attentions) != len(resnets):
        raise DifcacheError(f"{name} has {len(resnets)} resnets but {len(attentions)} attentions.")
    return [
        (f"{name}.resnets.{i}",) + ((f"{name}.attentions.{i}",) if attentions is not None else ())
        for i in range(len(resnets))
    ]


def unet_skip_branches(model: torch.nn.Module) -> tuple[SkipBranch, ...]:
    """The skip branches of a diffusers UNet, shallowest first; raises naming what is not supported."""
    model_name = type(model).__name__
    down_blocks = getattr(model, "down_blocks", None)
    up_blocks = getattr(model, "up_blocks", None)
    if down_blocks is None or up_blocks is None or not isinstance(getattr(model, "conv_in", None), torch.nn.Module):
        raise DifcacheError(f"{model_name} has no `conv_in`, `down_blocks` and `up_blocks`; it is not a UNet.")
    for group, allowed in (("down_blocks", DOWN_BLOCKS), ("up_blocks", UP_BLOCKS)):
        for i, block in enumerate(getattr(model, group)):
            if type(block).__name__ not in allowed:
                raise DifcacheError(
                    f"{model_name}.{group}.{i} is a {type(block).__name__}; skip branches are known for "
                    f"{', '.join(sorted(allowed))} only."
                )

    # Producers in the order the UNet appends them to down_block_res_samples.
    producers: list[tuple[tuple[str, ...], int | None]] = [(("conv_in",), None)]
    for k, block in enumerate(down_blocks):
        name = f"down_blocks.{k}"
        producers += [(pair, k) for pair in _pairs(block, name)]
        if getattr(block, "downsamplers", None) is not None and len(block.downsamplers):
            producers.append((tuple(f"{name}.downsamplers.{d}" for d in range(len(block.downsamplers))), k))

    consumed = sum(len(block.resnets) for block in up_blocks)
    if consumed != len(producers):
        raise DifcacheError(
            f"{model_name}'s down path makes {len(producers)} skip features but its up blocks take {consumed}."
        )
    consumers: dict[int, tuple[tuple[str, ...], int, int]] = {}
    remaining = len(producers)
    for u, block in enumerate(up_blocks):
        for i, pair in enumerate(_pairs(block, f"up_blocks.{u}")):
            consumers[remaining - 1 - i] = (pair, u, i)
        remaining -= len(block.resnets)
    return tuple(
        SkipBranch(index, producer, down_block, *consumers[index])
        for index, (producer, down_block) in enumerate(producers)
    )


def unet_adapter(family: str, units: AdapterFn | None = None) -> AdapterFn:
    """An adapter adding the skip branches to the layout ``units`` builds (or to an empty one).

    With ``units``, a UNet whose blocks are not understood gets no branches (DeepCache then raises, naming the
    block) and its transformer-block units still serve the other methods. Without, skip branches are all the
    layout has, so not understanding them is an error here.
    """

    def adapt(model: torch.nn.Module) -> Layout:
        if units is None:
            try:
                return Layout(family, model, (), (), unet_skip_branches(model))
            except DifcacheError as err:
                raise DifcacheError(
                    f"{err} difcache caches a {type(model).__name__} through its skip branches (method='deepcache');"
                    " register an adapter for other structures with difcache.register_adapter(...)."
                ) from None
        layout = units(model)
        try:
            branches = unet_skip_branches(model)
        except DifcacheError:
            branches = ()
        return dataclasses.replace(layout, branches=branches)

    return adapt
