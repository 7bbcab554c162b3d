"""``calibrate()``: run the uncached pipeline on a few inputs and let a method learn from what it records.

A method that needs calibration registers a *calibrator*, ``fn(config, layout, session) -> data``, next to its
build function (``methods.register_calibrator``). The session runs the pipeline with progress bars, knows the
step index of every denoiser call (the same ``StepTracker`` the caches use) and records what the calibrator
asks for through forward hooks. Memory: recorded tensors can be subsampled to a fixed set of entries per unit
(:func:`subsample`), so similarity matrices over all steps stay small on large models.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from difcache.adapters import layout_of
from difcache.engine.steps import StepInfo, StepTracker
from difcache.errors import DifcacheError
from difcache.profile import Profile

Probe = Callable[[StepInfo, tuple, dict, Any], None]


class CalibrationSession:
    """Uncached calibration runs of one pipeline, with probes called at chosen modules' outputs."""

    def __init__(self, pipe: Any, model: torch.nn.Module, scheduler: Any, num_steps: int) -> None:
        if scheduler is None:
            raise DifcacheError("calibrate() needs the pipeline (its scheduler gives step indices), not a bare module.")
        self.pipe, self.model, self.num_steps = pipe, model, num_steps
        self.tracker = StepTracker.attach(model, scheduler)
        self.call_index = -1
        self._handles: list[Any] = []

    def probe(self, module: torch.nn.Module, fn: Probe) -> None:
        """Call ``fn(info, args, kwargs, output)`` after every forward of ``module`` during the runs."""

        def hook(mod: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self.tracker.info is not None:
                fn(self.tracker.info, args, kwargs, output)

        self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def probe_inputs(self, module: torch.nn.Module, fn: Callable[[StepInfo, tuple, dict], None]) -> None:
        """Call ``fn(info, args, kwargs)`` before every forward of ``module`` during the runs."""

        def hook(mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if self.tracker.info is not None:
                fn(self.tracker.info, args, kwargs)

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def run(self, call_kwargs: Sequence[dict[str, Any]], desc: str = "calibration") -> list[Any]:
        """Run the pipeline once per entry of ``call_kwargs`` (with ``num_inference_steps`` set)."""
        outputs = []
        for kwargs in tqdm(call_kwargs, desc=desc, unit="call"):
            self.call_index += 1
            with torch.no_grad():
                outputs.append(self.pipe(**{**kwargs, "num_inference_steps": self.num_steps}))
        return outputs

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.tracker.detach()


@functools.lru_cache(maxsize=256)
def _subsample_index(numel: int, max_entries: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + numel)
    return torch.randperm(numel, generator=gen)[:max_entries]


def subsample(tensor: torch.Tensor, max_entries: int = 16384, seed: int = 0) -> torch.Tensor:
    """A fixed (seeded) subset of ``tensor``'s entries as fp32, the same for every call with the same size.

    The index is drawn once per size (a full permutation of a large activation costs a third of a second).
    """
    flat = tensor.detach().reshape(-1)
    if flat.numel() <= max_entries:
        return flat.float().clone()
    return flat[_subsample_index(flat.numel(), max_entries, seed).to(flat.device)].float()


def calibrate(
    pipe: Any,
    method: str,
    call_kwargs: Sequence[dict[str, Any]],
    num_inference_steps: int,
    **overrides: Any,
) -> Profile:
    """Calibrate ``method`` on ``pipe`` with uncached runs over ``call_kwargs``; returns a :class:`Profile`.

    Example::

        profile = difcache.calibrate(pipe, "bac", [dict(prompt=p) for p in prompts], num_inference_steps=50)
        profile.save("flux-50.json")
        difcache.apply_cache(pipe, "bac", profile="flux-50.json")
    """
    from difcache import __version__
    from difcache.api import find_denoiser
    from difcache.methods import method_spec, resolve_config

    if not call_kwargs:
        raise DifcacheError("calibrate() needs at least one entry in call_kwargs (the inputs to run).")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise DifcacheError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}.")
    model, scheduler = find_denoiser(pipe)
    if getattr(model, "_difcache_cache", None) is not None:
        raise DifcacheError("calibrate() runs the model uncached; call handle.remove() first.")
    layout = layout_of(model)
    config = resolve_config(method, layout.family, overrides)
    spec = method_spec(config)
    if spec.calibrate is None:
        raise DifcacheError(f"{config.method!r} needs no calibration; apply it directly with apply_cache.")
    session = CalibrationSession(pipe, model, scheduler, num_inference_steps)
    try:
        data = spec.calibrate(config, layout, session, list(call_kwargs))
    finally:
        session.close()
    config_dict = {k: v for k, v in config.to_dict().items() if k not in ("profile",)}
    return Profile(
        method=config.method,
        model_class=type(model).__name__,
        fingerprint=layout.fingerprint,
        num_steps=num_inference_steps,
        data=data,
        config=config_dict,
        version=Profile.VERSION,
        difcache_version=__version__,
    )
