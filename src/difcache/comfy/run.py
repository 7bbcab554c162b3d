"""One ComfyUI sampling run as difcache sees it: which step and CFG branch each diffusion-model call belongs to.

ComfyUI's sampler does not use a diffusers scheduler, so difcache's step tracker is driven from outside
(:meth:`~difcache.engine.steps.StepTracker.begin_external_run`):

* An ``OUTER_SAMPLE`` wrapper (one per difcache node, see :func:`sampling_run`) opens a :class:`ComfyRun` for
  the guider's sampling call, stores it in the guider's (cloned) ``transformer_options`` under
  :data:`RUN_KEY`, and closes it in a ``finally``. Nested difcache wrappers share the run the outermost one
  opened, so a cache and sparse attention on the same model agree on every step.
* A ``DIFFUSION_MODEL`` wrapper (:func:`diffusion_model_wrapper`, one per model under :data:`STEP_WRAPPER_KEY`)
  tells the run about every call before the model computes: the step is the position of the current sigma
  (``transformer_options["sigmas"]``) in the run's schedule (``transformer_options["sample_sigmas"]``).

Step rule: a sigma equal (relative tolerance 1e-4) to a schedule entry is that step; any other sigma (the
intermediate evaluations of dpm_2, dpmpp_2s, dpmpp_sde...) belongs to the step whose interval contains it,
never to an earlier step than the run has reached. Heun-type samplers evaluate their second stage exactly at
the next sigma, which therefore shares a step index with the next step's first evaluation. Reading the
current sigma costs one host-device synchronisation per model call (ComfyUI's samplers already synchronise
every step); schedules are read once per run.

Branch: the call's conds (``uuids``, with ``cond_or_uncond``), its input shape and its context window, so
batched cond+uncond, separately run conds (low memory, area conds) and context windows each keep their own
features and never forecast from another's. A second evaluation of the same conds within one step (the
sampler's second stage) gets a branch of its own (``...#1``): each stage's features form their own smooth
series, instead of one overwriting the other at the same step index.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from difcache.engine.steps import StepTracker

log = logging.getLogger("difcache.comfy")

# ComfyUI's wrapper types (comfy.patcher_extension.WrappersMP); literal so the pack imports without ComfyUI.
OUTER_SAMPLE = "outer_sample"
DIFFUSION_MODEL = "diffusion_model"
RUN_KEY = "difcache_run"
STEP_WRAPPER_KEY = "difcache_steps"
_RTOL = 1e-4


class ComfyRun:
    """The state of one sampling run: the tracker it drives and the sigma schedule it maps steps from."""

    def __init__(self, diffusion_model: torch.nn.Module, sigmas: torch.Tensor | None) -> None:
        self.model = diffusion_model
        # Modules that already carry a diffusers hook registry keep it; the others are tidied on close.
        self._had_registry = {id(m) for m in diffusion_model.modules() if hasattr(m, "_diffusers_hook")}
        self.tracker = StepTracker.attach(diffusion_model)
        # External from now on, so no call is ever counted by the tracker's own rules; the run proper starts
        # again at the first call (before_call), once every difcache wrapper has installed its hooks, so that
        # all of them see the run start and begin with empty per-run state.
        self.tracker.begin_external_run(None)
        self.calls = 0
        self._sigmas_ref: Any = None
        self._descending: list[float] = []  # the schedule negated, ascending, for bisect
        self._begun = False
        self._step = 0
        self._calls_in_step = 0
        self._repeats: dict[str, int] = {}
        if sigmas is not None:
            self._set_schedule(sigmas)

    def _set_schedule(self, sigmas: Any) -> None:
        self._sigmas_ref = sigmas
        values = sigmas.detach().float().cpu().tolist() if isinstance(sigmas, torch.Tensor) else list(sigmas)
        self._descending = [-float(s) for s in values]

    @property
    def num_steps(self) -> int | None:
        return len(self._descending) - 1 if self._descending else None

    @property
    def schedule(self) -> list[float]:
        """The run's sigmas, descending (``num_steps + 1`` values, the last usually 0)."""
        return [-s for s in self._descending]

    def step_of(self, sigma: float) -> int:
        """The step index of a model evaluation at ``sigma`` (see the module docstring)."""
        schedule = self._descending
        if not schedule:
            return self._step
        i = bisect.bisect_left(schedule, -sigma)  # first entry with schedule sigma <= sigma
        for j in (i - 1, i):
            if 0 <= j < len(schedule) and abs(-schedule[j] - sigma) <= _RTOL * max(abs(sigma), 1e-12):
                return min(j, len(schedule) - 2) if len(schedule) > 1 else 0
        step = max(i - 1, 0)  # inside the interval (schedule[step], schedule[step + 1])
        return max(min(step, max(len(schedule) - 2, 0)), self._step)

    def before_call(self, x: Any, transformer_options: dict) -> None:
        """Publish the step and branch of the diffusion-model call about to run."""
        sample_sigmas = transformer_options.get("sample_sigmas")
        if sample_sigmas is not None and sample_sigmas is not self._sigmas_ref:
            self._set_schedule(sample_sigmas)
        if not self._begun:
            self.tracker.begin_external_run(self.num_steps)
            self._begun = True
        sigmas = transformer_options.get("sigmas")
        step = self._step if sigmas is None else self.step_of(float(torch.as_tensor(sigmas).reshape(-1)[0]))
        if step != self._step:
            self._step, self._calls_in_step = step, 0
            self._repeats.clear()
        branch = branch_key(x, transformer_options)
        repeat = self._repeats.get(branch, 0)
        self._repeats[branch] = repeat + 1
        if repeat:  # a second evaluation of these conds in this step (Heun, dpm_2...) has its own features
            branch = f"{branch}#{repeat}"
        self.tracker.set_step(step, branch, self._calls_in_step)
        self._calls_in_step += 1
        self.calls += 1

    def close(self) -> None:
        """End the run and leave the shared model as it was: once every difcache hook is removed, the hook
        registries and instance ``forward`` attributes diffusers leaves behind on removal are deleted too."""
        self.tracker.end_external_run()
        self.tracker.detach()
        for module in self.model.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None or id(module) in self._had_registry or registry.hooks:
                continue
            del module._diffusers_hook
            forward = vars(module).get("forward")
            if getattr(forward, "__func__", None) is type(module).forward and forward.__self__ is module:
                del module.forward


