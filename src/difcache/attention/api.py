"""``apply_sparse_attention``: install sparse attention processors on a video DiT, and the handle to undo it."""

from __future__ import annotations

from typing import Any

import torch

from difcache.attention.config import SparseAttentionConfig, resolve_sparse_config
from difcache.attention.processors import attention_modules, family_of
from difcache.attention.runtime import SparseAttentionStats, SparseRuntime
from difcache.engine.steps import StepTracker
from difcache.errors import DifcacheError
from difcache.handle import Handle


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


class SparseAttentionHandle(Handle[SparseRuntime]):
    """What :func:`apply_sparse_attention` returns: ``stats()``, ``remove()``, and a context manager."""

    kind = "sparse attention"
    verb = "difcache.attention.apply_sparse_attention(...)"
    attr = "_difcache_sparse_attention"

    def __init__(self, model: torch.nn.Module, config: SparseAttentionConfig, scheduler: Any) -> None:
        self.family = family_of(model)
        modules = attention_modules(model, self.family)
        self._tracker = StepTracker.attach(model, scheduler=scheduler)
        super().__init__(model, config, SparseRuntime(config, self._tracker, num_layers=len(modules)))
        runtime = self._runtime
        self._originals = [(attn, attn.processor) for attn in modules]
        for layer, attn in enumerate(modules):
            attn.set_processor(self.family.processor(attn.processor, runtime, layer))
        grid_of = self.family.grid

        def set_grid(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            runtime.grid = tuple(int(x) for x in grid_of(module, args, kwargs))

        self._grid_hook = model.register_forward_pre_hook(set_grid, with_kwargs=True)

    @property
    def num_layers(self) -> int:
        return len(self._originals)

    def stats(self) -> SparseAttentionStats:
        """Sparse and dense attention calls, patterns selected and reused, and the attention work done."""
        return super().stats()

    def _read_stats(self, runtime: SparseRuntime) -> SparseAttentionStats:
        return runtime.stats()

    def _release(self, runtime: SparseRuntime) -> None:
        """Put the original processors back and detach from the step tracker: outputs are dense again, bit-exact."""
        for attn, original in self._originals:
            attn.set_processor(original)
        self._grid_hook.remove()
        runtime.close()
        self._tracker.detach()

    def _describe(self) -> str:
        return f"{self.family.name}, {self.num_layers} layers"


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
    SparseAttentionHandle.check_free(model)
    handle = SparseAttentionHandle(model, config, scheduler)
    handle.attach()
    return handle
