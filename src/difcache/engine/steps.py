"""Step tracking: which denoising step, CFG branch and pipeline call a denoiser call belongs to.

Every schedule in difcache is keyed on the *step index* of the sampling loop, never on the timestep value
(timesteps repeat in Heun/KDPM2, start mid-way in img2img, and are sigmas for flow models). The tracker learns
it from these sources, best first:

1. **The scheduler.** Every diffusers pipeline calls ``scheduler.set_timesteps`` once per call and
   ``scheduler.step`` once per denoising step, after the denoiser call(s) of that step. The tracker wraps those
   methods (and ``set_begin_index``, img2img) *on the scheduler instance*, restored on detach. It follows the
   pipeline's *current* scheduler: after ``pipe.scheduler = OtherScheduler.from_config(...)`` the first call
   notices the swap, wraps the new one and recovers its position (``len(timesteps)``, ``step_index``).
2. **diffusers' ``cache_context``** names the CFG branch of a call ("cond", "uncond") and announces the call.
3. **The pipeline on the call stack.** A call that no bound scheduler announced (a second pipeline sharing the
   denoiser, ``FluxImg2ImgPipeline(**pipe.components)`` with its own scheduler) looks for the diffusers
   pipeline that is calling the denoiser and binds that pipeline's scheduler.
4. **The calls alone** (a bare module in the user's own loop): each call is a step, unless ``cache_context``
   names a branch not yet seen in the step. A run ends when diffusers resets stateful hooks at the end of a
   pipeline call (models with ``CacheMixin``), when the input shape changes, or, for models without
   ``CacheMixin``, when the timestep does not decrease (samplers only lower it within a run; one-step calls are
   runs of their own). The timestep is read only to notice a new run, never to compute the step index.
5. **External** (ComfyUI): a sampler that difcache does not drive through a diffusers scheduler opens a run with
   :meth:`StepTracker.begin_external_run` and declares each call with :meth:`StepTracker.set_step`.

**Announcements, and why.** Sources 1, 2 and 5 run *outside* the denoiser's forward, before the call: the
tracker computes the call's :class:`~difcache.core.StepInfo` there and *announces* it to its listeners (the
cache runtime prepares every unit's decision then). Inside the forward, a call only picks up its announcement,
so a compiled denoiser (``torch.compile``) never traces a step counter: graphs are made per kind of step, not
per step. Sources 3 and 4 (a call nobody announced) are handled in :meth:`StepTracker._unannounced_call`, which
runs eagerly (a graph break under ``torch.compile``; apply the cache to the pipeline to avoid it).

One tracker is shared per denoiser by everything difcache installs on it (caches, sparse attention),
reference-counted through :meth:`StepTracker.attach` / :meth:`StepTracker.detach`. It keeps one pipeline call
at a time: a call from another thread while a run of this denoiser is in progress raises (state is per
denoiser; give each thread its own denoiser).
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager

from difcache.core import StepInfo
from difcache.errors import DifcacheError, Uncopyable

_TRACKER_ATTR = "_difcache_step_tracker"
_STEP_HOOK = "difcache_steps"
_STACK_DEPTH = 12  # frames searched for the calling pipeline

__all__ = ["StepInfo", "StepTracker", "shape_key", "timestep_position"]


class _ContextProbe(StateManager):
    """Receives diffusers' ``cache_context`` on the tracker's stateful hook.

    diffusers' ``CacheMixin.cache_context`` calls ``set_context`` on every ``StateManager`` held by a stateful
    hook, before the denoiser call it wraps; subclassing it is how the tracker learns the branch without
    patching anything.
    """

    def __init__(self, tracker: StepTracker) -> None:
        super().__init__(dict)
        self.tracker = tracker
        self.name: str | None = None

    def set_context(self, context: Any) -> None:
        super().set_context(context)
        self.name = None if context is None else context.name
        if context is not None:
            self.tracker._on_context(context)


class _StepHook(ModelHook):
    """Root hook on the denoiser: each call picks up its announced step (or is announced now)."""

    _is_stateful = True

    def __init__(self, tracker: StepTracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.context = _ContextProbe(tracker)

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self.tracker._on_call(args, kwargs)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.tracker.info = None  # sub-modules called outside a denoiser forward are not part of any step
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        # Called by diffusers at the end of every pipeline call (maybe_free_model_hooks) on CacheMixin models.
        if not self.tracker.external:
            self.tracker._end_run()
        return module


class StepTracker(Uncopyable):
    """Shared per denoiser; see the module docstring for how steps, branches and runs are found."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.refcount = 0
        self.run = -1
        self.step = 0
        self.start = 0
        self.num_steps: int | None = None
        self.call_in_step = 0
        self.info: StepInfo | None = None  # the running call's, published during the denoiser's forward
        self.external = False  # steps come from begin_external_run / set_step, not from calls or a scheduler
        self.source = "calls"  # where the current run's steps come from (reported in stats)
        self._pending: StepInfo | None = None  # announced, not yet picked up by a call
        self._run_open = False
        self._run_has_calls = False
        self._owner: int | None = None  # thread running the open run
        self._branches: set[str] = set()
        self._pipeline: Any = None  # weak reference to the pipeline given to attach()
        self._schedulers: list[Any] = []  # wrapped schedulers
        self._originals: list[tuple[Any, str, Callable, Any]] = []  # (scheduler, name, wrapper, previous attribute)
        self._shape_key: tuple | None = None
        self._last_timestep: float | None = None
        self._run_listeners: list[Callable[[], None]] = []
        self._call_listeners: list[Callable[[StepInfo], None]] = []
        self._timestep_position = timestep_position(module)
        self._hook = _StepHook(self)
        HookRegistry.check_if_exists_or_initialize(module).register_hook(self._hook, _STEP_HOOK)

    # ------------------------------------------------------------------ sharing
    @classmethod
    def attach(cls, module: torch.nn.Module, source: Any = None, *, scheduler: Any = None) -> StepTracker:
        """Return the tracker of ``module``, creating it on first use.

        ``source`` is the pipeline (its current scheduler is followed) or a scheduler (also accepted as
        ``scheduler=``); ``None`` for a bare module.
        """
        tracker = getattr(module, _TRACKER_ATTR, None)
        if tracker is None:
            tracker = cls(module)
            setattr(module, _TRACKER_ATTR, tracker)
        tracker.refcount += 1
        source = scheduler if source is None else source
        if source is not None and hasattr(source, "scheduler") and not hasattr(source, "set_timesteps"):
            if tracker._pipeline is None:
                tracker._pipeline = weakref.ref(source)
            source = source.scheduler
        if source is not None and not tracker._schedulers:
            tracker._bind(source)
        return tracker

    def detach(self) -> None:
        """Drop one reference; the last one removes the hook and restores the schedulers."""
        self.refcount -= 1
        if self.refcount > 0:
            return
        HookRegistry.check_if_exists_or_initialize(self.module).remove_hook(_STEP_HOOK, recurse=False)
        self._unbind_all()
        if getattr(self.module, _TRACKER_ATTR, None) is self:
            delattr(self.module, _TRACKER_ATTR)

    def on_new_run(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Register ``callback`` to run when a new run starts (to drop per-run state); returns a remover."""
        self._run_listeners.append(callback)
        return lambda: self._run_listeners.remove(callback)

    def on_call(self, callback: Callable[[StepInfo], None]) -> Callable[[], None]:
        """Register ``callback(info)``, called (eagerly, before the denoiser runs) for every announced call."""
        self._call_listeners.append(callback)
        return lambda: self._call_listeners.remove(callback)

    @property
    def uses_scheduler(self) -> bool:
        return bool(self._schedulers)

    # ------------------------------------------------------------------ scheduler source
    def _bind(self, scheduler: Any) -> None:
        if any(s is scheduler for s in self._schedulers):
            return
        self._schedulers.append(scheduler)
        for name, after in (
            ("set_timesteps", self._after_set_timesteps),
            ("step", self._after_step),
            ("set_begin_index", self._after_set_begin_index),
        ):
            original = getattr(scheduler, name, None)
            if original is None:
                continue
            # Instance attribute, not a class patch: other schedulers of the same class are untouched.
            wrapper = _chain(original, functools.partial(after, scheduler))
            self._originals.append((scheduler, name, wrapper, vars(scheduler).get(name)))
            setattr(scheduler, name, wrapper)

    def _unbind_all(self) -> None:
        """Undo the wrappers; one that something else has wrapped since is made a pass-through instead, so the
        later layer keeps working and nothing above it is dropped."""
        for scheduler, name, wrapper, previous in reversed(self._originals):
            if vars(scheduler).get(name) is wrapper:
                if previous is None:
                    delattr(scheduler, name)
                else:
                    setattr(scheduler, name, previous)
            else:
                wrapper.after = None
        self._originals.clear()
        self._schedulers.clear()

    def _after_set_timesteps(self, scheduler: Any, *args: Any, **kwargs: Any) -> None:
        if self.external:
            return
        self._claim()
        self._end_run()
        self.num_steps = _num_steps(scheduler)
        self.source = f"scheduler ({type(scheduler).__name__})"
        self._start_run(step=0)
        self._announce(None)

    def _after_set_begin_index(self, scheduler: Any, begin_index: int = 0, *args: Any, **kwargs: Any) -> None:
        if self._run_open and not self._run_has_calls and not self.external:
            self._withdraw()
            self.step = self.start = int(begin_index)
            self._announce(None)

    def _after_step(self, scheduler: Any, *args: Any, **kwargs: Any) -> None:
        if not self._run_open or self.external:
            return
        self._withdraw()
        self.step += 1
        self.call_in_step = 0
        self._branches.clear()
        if self.num_steps is None or self.step < self.num_steps:
            self._announce(None)

    # ------------------------------------------------------------------ external source
    def begin_external_run(self, num_steps: int | None) -> None:
        """Start a run whose calls the caller declares with :meth:`set_step` (see the module docstring).

        Run listeners fire as for any new run, so per-run state (feature stores) is dropped.
        """
        self._end_run()
        self.external = True
        self.num_steps = num_steps
        self.source = "external"
        self._start_run(step=0)

    def set_step(self, step: int, branch: str, call_in_step: int = 0) -> StepInfo:
        """Declare (announce) the step and CFG branch of the denoiser call about to run in the external run."""
        if not self.external:
            raise DifcacheError("StepTracker.set_step() needs an external run: call begin_external_run(num_steps).")
        self._withdraw()
        self.step, self.call_in_step = step, call_in_step
        self._branches = {branch}
        info = StepInfo(self.run, step, self.num_steps, branch, call_in_step, self.start)
        self._publish(info)
        self.info = info  # published until the denoiser's forward returns (or the next set_step)
        return info

    def end_external_run(self) -> None:
        """End the external run; calls are tracked from calls and the scheduler again."""
        self.external = False
        self._end_run()

    # ------------------------------------------------------------------ runs
    def _start_run(self, step: int) -> None:
        self.run += 1
        self.step = self.start = step
        self.call_in_step = 0
        self.info = None
        self._pending = None
        self._branches.clear()
        self._last_timestep = None
        self._run_open = True
        self._run_has_calls = False
        for callback in list(self._run_listeners):
            callback()

    def _end_run(self) -> None:
        self._run_open = False
        self._owner = None
        self.info = None
        self._pending = None
        self._last_timestep = None

    def _claim(self) -> None:
        """Refuse a second thread while a run of this denoiser is in progress in another one."""
        me = threading.get_ident()
        if self._owner is not None and self._owner != me and self._run_open and not self._finished():
            raise DifcacheError(
                f"{type(self.module).__name__} is cached by difcache and already running a pipeline call in another "
                "thread; the cache keeps one state per denoiser, so concurrent calls would mix their features. Run "
                "the pipelines one after the other, or give each thread its own denoiser (copy the model before "
                "difcache.apply_cache and cache each copy)."
            )
        self._owner = me

    def _finished(self) -> bool:
        return self.num_steps is not None and self.step >= self.num_steps

    # ------------------------------------------------------------------ announcements
    def _on_context(self, context: Any) -> None:
        """A ``cache_context`` was entered: the next denoiser call is of this branch (announce it now)."""
        if self.external:
            return
        if self._pipeline is not None and self._rebind_if_swapped():
            return
        if self._run_open and self.uses_scheduler:
            self._claim()
            self._withdraw()
            self._announce(context.name)

    def _announce(self, name: str | None) -> None:
        branch = f"call{self.call_in_step}" if name is None or name in self._branches else name
        self._branches.add(branch)
        info = StepInfo(self.run, self.step, self.num_steps, branch, self.call_in_step, self.start)
        self.call_in_step += 1
        self._publish(info)

    def _publish(self, info: StepInfo) -> None:
        self._pending = info
        for callback in list(self._call_listeners):
            callback(info)

    def _withdraw(self) -> None:
        """Take back an announcement no call picked up (the default one made at ``step``, when a
        ``cache_context`` then announces the same call with its name)."""
        info, self._pending = self._pending, None
        if info is not None and not self.external:
            self._branches.discard(info.branch)
            self.call_in_step = info.call_in_step

    # ------------------------------------------------------------------ per call (traced under torch.compile)
    def _on_call(self, args: tuple, kwargs: dict) -> None:
        # A shape change inside a run (eager only: compiled graphs guard on shapes, and runs start at the
        # scheduler's set_timesteps; unannounced calls check it in _unannounced_call).
        if not torch.compiler.is_compiling():
            self._check_shape(args, kwargs)
        info = self._pending
        if info is None:
            info = self._unannounced_call(args, kwargs)
        self._pending = None
        self._run_has_calls = True
        self.info = info

    def _check_shape(self, args: tuple, kwargs: dict) -> None:
        """Resolution or batch changed: inside a run, the features of the old shape are useless (new run)."""
        key = shape_key(args, kwargs)
        if key == self._shape_key:
            return
        changed_mid_run = self._shape_key is not None and self._run_open and self._run_has_calls
        self._shape_key = key
        if not changed_mid_run or self.external:
            return
        if self._pending is None:  # counting calls: the call starts a new run at step 0
            self._end_run()
            return
        pending = self._pending  # a scheduler's run: continue at its step, with fresh state
        self._start_run(step=self.step)
        self.call_in_step = pending.call_in_step
        self._announce(pending.branch)

    @torch.compiler.disable
    def _unannounced_call(self, args: tuple, kwargs: dict) -> StepInfo | None:
        """A call no scheduler, ``cache_context`` or external source announced (sources 3 and 4); eager."""
        if self.external:
            return None
        self._claim()
        self._check_shape(args, kwargs)
        if self._pipeline is not None and self._rebind_if_swapped():
            return self._pending
        if self._run_open and self.uses_scheduler and self.source.startswith("scheduler") and not self._finished():
            self._announce(None)  # another call in the current step (sequential CFG without cache_context)
            return self._pending
        pipeline = self._calling_pipeline()
        if pipeline is not None:
            self._follow(pipeline.scheduler, "scheduler of the calling pipeline")
            return self._pending
        self._advance_from_calls(args, kwargs)
        return self._pending

    def _rebind_if_swapped(self) -> bool:
        """Follow ``pipe.scheduler = ...``: wrap the new scheduler and pick up its run (True if it was swapped)."""
        pipeline = self._pipeline()
        scheduler = getattr(pipeline, "scheduler", None) if pipeline is not None else None
        if scheduler is None or any(s is scheduler for s in self._schedulers):
            return False
        self._unbind_all()
        self._follow(scheduler, "scheduler")
        return True

    def _follow(self, scheduler: Any, what: str) -> None:
        """Bind ``scheduler`` mid-run and continue from where it is (``len(timesteps)``, ``step_index``)."""
        self._bind(scheduler)
        self._end_run()
        self.num_steps = _num_steps(scheduler)
        self.source = f"{what} ({type(scheduler).__name__})"
        index = getattr(scheduler, "step_index", None)
        if index is None:
            index = getattr(scheduler, "begin_index", None) or 0
        self._start_run(step=int(index))
        self._owner = threading.get_ident()
        self._announce(self._hook.context.name)

    def _calling_pipeline(self) -> Any:
        """The diffusers pipeline on the call stack whose denoiser is this module, if any (source 3)."""
        from diffusers import DiffusionPipeline

        frame = sys._getframe(2)
        for _ in range(_STACK_DEPTH):
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, DiffusionPipeline) and getattr(owner, "scheduler", None) is not None:
                for name in ("transformer", "unet", "transformer_2"):
                    denoiser = getattr(owner, name, None)
                    if denoiser is self.module or getattr(denoiser, "_orig_mod", None) is self.module:
                        return owner
            frame = frame.f_back
        return None

    def _advance_from_calls(self, args: tuple, kwargs: dict) -> None:
        """Source 4: each call is a step unless ``cache_context`` names a branch not yet seen in this step."""
        timestep = self._timestep_value(args, kwargs)
        name = self._hook.context.name
        context = self._hook.context._context
        new_run = not self._run_open or (
            name is None
            and timestep is not None
            and self._last_timestep is not None
            and timestep >= self._last_timestep
        )
        if new_run:
            self.num_steps = getattr(context, "num_inference_steps", None)
            self.source = "calls"
            self._start_run(step=0)
        elif name is None or name in self._branches:
            self.step += 1
            self.call_in_step = 0
            self._branches.clear()
        if timestep is not None:
            self._last_timestep = timestep
        self._announce(name)

    def _timestep_value(self, args: tuple, kwargs: dict) -> float | None:
        value = kwargs.get("timestep")
        if value is None and self._timestep_position is not None and len(args) > self._timestep_position:
            value = args[self._timestep_position]
        if value is None:
            return None
        if isinstance(value, torch.Tensor):
            return float(value.detach().reshape(-1)[0]) if value.numel() else None
        return float(value)


def _num_steps(scheduler: Any) -> int | None:
    timesteps = getattr(scheduler, "timesteps", None)
    return None if timesteps is None else len(timesteps)


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


def shape_key(args: tuple, kwargs: dict) -> tuple:
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
