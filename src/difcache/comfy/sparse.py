"""difcache's sparse attention on ComfyUI's native Wan, through ComfyUI's attention override, composing with others.

``difcache.apply_sparse_attention`` installs diffusers attention processors, which ComfyUI's own ``WanModel``
does not have. Its self-attention (``WanSelfAttention.forward``, ``comfy/ldm/wan/model.py``) ends in
``optimized_attention(q, k, v, heads=..., transformer_options=...)`` with q and k already RMS-normed and
rotated, ``[B, N, H*D]``; every ComfyUI attention function is wrapped (``wrap_attn``,
``comfy/ldm/modules/attention.py``) so that a callable in ``transformer_options["optimized_attention_override"]``
receives ``(func, q, k, v, heads, mask=..., skip_reshape=..., transformer_options=..., scale=...)`` instead.

It follows the conventions of ComfyUI's own block-sparse node (``comfy_extras/nodes_sparse_attention.py``), so
that the two, and any other attention override, stack:

* **chain, never replace**: :meth:`SparseOverride.install` puts an override on top of whatever override is there
  and hands every call it does not make sparse to that one (or to ComfyUI's function); it runs when the node
  patches the model and again on ``ON_PREPARE_STATE`` (every step), so a node applied later that *replaces* the
  override cannot silently switch difcache off; once on top it does nothing. When two such nodes re-install each
  other, calls that re-enter one of difcache's overrides go straight down the chain (a guard per call);
* **reset on ``ON_CLEANUP``**: per-run state (patterns, clusters, hooks) never outlives a sampling run;
* **gate by sigma**: sparse only for steps whose sigma lies in ``(sigma(end_percent), sigma(start_percent)]`` (the
  model's ``percent_to_sigma``, like ComfyUI's ``start_percent``/``end_percent``);
* **dense where it should be**: sequences shorter than ``min_tokens`` and the listed ``dense_blocks``.

What difcache adds over ComfyUI's node (which needs CUDA, head dim 128 and ``comfy_kitchen``'s kernels): CPU
kernels, selection by top-k / top-p / PSA levels / AdaSpa / SVG2 clusters, 3D tiling of the video tokens,
pattern reuse across steps, and a stats line per run.

During a run, :class:`ComfyWanSparse` marks which block's ``self_attn`` is running (forward hooks), reads the
video grid from the model's input, and routes the override's sparse calls to
:meth:`difcache.attention.runtime.SparseRuntime.attend`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import torch

from difcache.errors import DifcacheError

OVERRIDE_KEY = "optimized_attention_override"
SUPPORTED = ("WanModel",)


def sparse_api() -> tuple[Callable, type]:
    """``(resolve_sparse_config, SparseRuntime)`` from ``difcache.attention``, or an error saying they are missing."""
    try:
        from difcache.attention.config import resolve_sparse_config
        from difcache.attention.runtime import SparseRuntime
    except ImportError as err:
        raise DifcacheError(
            f"difcache's sparse attention is not available in this installation ({err}), so the Sparse Attention "
            "node cannot run; update difcache to a release with difcache.attention."
        ) from None
    return resolve_sparse_config, SparseRuntime


def check_supported(diffusion_model: torch.nn.Module) -> None:
    names = {cls.__name__ for cls in type(diffusion_model).__mro__}
    if not names & set(SUPPORTED):
        raise DifcacheError(
            f"difcache Sparse Attention supports ComfyUI's {', '.join(SUPPORTED)}, not "
            f"{type(diffusion_model).__name__}; use difcache Apply Cache for other models."
        )


def parse_blocks(text: str | None) -> frozenset[int]:
    """``"0, 1, 47-49"`` -> ``{0, 1, 47, 48, 49}`` (ComfyUI's ``dense_blocks`` syntax); a bad entry raises."""
    blocks: set[int] = set()
    for part in (text or "").replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise DifcacheError(
                f"dense_blocks: {part!r} is not a block index or range; write e.g. '0, 1, 47-49'."
            ) from None
        blocks.update(range(min(a, b), max(a, b) + 1))
    return frozenset(blocks)


class ComfyWanSparse:
    """Sparse self-attention on one ComfyUI ``WanModel`` for one sampling run; :meth:`remove` undoes it."""

    def __init__(self, model: torch.nn.Module, config: Any, tracker: Any, active_steps: frozenset[int] | None,
                 dense_blocks: frozenset[int] = frozenset()) -> None:  # fmt: skip
        check_supported(model)
        _, runtime_cls = sparse_api()
        self.runtime = runtime_cls(config, tracker, num_layers=len(model.blocks))
        self.tracker = tracker
        self.active_steps = active_steps
        self.dense_blocks = dense_blocks
        self.layer: int | None = None
        patch = tuple(getattr(model, "patch_size", (1, 2, 2)))
        self._handles = [model.register_forward_pre_hook(lambda m, args, kw: self._set_grid(args, kw, patch),
                                                         with_kwargs=True)]  # fmt: skip
        for i, block in enumerate(model.blocks):
            self._handles.append(block.self_attn.register_forward_pre_hook(lambda m, a, i=i: self._enter(i)))
            self._handles.append(block.self_attn.register_forward_hook(lambda m, a, o: self._enter(None)))

    def _enter(self, layer: int | None) -> None:
        self.layer = layer

    def _set_grid(self, args: tuple, kwargs: dict, patch: tuple) -> None:
        x = args[0] if args else kwargs.get("x")
        if isinstance(x, torch.Tensor) and x.dim() == 5:
            self.runtime.grid = tuple(-(-s // p) for s, p in zip(x.shape[2:], patch, strict=True))
        else:
            self.runtime.grid = None

    def dense_reason(self, q: torch.Tensor, k: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """Why this attention call stays dense, or ``None``: only video self-attention in the window is sparse."""
        layer, grid = self.layer, self.runtime.grid
        heads = kwargs.get("heads", args[3] if len(args) > 3 else None)
        n = q.shape[2] if kwargs.get("skip_reshape", False) else q.shape[1]
        if (
            layer is None or grid is None or heads is None or kwargs.get("mask") is not None or len(args) > 4
            or k.shape != q.shape or n != math.prod(grid) or kwargs.get("skip_output_reshape", False)
        ):  # fmt: skip
            return "not_video_self_attention"  # not counted: cross-attention and other calls are not ours
        info = self.tracker.info
        reason = None
        if layer in self.dense_blocks:
            reason = "dense_block"
        elif self.active_steps is not None and info is not None and info.step not in self.active_steps:
            reason = "sigma"
        if reason is not None:
            self.runtime.note_dense(reason)
            return reason
        return self.runtime.dense_reason(layer)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        heads = kwargs.get("heads", args[3] if len(args) > 3 else None)
        if not kwargs.get("skip_reshape", False):  # [B, N, H*D] -> [B, H, N, D]
            q, k, v = (x.unflatten(2, (heads, -1)).transpose(1, 2) for x in (q, k, v))
        out = self.runtime.attend(self.layer, q, k, v, 0, scale=kwargs.get("scale"))
        return out.transpose(1, 2).flatten(2).to(v.dtype)

    def stats(self) -> Any:
        return self.runtime.stats()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.runtime.close()


class SparseOverride:
    """What one Sparse Attention node puts on a patched model: the override to install and the per-run state.

    ``sparse`` is the :class:`ComfyWanSparse` of the sampling run in progress (set by the node's ``OUTER_SAMPLE``
    wrapper), ``None`` between runs, when every call passes through.
    """

    def __init__(self) -> None:
        self.sparse: ComfyWanSparse | None = None
        self.installed: list[Callable] = []  # the overrides this node has put on a hook (identity checks only)
        self._inside = threading.local()

    def install(self, transformer_options: dict) -> None:
        """Put this node's override on top of the current one (chained); nothing if one of ours is on top."""
        current = transformer_options.get(OVERRIDE_KEY)
        if any(current is ours for ours in self.installed):
            return
        override = self._make(current)
        self.installed.append(override)
        transformer_options[OVERRIDE_KEY] = override

    def on_prepare_state(self, patcher: Any, timestep: Any = None, model_options: dict | None = None, *_: Any) -> None:
        """``ON_PREPARE_STATE`` callback (every step): re-install on top of the options the sampler uses."""
        options = model_options if model_options is not None else getattr(patcher, "model_options", None)
        if isinstance(options, dict):
            self.install(options.setdefault("transformer_options", {}))

    def on_cleanup(self, *_: Any) -> None:
        """``ON_CLEANUP`` callback: forget everything of the run (normally already done when sampling ended)."""
        if self.sparse is not None:
            self.sparse.remove()
            self.sparse = None

    def _make(self, previous: Callable | None) -> Callable:
        def override(func: Callable, *args: Any, **kwargs: Any) -> Any:
            sparse = self.sparse
            if sparse is None or getattr(self._inside, "active", False):  # between runs, or re-entered: pass on
                return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
            self._inside.active = True
            try:
                q, k, v = args[:3]
                if sparse.dense_reason(q, k, args, kwargs) is None:
                    return sparse.attend(q, k, v, args, kwargs)
                return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
            finally:
                self._inside.active = False

        override.difcache_sparse = self  # so tests and other tools can tell it apart
        return override
