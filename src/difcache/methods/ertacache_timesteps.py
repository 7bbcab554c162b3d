"""ERTACache's trajectory-aware timestep adjustment (Peng et al., arXiv 2508.21091), kept with the method.

On a reused step the Euler step of a flow-matching scheduler is scaled by φ_i and the remaining budget is
rescaled so the run still ends at σ = 0. Installed as a wrapper of the scheduler's ``step`` (an instance
attribute, like the step tracker's), restored on removal; see :mod:`difcache.methods.ertacache`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.hooks import ModelHook

from difcache.engine.hooks import register
from difcache.engine.steps import timestep_position
from difcache.errors import DifcacheError

if TYPE_CHECKING:
    from difcache.engine.runtime import CacheRuntime

_TIME_HOOK = "difcache_ertacache_time"


class _Clock:
    """Where the adjusted sampler is (σ̂) against the scheduler's default sigmas, for one run."""

    def __init__(self) -> None:
        self.sigmas: list[float] = []
        self.sigma_hat = 0.0
        self.deviated = False
        self.have_state = False  # a computed step happened in this run, so a scheduled reuse really reuses

    def start(self, sigmas: list[float], index: int) -> None:
        self.sigmas, self.sigma_hat, self.deviated = sigmas, sigmas[index], False

    def ratio(self, index: int) -> float:
        """σ̂ / σ_index: 1.0 exactly while nothing was adjusted."""
        if not self.deviated or index >= len(self.sigmas) or self.sigmas[index] == 0.0:
            return 1.0
        return self.sigma_hat / self.sigmas[index]

    def advance(self, index: int, phi: float) -> float | None:
        """Take step ``index`` with factor φ; the adjusted Δσ, or ``None`` when it is the default step."""
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]
        if not self.deviated and phi == 1.0:
            self.sigma_hat = sigma_next
            return None
        if sigma_next == 0.0 and phi == 1.0:
            delta = -self.sigma_hat  # the last step spends exactly what is left
        else:
            delta = phi * (self.sigma_hat / sigma) * (sigma_next - sigma)
        self.sigma_hat += delta
        self.deviated = True
        return delta


def check_flow_scheduler(scheduler: Any) -> None:
    """Raise unless ``scheduler`` takes deterministic Euler steps on a flow-matching sigma schedule."""
    if scheduler is None:
        raise DifcacheError(
            "ERTACache's timestep adjustment wraps the pipeline's scheduler, but apply_cache got a bare denoiser; "
            "pass the pipeline, or adjust_timesteps=False."
        )
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise DifcacheError(
            f"ERTACache's timestep adjustment rescales Euler steps of a flow-matching sampler, and "
            f"{type(scheduler).__name__} is not a FlowMatchEulerDiscreteScheduler; set pipe.scheduler = "
            "FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config) or pass adjust_timesteps=False."
        )
    if getattr(scheduler.config, "stochastic_sampling", False):
        raise DifcacheError(
            "ERTACache's timestep adjustment needs deterministic Euler steps, but the scheduler has "
            "stochastic_sampling=True; disable it or pass adjust_timesteps=False."
        )


class _ModelTimeHook(ModelHook):
    """Rescales the denoiser's ``timestep`` argument by σ̂/σ_i once the trajectory was adjusted."""

    def __init__(self, scheduler: Any, clock: _Clock, position: int | None) -> None:
        super().__init__()
        self.scheduler, self.clock, self.position = scheduler, clock, position

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        if not self.clock.deviated or self.scheduler.step_index is None:
            return args, kwargs
        ratio = self.clock.ratio(self.scheduler.step_index)
        if ratio == 1.0:
            return args, kwargs
        if "timestep" in kwargs:
            kwargs["timestep"] = kwargs["timestep"] * ratio
        elif self.position is not None and len(args) > self.position:
            args = (*args[: self.position], args[self.position] * ratio, *args[self.position + 1 :])
        return args, kwargs


@dataclass(frozen=True)
class TimestepAdjustment:
    """A plan extra (see :class:`difcache.core.Plan`) that installs part (b) on ``runtime.scheduler``.

    Args:
        reuse: the reuse set, ``reuse[step]``.
        phi: φ per step (1 on computed steps).
        model_time: also rescale the denoiser's timestep argument (see the module docstring).
    """

    reuse: tuple[bool, ...]
    phi: tuple[float, ...]
    model_time: bool = False

    def install(self, runtime: CacheRuntime) -> Callable[[], None]:
        scheduler = runtime.scheduler
        check_flow_scheduler(scheduler)
        clock = _Clock()
        removers = [self._wrap_step(scheduler, runtime, clock)]
        removers.append(runtime.tracker.on_new_run(lambda: setattr(clock, "have_state", False)))
        if self.model_time:
            position = timestep_position(runtime.model)
            removers.append(register(runtime.model, _ModelTimeHook(scheduler, clock, position), _TIME_HOOK))

        def remove() -> None:
            for remover in reversed(removers):
                remover()

        return remove

    def _wrap_step(self, scheduler: Any, runtime: CacheRuntime, clock: _Clock) -> Callable[[], None]:
        inner = scheduler.step  # the class's method, or another wrapper (the step tracker's) to compose with
        had_own = "step" in vars(scheduler)
        active = [True]
        reuse, phi = self.reuse, self.phi

        @functools.wraps(inner)
        def step(*args: Any, **kwargs: Any) -> Any:
            if not active[0]:
                return inner(*args, **kwargs)
            model_output, timestep, sample = _step_arguments(args, kwargs)
            index = scheduler.step_index
            if index is None:  # first step of a run (set_timesteps resets the index)
                begin = scheduler.begin_index
                index = begin if begin is not None else scheduler.index_for_timestep(timestep)
                clock.start(scheduler.sigmas.tolist(), index)
            i = runtime.tracker.step
            reused = i < len(reuse) and reuse[i] and clock.have_state
            clock.have_state = True
            delta = clock.advance(index, phi[i] if reused else 1.0)
            result = inner(*args, **kwargs)
            if delta is None:
                return result
            if kwargs.get("per_token_timesteps") is not None:
                raise DifcacheError("ERTACache cannot adjust per-token timesteps; pass adjust_timesteps=False.")
            prev = (sample.float() + delta * model_output.float()).to(model_output.dtype)
            if isinstance(result, tuple):
                return (prev, *result[1:])
            result.prev_sample = prev
            return result

        scheduler.step = step  # instance attribute: other schedulers of the class are untouched

        def remove() -> None:
            # On top: put back exactly what was there. Below another wrapper (installed later, still active):
            # become a pass-through, so removal in any order leaves a working chain.
            active[0] = False
            if vars(scheduler).get("step") is step:
                if had_own:
                    scheduler.step = inner
                else:
                    del vars(scheduler)["step"]

        return remove


def _step_arguments(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any, torch.Tensor]:
    names = ("model_output", "timestep", "sample")
    values = [args[k] if k < len(args) else kwargs[name] for k, name in enumerate(names)]
    return values[0], values[1], values[2]
