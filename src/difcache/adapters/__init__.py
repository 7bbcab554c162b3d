"""Adapters: where the blocks and cacheable units of each denoiser family are."""

from difcache.adapters import families as _families  # noqa: F401  (registers the built-in adapters)
from difcache.adapters.layout import Block, Layout, Unit
from difcache.adapters.registry import block_adapter, layout_of, register_adapter, registered_adapters

__all__ = ["Block", "Layout", "Unit", "block_adapter", "layout_of", "register_adapter", "registered_adapters"]