def branch_key(x: Any, transformer_options: dict) -> str:
    """Which conds, shape and context window a call computes; features are kept per key."""
    conds = transformer_options.get("cond_or_uncond") or ()
    uuids = transformer_options.get("uuids") or ()
    parts = [f"{c}:{u}" for c, u in zip(conds, uuids, strict=False)] or [str(c) for c in conds] or ["call"]
    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else ()
    window = transformer_options.get("context_window")
    frames = tuple(getattr(window, "index_list", ()) or ()) if window is not None else ()
    return f"{','.join(parts)}|{shape}" + (f"|w{frames}" if frames else "")


def _find_options(args: tuple, kwargs: dict) -> dict | None:
    options = kwargs.get("transformer_options")
    if isinstance(options, dict):
        return options
    return next((a for a in reversed(args) if isinstance(a, dict) and RUN_KEY in a), None)


def diffusion_model_wrapper(executor: Callable, *args: Any, **kwargs: Any) -> Any:
    """ComfyUI ``DIFFUSION_MODEL`` wrapper: declares the call's step and branch, then lets the model run."""
    options = _find_options(args, kwargs)
    run = options.get(RUN_KEY) if options is not None else None
    if run is None:  # sampled without a difcache OUTER_SAMPLE wrapper (should not happen): leave it alone
        return executor(*args, **kwargs)
    run.before_call(args[0] if args else kwargs.get("x"), options)
    return executor(*args, **kwargs)


def copy_options(options: dict) -> dict:
    """Nested copy of ``model_options`` as ComfyUI's ``create_model_options_clone`` makes it (dicts copied
    recursively, lists shallowly, everything else shared)."""
    out = dict(options)
    for key, value in options.items():
        if isinstance(value, dict):
            out[key] = copy_options(value)
        elif isinstance(value, list):
            out[key] = list(value)
    return out


def diffusion_model_of(guider: Any) -> torch.nn.Module:
    """The ``nn.Module`` a guider samples with (``ModelPatcher.get_model_object('diffusion_model')``)."""
    return guider.model_patcher.get_model_object("diffusion_model")


def sigmas_arg(args: tuple, kwargs: dict) -> Any:
    """``sigmas`` of ``CFGGuider.outer_sample(noise, latent_image, sampler, sigmas, ...)``."""
    return kwargs["sigmas"] if "sigmas" in kwargs else (args[3] if len(args) > 3 else None)


@contextmanager
def sampling_run(executor: Any, args: tuple, kwargs: dict) -> Iterator[ComfyRun]:
    """For an ``OUTER_SAMPLE`` wrapper: the run of this sampling call, opened here unless an outer difcache
    wrapper already did; the guider's ``model_options`` are replaced by a copy holding the run and restored,
    and the run closed, when the sampling call ends (also on errors and interruptions)."""
    guider = executor.class_obj
    options = guider.model_options
    run = options.get("transformer_options", {}).get(RUN_KEY)
    if run is not None:
        yield run
        return
    run = ComfyRun(diffusion_model_of(guider), sigmas_arg(args, kwargs))
    guider.model_options = copy_options(options)
    guider.model_options.setdefault("transformer_options", {})[RUN_KEY] = run
    try:
        yield run
    finally:
        guider.model_options = options
        run.close()


def add_step_wrapper(patcher: Any) -> None:
    """Install the ``DIFFUSION_MODEL`` wrapper on ``patcher`` exactly once, whichever difcache nodes use it."""
    patcher.remove_wrappers_with_key(DIFFUSION_MODEL, STEP_WRAPPER_KEY)
    patcher.add_wrapper_with_key(DIFFUSION_MODEL, STEP_WRAPPER_KEY, diffusion_model_wrapper)
