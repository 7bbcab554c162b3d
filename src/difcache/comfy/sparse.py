"""difcache's sparse attention on ComfyUI's native Wan, through ComfyUI's attention override.

``difcache.apply_sparse_attention`` installs diffusers attention processors, which ComfyUI's own ``WanModel``
does not have. Its self-attention (``WanSelfAttention.forward``, ``comfy/ldm/wan/model.py``) ends in
``optimized_attention(q, k, v, heads=..., transformer_options=...)`` with q and k already RMS-normed and
rotated, ``[B, N, H*D]``; every ComfyUI attention function is wrapped (``wrap_attn``,
``comfy/ldm/modules/attention.py``) so that a callable in ``transformer_options["optimized_attention_override"]``
receives ``(func, q, k, v, ..., heads=..., transformer_options=...)`` instead. For one sampling run,
:class:`ComfyWanSparse`:

* marks which block's ``self_attn`` is running (forward pre/post hooks on each ``blocks[i].self_attn``), so the
  override knows the layer and leaves every other attention call (cross-attention to text or image) alone;
* reads the video grid from the model's input (``[B, C, T, H, W]`` over ``patch_size``) before each forward;
* sets the override: on a self-attention call whose sequence is exactly the video grid, past the warm-up steps
  and dense layers, the attention is :meth:`difcache.attention.runtime.SparseRuntime.attend` (pattern
  selection, tiling, kernels, stats, all difcache's); anything else goes to the override that was there before
  (another node's) or to ComfyUI's own function.

Everything is undone when the run ends. The override slot is ComfyUI's single one: an override set by another
node is kept and called for every call difcache does not make sparse.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from difcache.errors import DifcacheError

OVERRIDE_KEY = "optimized_attention_override"
SUPPORTED = ("WanModel",)


def sparse_api() -> tuple[type, type]:
    """``(SparseAttentionConfig, SparseRuntime)`` from ``difcache.attention``, or an error saying they are missing."""
    try:
        from difcache.attention import SparseAttentionConfig
        from difcache.attention.runtime import SparseRuntime
    except ImportError as err:
        raise DifcacheError(
            f"difcache's sparse attention is not available in this installation ({err}), so the Sparse Attention "
            "node cannot run; update difcache to a release with difcache.attention."
        ) from None
    return SparseAttentionConfig, SparseRuntime


def check_supported(diffusion_model: torch.nn.Module) -> None:
    names = {cls.__name__ for cls in type(diffusion_model).__mro__}
    if not names & set(SUPPORTED):
        raise DifcacheError(
            f"difcache Sparse Attention supports ComfyUI's {', '.join(SUPPORTED)}, not "
            f"{type(diffusion_model).__name__}; use difcache Apply Cache for other models."
        )


class ComfyWanSparse:
    """Sparse self-attention on one ComfyUI ``WanModel`` for one sampling run; :meth:`remove` undoes it."""

    def __init__(self, model: torch.nn.Module, config: Any, tracker: Any, options: dict) -> None:
        check_supported(model)
        _, runtime_cls = sparse_api()
        self.runtime = runtime_cls(config, tracker)
        self.layer: int | None = None
        self._options = options
        self._previous = options.get(OVERRIDE_KEY)
        patch = tuple(getattr(model, "patch_size", (1, 2, 2)))
        self._handles = [model.register_forward_pre_hook(lambda m, args, kw: self._set_grid(args, kw, patch),
                                                         with_kwargs=True)]  # fmt: skip
        for i, block in enumerate(model.blocks):
            self._handles.append(block.self_attn.register_forward_pre_hook(lambda m, a, i=i: self._enter(i)))
            self._handles.append(block.self_attn.register_forward_hook(lambda m, a, o: self._enter(None)))
        options[OVERRIDE_KEY] = self.attention

    def _enter(self, layer: int | None) -> None:
        self.layer = layer

    def _set_grid(self, args: tuple, kwargs: dict, patch: tuple) -> None:
        x = args[0] if args else kwargs.get("x")
        if isinstance(x, torch.Tensor) and x.dim() == 5:
            self.runtime.grid = tuple(-(-s // p) for s, p in zip(x.shape[2:], patch, strict=True))
        else:
            self.runtime.grid = None

    def attention(self, func: Callable, *args: Any, **kwargs: Any) -> Any:
        """ComfyUI's ``optimized_attention_override``: sparse for video self-attention, the original otherwise."""
        q, k, v = args[:3]
        heads = kwargs.get("heads", args[3] if len(args) > 3 else None)
        layer, grid = self.layer, self.runtime.grid
        split = kwargs.get("skip_reshape", False)
        n = q.shape[2] if split else q.shape[1]
        dense = (
            layer is None or grid is None or heads is None or kwargs.get("mask") is not None or len(args) > 4
            or k.shape != q.shape or n != math.prod(grid) or kwargs.get("skip_output_reshape", False)
        )  # fmt: skip
        if dense or self.runtime.dense_reason(layer) is not None:
            if self._previous is not None:
                return self._previous(func, *args, **kwargs)
            return func(*args, **kwargs)
        if not split:  # [B, N, H*D] -> [B, H, N, D]
            q, k, v = (x.unflatten(2, (heads, -1)).transpose(1, 2) for x in (q, k, v))
        out = self.runtime.attend(layer, q, k, v, 0)
        return out.transpose(1, 2).flatten(2).to(v.dtype)

    def stats(self) -> Any:
        return self.runtime.stats()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._options.get(OVERRIDE_KEY) == self.attention:
            if self._previous is None:
                del self._options[OVERRIDE_KEY]
            else:
                self._options[OVERRIDE_KEY] = self._previous
        self.runtime.close()
