"""diffusers pipelines inside ComfyUI: the ``DIFCACHE_PIPE`` socket (Load -> Apply difcache -> Sample -> IMAGE).

For people who run diffusers pipelines in ComfyUI rather than ComfyUI's native models. A :class:`DifcachePipe`
carries the pipeline and the cache configuration *to apply when sampling*:

* **Apply** only validates the method on the pipeline's denoiser and returns a new ``DifcachePipe`` with the
  resolved config; it never touches the pipeline. ComfyUI caches node outputs and shares the pipeline object
  between branches of a graph, so an Apply that hooked the pipeline would leak into every branch; this one is
  idempotent (applying again replaces the config, ``"none"`` clears it).
* **Sample** applies the cache with :func:`difcache.apply_cache` (exact steps from the pipeline's scheduler),
  calls the pipeline, and removes the cache in a ``finally``: the shared pipeline is uncached between runs.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import difcache
from difcache.adapters import layout_of
from difcache.config import CacheConfig
from difcache.denoiser import find_denoiser
from difcache.errors import DifcacheError
from difcache.methods import method_spec, resolve_config

log = logging.getLogger("difcache.comfy")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class DifcachePipe:
    """A diffusers pipeline, the cache to apply while sampling, and default call arguments.

    ``call_defaults`` are keyword arguments every Sample passes (e.g. ``prompt_embeds`` for a pipeline loaded
    without text encoders); the Sample node's widgets and its JSON ``extra_kwargs`` override them.
    """

    pipe: Any
    cache: CacheConfig | None = None
    call_defaults: dict[str, Any] = field(default_factory=dict, compare=False)


def load_pipeline(path: str, dtype: str = "auto", device: str = "auto") -> DifcachePipe:
    """``DiffusionPipeline.from_pretrained(path)`` in ``dtype`` on ``device`` ("auto": CUDA in bfloat16 if present)."""
    from diffusers import DiffusionPipeline

    if not path.strip():
        raise DifcacheError("difcache Load Pipeline needs a path: a local diffusers folder or a Hub repository id.")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        torch_dtype = DTYPES[dtype]
    pipe = DiffusionPipeline.from_pretrained(path.strip(), dtype=torch_dtype)
    return DifcachePipe(pipe.to(device))


def apply_to_pipe(dpipe: DifcachePipe, method: str, overrides: dict[str, Any]) -> DifcachePipe:
    """``dpipe`` with ``method`` (``"none"``: no cache) checked against its denoiser; the pipeline is untouched."""
    if method == "none":
        return dataclasses.replace(dpipe, cache=None)
    model, _ = find_denoiser(dpipe.pipe)
    layout = layout_of(model)
    try:
        config = resolve_config(method, layout, overrides)
        method_spec(config).build(config, layout)  # builds the plan only (no hooks): fails here, not at Sample
    except (TypeError, ValueError) as err:
        raise DifcacheError(f"difcache {method!r} on {type(model).__name__}: {err}") from None
    return dataclasses.replace(dpipe, cache=config)


def call_kwargs(pipe: Any, widgets: dict[str, Any], defaults: dict[str, Any], extra: str) -> dict[str, Any]:
    """The pipeline's keyword arguments: ``defaults``, then the widgets it accepts (0 / "" meaning "keep the
    default"), then the JSON ``extra`` object. Precomputed embeddings replace the prompt strings."""
    params = inspect.signature(pipe.__call__).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = dict(defaults)
    kwargs.update({k: v for k, v in widgets.items() if k in params and v not in (0, "", None)})
    if extra.strip():
        try:
            parsed = json.loads(extra)
        except json.JSONDecodeError as err:
            raise DifcacheError(
                f'extra_kwargs is not valid JSON ({err}); write an object like {{"true_cfg_scale": 4}}.'
            ) from None
        if not isinstance(parsed, dict):
            raise DifcacheError('extra_kwargs must be a JSON object, e.g. {"max_sequence_length": 256}.')
        unknown = sorted(k for k in parsed if k not in params)
        if unknown and not accepts_any:
            raise DifcacheError(f"{type(pipe).__name__} takes no argument(s) {unknown}; remove them from extra_kwargs.")
        kwargs.update(parsed)
    for text in ("prompt", "negative_prompt"):
        if f"{text}_embeds" in kwargs:
            kwargs.pop(text, None)
    kwargs["output_type"] = "np"
    return kwargs


def to_image(result: Any) -> torch.Tensor:
    """A pipeline's images (``[B, H, W, C]``) or video frames (``[B, F, H, W, C]``) as ComfyUI's IMAGE batch."""
    images = getattr(result, "images", None)
    if images is None:
        images = getattr(result, "frames", None)
    if images is None:
        raise DifcacheError(f"{type(result).__name__} has neither `images` nor `frames`; cannot make an IMAGE.")
    if isinstance(images, list):  # PIL images or nested lists of them
        images = np.asarray([np.asarray(i) for i in images])
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    array = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    return array.reshape(-1, *array.shape[-3:]).clamp(0.0, 1.0)


def sample_pipe(dpipe: DifcachePipe, widgets: dict[str, Any], seed: int, extra: str = "") -> tuple[torch.Tensor, str]:
    """Run the pipeline with ``dpipe``'s cache applied for this call only; returns (IMAGE, stats text)."""
    pipe = dpipe.pipe
    kwargs = call_kwargs(pipe, widgets, dpipe.call_defaults, extra)
    kwargs["generator"] = torch.Generator().manual_seed(seed)
    if difcache.remove_cache(pipe):
        log.warning("difcache: removed a cache left on the pipeline (an interrupted run or applied outside the nodes).")
    handle = difcache.apply_cache(pipe, dpipe.cache) if dpipe.cache is not None else None
    try:
        result = pipe(**kwargs)
        stats = handle.stats() if handle is not None else None
    finally:
        if handle is not None:
            handle.remove()
    text = "" if stats is None else str(stats)
    if stats is not None:
        log.info("%s", text.splitlines()[0])
    return to_image(result), text
