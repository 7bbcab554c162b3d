"""Step tracking: which denoising step, CFG branch and pipeline call a denoiser call belongs to.

Every schedule in difcache is keyed on the *step index* of the sampling loop, never on the timestep
value (timesteps repeat in Heun/KDPM2, start mid-way in img2img, and are sigmas for flow models).
The tracker learns the step index from two sources, best first:

1. **The scheduler** (when `apply_cache` was given a pipeline): every diffusers pipeline calls
   ``scheduler.set_timesteps`` once per call and ``scheduler.step`` once per denoising step, after
   the denoiser call(s) of that step. The tracker wraps those two methods *on the scheduler
   instance* (restored on detach), so a new pipeline call starts a new run, ``len(timesteps)`` gives
   the step count, and ``set_begin_index`` (img2img) gives the start offset. Exact for batched CFG,
   sequential CFG (several denoiser calls between two ``step`` calls) and no CFG.
2. **The denoiser calls alone** (a bare module): each call is a step, unless diffusers'
   ``cache_context`` names a branch ("cond", "uncond") that has not run yet in the current step, in
   which case it belongs to the same step. A run ends when diffusers resets stateful hooks at the
   end of a pipeline call (models with ``CacheMixin``), when the input shape changes, or, as a last
   resort for models without ``CacheMixin``, when the timestep rises (samplers only lower it within a
   run). The timestep is used only to notice a new run, never to compute the step index.

The CFG branch of a call is diffusers' ``cache_context`` name when the pipeline sets one, otherwise
its position within the step ("call0", "call1"). Batched CFG is one call, so one branch.

One tracker is shared per denoiser by everything difcache installs on it (caches, sparse attention),
reference-counted through :meth:`StepTracker.attach` / :meth:`StepTracker.detach`.

A third source is **external**: a sampler that difcache does not drive through a diffusers scheduler (ComfyUI,
whose step index comes from its sigma schedule) opens a run with :meth:`StepTracker.begin_external_run` and
declares each call's step and branch with :meth:`StepTracker.set_step`; denoiser calls and scheduler methods
then neither advance the step nor start runs until :meth:`StepTracker.end_external_run`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager

from difcache.errors import DifcacheError

_TRACKER_ATTR = "_difcache_step_tracker"
_STEP_HOOK = "difcache_steps"


@dataclass(frozen=True)
class StepInfo:
    """Where one denoiser call sits in the sampling loop.

    Attributes:
        run: index of the pipeline call (increments each time a new run starts).
        step: 0-based denoising step within the run.
        num_steps: steps in the run, or ``None`` when no source tells it.
        branch: CFG branch key ("cond", "uncond", "cond_uncond", or "call<k>" by position).
        call_in_step: 0 for the first denoiser call of a step, 1 for the second (sequential CFG), ...
    """

    run: int
    step: int
    num_steps: int | None
    branch: str
    call_in_step: int

    @property
    def is_first_call_of_step(self) -> bool:
        return self.call_in_step == 0


class _ContextProbe(StateManager):
    """Receives diffusers' ``cache_context`` on the tracker's stateful hook.

    diffusers' ``CacheMixin.cache_context`` calls ``set_context`` on every ``StateManager`` held by a
    stateful hook; subclassing it is how the tracker learns the branch name without patching anything.
    """

    def __init__(self) -> None:
        super().__init__(dict)
        self.name: str | None = None
        self.num_inference_steps: int | None = None

    def set_context(self, context: Any) -> None:
        super().set_context(context)
        self.name = None if context is None else context.name
        self.num_inference_steps = None if context is None else context.num_inference_steps


class _StepHook(ModelHook):
    """Root hook on the denoiser: tells the tracker a call is starting."""

    _is_stateful = True

    def __init__(self, tracker: StepTracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.context = _ContextProbe()

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        if not self.tracker.external:  # an external source has set (or will set) the info itself
            self.tracker._on_call(args, kwargs, self.context)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.tracker.info = None  # sub-modules called outside a denoiser forward are not part of any step
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        # Called by diffusers at the end of every pipeline call (maybe_free_model_hooks) on CacheMixin models.
        if not self.tracker.external:
            self.tracker._end_run()
        return module


class StepTracker:
    """Shared per denoiser; see the module docstring for how steps, branches and runs are found."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.refcount = 0
        self.run = -1
        self.step = 0
        self.num_steps: int | None = None
        self.call_in_step = 0
        self.info: StepInfo | None = None
        self._run_open = False
        self.external = False  # steps come from begin_external_run / set_step, not from calls or a scheduler
        self._branches_in_step: set[str] = set()
        self._scheduler: Any = None
        self._scheduler_originals: dict[str, tuple[Any, Callable | None]] = {}
        self._shape_key: tuple | None = None
        self._last_timestep: float | None = None
        self._run_listeners: list[Callable[[], None]] = []
        self._timestep_position = timestep_position(module)
        self._hook = _StepHook(self)
        registry = HookRegistry.check_if_exists_or_initialize(module)
        registry.register_hook(self._hook, _STEP_HOOK)

    # ------------------------------------------------------------------ sharing
    @classmethod
    def attach(cls, module: torch.nn.Module, scheduler: Any = None) -> StepTracker:
        """Return the tracker of ``module``, creating it on first use; pass the pipeline's scheduler if any."""
        tracker = getattr(module, _TRACKER_ATTR, None)
        if tracker is None:
            tracker = cls(module)
            setattr(module, _TRACKER_ATTR, tracker)
        tracker.refcount += 1
        if scheduler is not None and tracker._scheduler is None:
            tracker._wrap_scheduler(scheduler)
        return tracker

    def detach(self) -> None:
        """Drop one reference; the last one removes the hook and restores the scheduler."""
        self.refcount -= 1
        if self.refcount > 0:
            return
        HookRegistry.check_if_exists_or_initialize(self.module).remove_hook(_STEP_HOOK, recurse=False)
        self._unwrap_scheduler()
        if getattr(self.module, _TRACKER_ATTR, None) is self:
            delattr(self.module, _TRACKER_ATTR)

    def on_new_run(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Register ``callback`` to run when a new run starts (to drop per-run state); returns a remover."""
        self._run_listeners.append(callback)
        return lambda: self._run_listeners.remove(callback)

    @property
    def uses_scheduler(self) -> bool:
        return self._scheduler is not None

    # ------------------------------------------------------------------ scheduler source
    def _wrap_scheduler(self, scheduler: Any) -> None:
        self._scheduler = scheduler
        for name, replacement in (
            ("set_timesteps", self._after_set_timesteps),
            ("step", self._after_step),
            ("set_begin_index", self._after_set_begin_index),
        ):
            original = getattr(scheduler, name, None)
            if original is None:
                continue
            # Instance attribute, not a class patch: other schedulers of the same class are untouched.
            wrapper = _chain(original, replacement)
            self._scheduler_originals[name] = (wrapper, vars(scheduler).get(name))
            setattr(scheduler, name, wrapper)

    def _unwrap_scheduler(self) -> None:
        """Undo the wrappers; one that something else has wrapped since is made a pass-through instead, so the
        later layer keeps working and nothing above it is dropped."""
        for name, (wrapper, previous) in self._scheduler_originals.items():
            if vars(self._scheduler).get(name) is wrapper:
                if previous is None:
                    delattr(self._scheduler, name)
                else:
                    setattr(self._scheduler, name, previous)
            else:
                wrapper.after = None
        self._scheduler_originals.clear()
        self._scheduler = None

    def _after_set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        if self.external:
            return
        self._end_run()
        timesteps = getattr(self._scheduler, "timesteps", None)
        self.num_steps = None if timesteps is None else len(timesteps)
        self._start_run(step=0)

    def _after_set_begin_index(self, begin_index: int = 0, *args: Any, **kwargs: Any) -> None:
        if self._run_open and self.info is None and not self.external:
            self.step = int(begin_index)

    def _after_step(self, *args: Any, **kwargs: Any) -> None:
        if self._run_open and not self.external:
            self.step += 1
            self.call_in_step = 0
            self._branches_in_step.clear()

    # ------------------------------------------------------------------ external source
    def begin_external_run(self, num_steps: int | None) -> None:
        """Start a run whose step indices the caller reports with :meth:`set_step` (see the module docstring).

        Run listeners fire as for any new run, so per-run state (feature stores) is dropped.
        """
        self._end_run()
        self.external = True
        self.num_steps = num_steps
        self._start_run(step=0)

    def set_step(self, step: int, branch: str, call_in_step: int = 0) -> StepInfo:
        """Declare the step and CFG branch of the denoiser call about to run in the external run.

        The info stays published until the denoiser's forward returns (or the next ``set_step``).
        """
        if not self.external:
            raise DifcacheError("StepTracker.set_step() needs an external run: call begin_external_run(num_steps).")
        self.step, self.call_in_step = step, call_in_step
        self.info = StepInfo(self.run, step, self.num_steps, branch, call_in_step)
        return self.info

    def end_external_run(self) -> None:
        """End the external run; calls are tracked from calls and the scheduler again."""
        self.external = False
        self._end_run()

    # ------------------------------------------------------------------ runs
    def _start_run(self, step: int) -> None:
        self.run += 1
        self.step = step
        self.call_in_step = 0
        self.info = None
        self._branches_in_step.clear()
        self._last_timestep = None
        self._run_open = True
        for callback in list(self._run_listeners):
            callback()

    def _end_run(self) -> None:
        self._run_open = False
        self.info = None
        self._shape_key = None
        self._last_timestep = None

    # ------------------------------------------------------------------ per call
    def _on_call(self, args: tuple, kwargs: dict, context: _ContextProbe) -> None:
        shape_key = _shape_key(args, kwargs)
        timestep = None
        if self._scheduler is None or not self._run_open:
            timestep = self._timestep_value(args, kwargs)
            self._advance_without_scheduler(shape_key, timestep, context)
        elif shape_key != self._shape_key and self._shape_key is not None:
            # Resolution or batch changed inside a run: features of the old shape are useless.
            self._start_run(step=self.step)
        self._shape_key = shape_key
        self._last_timestep = timestep

        name = context.name
        branch = f"call{self.call_in_step}" if name is None or name in self._branches_in_step else name
        self._branches_in_step.add(branch)
        if context.num_inference_steps is not None and self.num_steps is None:
            self.num_steps = context.num_inference_steps
        self.info = StepInfo(self.run, self.step, self.num_steps, branch, self.call_in_step)
        self.call_in_step += 1

    def _advance_without_scheduler(self, shape_key: tuple, timestep: float | None, context: _ContextProbe) -> None:
        rose = timestep is not None and self._last_timestep is not None and timestep > self._last_timestep
        if not self._run_open or shape_key != self._shape_key or (rose and context.name is None):
            self.num_steps = context.num_inference_steps
            self._start_run(step=0)
            return
        name = context.name
        if name is None or name in self._branches_in_step:
            self.step += 1
            self.call_in_step = 0
            self._branches_in_step.clear()

    def _timestep_value(self, args: tuple, kwargs: dict) -> float | None:
        value = kwargs.get("timestep")
        if value is None and self._timestep_position is not None and len(args) > self._timestep_position:
            value = args[self._timestep_position]
        if value is None:
            return None
        if isinstance(value, torch.Tensor):
            # Only read when no scheduler is known; a bare-module fallback, documented above.
            return float(value.detach().reshape(-1)[0]) if value.numel() else None
        return float(value)


def _chain(original: Callable, after: Callable) -> Callable:
    """``original`` followed by ``after``; setting ``wrapper.after = None`` turns it into a pass-through."""

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if wrapper.after is not None:
            wrapper.after(*args, **kwargs)
        return result

    wrapper.after = after
    return wrapper


def _shape_key(args: tuple, kwargs: dict) -> tuple:
    """Shapes of the tensor arguments: a change means a new resolution, frame count or batch size."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    tensors += [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    return tuple(tuple(t.shape) for t in tensors if t.dim() >= 3)


def timestep_position(module: torch.nn.Module) -> int | None:
    """Index of ``timestep`` among the positional arguments of ``module.forward`` (None if it has none)."""
    try:
        params = list(inspect.signature(type(module).forward).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("timestep") - 1 if "timestep" in params else None
