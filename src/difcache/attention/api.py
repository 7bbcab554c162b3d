"""``apply_sparse_attention``: install sparse attention processors on a video DiT, and the handle to undo it."""

from __future__ import annotations

from typing import Any

import torch

from difcache.attention.config import SparseAttentionConfig, resolve_sparse_config
from difcache.attention.processors import attention_modules, family_of
from difcache.attention.runtime import SparseAttentionStats, SparseRuntime
from difcache.engine.steps import StepTracker
from difcache.errors import DifcacheError

_HANDLE_ATTR = "_difcache_sparse_attention"


def _denoiser_of(target: Any) -> tuple[torch.nn.Module, Any]:
    if isinstance(target, torch.nn.Module):
        return target, None
    module = getattr(target, "transformer", None)
    if isinstance(module, torch.nn.Module):
        return module, getattr(target, "scheduler", None)
    raise DifcacheError(
        f"Cannot find a transformer in {type(target).__name__}: pass a diffusers pipeline with a `transformer` "
        "(Wan, HunyuanVideo, CogVideoX, LTX, FLUX) or the transformer itself."
    )


class SparseAttentionHandle:
    """What :func:`apply_sparse_attention` returns: ``stats()``, ``remove()``, and a context manager."""

    def __init__(self, model: torch.nn.Module, config: SparseAttentionConfig, scheduler: Any) -> None:
        self.model = model
        self.config = config
        self.family = family_of(model)
        modules = attention_modules(model, self.family)
        self._tracker = StepTracker.attach(model, scheduler=scheduler)
        self._runtime = SparseRuntime(config, self._tracker, num_layers=len(modules))
        self._originals = [(attn, attn.processor) for attn in modules]
        for layer, attn in enumerate(modules):
            attn.set_processor(self.family.processor(attn.processor, self._runtime, layer))
        grid_of = self.family.grid
        runtime = self._runtime

        def set_grid(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            runtime.grid = tuple(int(x) for x in grid_of(module, args, kwargs))

        self._grid_hook = model.register_forward_pre_hook(set_grid, with_kwargs=True)

    @property
    def active(self) -> bool:
        return self._runtime is not None

    @property
    def num_layers(self) -> int:
        return len(self._originals)

    def stats(self) -> SparseAttentionStats:
        """Sparse and dense attention calls, patterns selected and reused, and the attention work done."""
        if self._runtime is None:
            raise DifcacheError("This sparse attention was removed; read stats() before remove().")
        return self._runtime.stats()

    def reset_stats(self) -> None:
        """Start counting afresh (e.g. after a warm-up call)."""
        if self._runtime is None:
            raise DifcacheError(
                "This sparse attention was removed; apply it again with apply_sparse_attention()."
            )
        self._runtime.reset_stats()

    def remove(self) -> None:
        """Put the original processors back and detach from the step tracker; outputs are dense again, bit-exact."""
        if self._runtime is None:
            return
        for attn, original in self._originals:
            attn.set_processor(original)
        self._grid_hook.remove()
        self._runtime.close()
        self._tracker.detach()
        self._runtime = None
        if getattr(self.model, _HANDLE_ATTR, None) is self:
            delattr(self.model, _HANDLE_ATTR)

    def __enter__(self) -> SparseAttentionHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return (
            f"SparseAttentionHandle({self.config!r}, {self.family.name}, {self.num_layers} layers, {state})"
        )


def apply_sparse_attention(
    target: Any, method: str | SparseAttentionConfig = "topp", **overrides: Any
) -> SparseAttentionHandle:
    """Make the self-attention of a video DiT (or FLUX) sparse; returns a removable handle.

    Args:
        target: a diffusers pipeline (its scheduler then gives exact step indices) or its transformer.
        method: a method name (``difcache.attention.list_sparse_methods()``: ``"topp"``, ``"topk"``, ``"psa"``,
            ``"adaspa"``, ``"svg2"``), which takes that method's config defaults, or a config instance such as
            ``difcache.attention.PSASparseConfig(density=0.15)``.
        **overrides: config fields to override, validated (an unknown field or a value out of range raises,
            naming the field and its range).

    ::

        handle = apply_sparse_attention(pipe, "psa", density=0.2)
        handle = apply_sparse_attention(pipe, "svg2", p=0.9, warmup_steps=0.25)
        handle = apply_sparse_attention(pipe, "topk", density=0.15, search_steps=(0.25, 0.6))  # AdaSpa's schedule
        frames = pipe(...).frames
        print(handle.stats())
        handle.remove()

    Composes with :func:`difcache.apply_cache` on the same pipeline, in either order.
    """
    config = resolve_sparse_config(method, overrides)
    model, scheduler = _denoiser_of(target)
    existing = getattr(model, _HANDLE_ATTR, None)
    if existing is not None and existing.active:
        raise DifcacheError(
            f"Sparse attention is already applied to this {type(model).__name__}; call remove() on its handle first."
        )
    handle = SparseAttentionHandle(model, config, scheduler)
    setattr(model, _HANDLE_ATTR, handle)
    return handle
