"""Adapters map a denoiser class to its :class:`Layout`; users can register their own.

An adapter is a function ``model -> Layout``. Lookup walks the model's class hierarchy by class *name*, so
diffusers' model modules need not be imported for registration. :func:`block_adapter` builds the common
kind of adapter from data: which ``ModuleList`` attributes hold the blocks, and which child names inside a
block are units of which kind.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from difcache.adapters.layout import UNIT_KINDS, Block, Layout, Unit
from difcache.errors import DifcacheError

AdapterFn = Callable[[torch.nn.Module], Layout]
_ADAPTERS: dict[str, AdapterFn] = {}


def register_adapter(model_cls: type | str, adapter: AdapterFn) -> None:
    """Register ``adapter`` for ``model_cls`` (a class or its name); replaces an earlier registration."""
    name = model_cls if isinstance(model_cls, str) else model_cls.__name__
    _ADAPTERS[name] = adapter


def registered_adapters() -> list[str]:
    return sorted(_ADAPTERS)


def layout_of(model: torch.nn.Module) -> Layout:
    """The layout of ``model`` from the first registered adapter along its class hierarchy.

    A layout must offer something to cache: units, or (UNets) skip branches.
    """
    for cls in type(model).__mro__:
        adapter = _ADAPTERS.get(cls.__name__)
        if adapter is not None:
            layout = adapter(model)
            if not layout.units and not layout.branches:
                raise DifcacheError(
                    f"The {cls.__name__} adapter found no cacheable units in this model; nothing would be "
                    "cached. Check the model's block lists or register an adapter with "
                    "difcache.register_adapter(...)."
                )
            return layout
    raise DifcacheError(
        f"difcache has no adapter for {type(model).__name__}. Supported: {', '.join(registered_adapters())}. "
        "Register one with difcache.register_adapter(YourModel, difcache.block_adapter(family='yours', "
        "groups=['blocks'], units={'attn': 'attn', 'ff': 'ffn'}))."
    )


def block_adapter(
    family: str,
    groups: Sequence[str],
    units: Mapping[str, str],
    composite_groups: Mapping[str, Sequence[str]] | None = None,
    block_classes: Sequence[str] = (),
) -> AdapterFn:
    """An adapter from data.

    Args:
        family: preset key for per-family defaults ("flux", "wan", "dit", ...).
        groups: attribute names of the ``ModuleList``s holding the blocks, in execution order.
        units: child name inside a block -> unit kind (one of ``UNIT_KINDS``); missing or ``None`` children
            are skipped (e.g. DiT blocks have no ``attn2``).
        composite_groups: group -> child names whose combined output is the block's one pre-gate unit (kind
            ``"block"``), the last of them producing it: FLUX and HunyuanVideo single-stream blocks, where
            TaylorSeer caches ``proj_out(cat(attn, mlp))`` before the block's gate (see
            :mod:`difcache.engine.scopes.module`). No child names: the whole block is the unit.
        block_classes: instead of ``groups``, find blocks anywhere in the model by class name (UNet
            transformer blocks nested in down/mid/up blocks), in module registration order.
    """
    composite_groups = dict(composite_groups or {})
    bad = sorted(set(units.values()) - set(UNIT_KINDS))
    if bad:
        raise DifcacheError(f"Unknown unit kind(s) {bad}; use one of {list(UNIT_KINDS)}.")

    def adapt(model: torch.nn.Module) -> Layout:
        found: list[tuple[str, str, torch.nn.Module]] = []
        if block_classes:
            for name, module in model.named_modules():
                if type(module).__name__ in block_classes:
                    found.append((name, "blocks", module))
        for group in groups:
            module_list = getattr(model, group, None)
            if module_list is None:
                continue
            found.extend((f"{group}.{i}", group, block) for i, block in enumerate(module_list))
        blocks: list[Block] = []
        unit_list: list[Unit] = []
        for name, group, module in found:
            index = len(blocks)
            blocks.append(Block(name, module, group, index))
            if group in composite_groups:
                children = composite_groups[group]
                if not children:
                    unit_list.append(Unit(name, module, "block", index))
                    continue
                members = tuple(getattr(module, child) for child in children)
                unit_list.append(Unit(f"{name}.{children[-1]}", members[-1], "block", index, members))
                continue
            for child, kind in units.items():
                sub = getattr(module, child, None)
                if isinstance(sub, torch.nn.Module):
                    unit_list.append(Unit(f"{name}.{child}", sub, kind, index))
        return Layout(family, model, tuple(blocks), tuple(unit_list))

    return adapt
