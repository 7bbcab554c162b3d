"""What difcache is applied to: the denoiser of a pipeline (unwrapped from ``torch.compile``), and the checks the
calibrating verbs share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from difcache.errors import DifcacheError

HANDLE_ATTR = "_difcache_cache"  # the CacheHandle of a cached denoiser


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module itself behind a ``torch.compile`` wrapper (``OptimizedModule._orig_mod``)."""
    while isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):
        module = module._orig_mod
    return module


def find_denoiser(target: Any) -> tuple[torch.nn.Module, Any]:
    """The denoiser (``transformer`` or ``unet``, unwrapped from ``torch.compile``) and the pipeline it belongs
    to, or ``(module, None)`` when ``target`` is the module itself."""
    if isinstance(target, torch.nn.Module):
        return unwrap(target), None
    for name in ("transformer", "unet"):
        module = getattr(target, name, None)
        if isinstance(module, torch.nn.Module):
            return unwrap(module), target
    raise DifcacheError(
        f"Cannot find a denoiser in {type(target).__name__}: expected a diffusers pipeline with a `transformer` "
        "or `unet`, or the denoiser module itself (e.g. apply_cache(pipe.transformer, ...))."
    )


def check_calibration_call(target: Any, call_kwargs: Sequence[dict[str, Any]], num_inference_steps: int) -> None:
    """The checks ``calibrate`` and ``autotune`` share: inputs given, a sane step count, the model uncached."""
    if not call_kwargs:
        raise DifcacheError("At least one entry in call_kwargs is needed (the inputs to run).")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise DifcacheError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}.")
    model, _ = find_denoiser(target)
    if getattr(model, HANDLE_ATTR, None) is not None:
        raise DifcacheError("Calibration runs the model uncached; call handle.remove() first.")
