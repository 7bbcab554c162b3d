"""Calibration runs: the uncached pipeline on a few inputs, with probes recording what a method needs.

A method that needs calibration registers a *calibrator*, ``fn(config, layout, session, call_kwargs) -> data``,
next to its build function (``methods.register_calibrator``); ``difcache.calibrate`` (and ``autotune``) open a
:class:`CalibrationSession`, which runs the pipeline with progress bars, knows the step index of every denoiser
call (the same ``StepTracker`` the caches use) and calls the probes the calibrator installs. Memory: recorded
tensors can be subsampled to a fixed set of entries per unit (:func:`subsample`), so similarity matrices over all
steps stay small on large models.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from difcache.core import StepInfo
from difcache.engine.steps import StepTracker
from difcache.errors import DifcacheError

Probe = Callable[[StepInfo, tuple, dict, Any], None]


class CalibrationSession:
    """Uncached calibration runs of one pipeline, with probes called at chosen modules' outputs."""

    def __init__(self, pipe: Any, model: torch.nn.Module, num_steps: int) -> None:
        if getattr(pipe, "scheduler", None) is None:
            raise DifcacheError("Calibration needs the pipeline (its scheduler gives step indices), not a bare module.")
        self.pipe, self.model, self.num_steps = pipe, model, num_steps
        self.tracker = StepTracker.attach(model, pipe)
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

    def run(
        self, call_kwargs: Sequence[dict[str, Any]], desc: str = "calibration", progress: bool = True
    ) -> list[Any]:
        """Run the pipeline once per entry of ``call_kwargs`` (with ``num_inference_steps`` set), with one
        progress bar over the calls."""
        outputs = []
        for kwargs in tqdm(call_kwargs, desc=desc, unit="call", disable=not progress):
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
def _subsample_index(numel: int, max_entries: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + numel)
    return torch.randperm(numel, generator=gen)[:max_entries].to(device)


def subsample(tensor: torch.Tensor, max_entries: int = 16384, seed: int = 0) -> torch.Tensor:
    """A fixed (seeded) subset of ``tensor``'s entries as fp32, the same for every call with the same size.

    The index is drawn once per size and device (a full permutation of a FLUX-size activation costs a third of
    a second on a CPU core, and calibration records every unit at every step).
    """
    flat = tensor.detach().reshape(-1)
    if flat.numel() <= max_entries:
        return flat.float().clone()
    return flat[_subsample_index(flat.numel(), max_entries, seed, flat.device)].float()
