"""DeepCache's "1:N" schedules (Ma et al., DeepCache, CVPR 2024, arXiv 2312.00858; horseee/DeepCache).

A *full* step runs the whole UNet and refreshes the cached deep feature; every other step is a *retrieve*
step that reuses it. Step indices here are relative to the first step of the run (img2img starts mid-way;
the official pipelines index their loop from 0 there too).

* **Uniform**: full when ``i % N == 0`` (the official extension's ``(cur - start) % cache_interval == 0``).
* **Non-uniform** (the paper's Stable Diffusion setting): ``K = ceil(T / N)`` full steps, spaced by a power
  law so that they are densest around step ``center``. This ports the official
  ``sample_from_quad_center`` exactly, numerics included: points are spaced linearly between
  ``(-center) ** (1/p)`` and ``(T - center) ** (1/p)`` and raised to the power ``p``. The first end point
  is a negative number to a fractional power, i.e. a *complex* number (Python's principal branch), so the
  points are complex; their real parts are truncated toward zero, made unique, the smallest and largest
  dropped, shifted by ``center``, and step 0 is prepended. If that does not give exactly ``K`` distinct
  steps, ``p`` is lowered by 0.02 and the placement retried while ``p > 1``. With the paper's T=50, N=5,
  p=1.4, center=15 the full steps are 0, 5, 9, 13, 17, 21, 26, 31, 37, 43.

Neither schedule forces the last step (as in the official code).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from difcache.core import Action
from difcache.errors import DifcacheError


@functools.lru_cache(256)
def non_uniform_full_steps(num_steps: int, interval: int, center: int, pow: float) -> tuple[int, ...]:
    """The full steps of the paper's non-uniform schedule for a run of ``num_steps`` (see the module docstring).

    Raises:
        DifcacheError: when no exponent above 1 places exactly ``ceil(num_steps / interval)`` distinct steps.
    """
    wanted = math.ceil(num_steps / interval)
    exponent = pow
    while exponent > 1:
        start = (-center) ** (1 / exponent)  # complex for center > 0: the official helper relies on it
        stop = (num_steps - center) ** (1 / exponent)
        points = np.linspace(start, stop, wanted + 1) ** exponent
        truncated = np.unique(np.real(points).astype(np.int32))
        steps = (0, *(int(v) + center for v in truncated[1:-1]))
        if len(steps) == wanted:
            return tuple(sorted(steps))
        exponent -= 0.02
    raise DifcacheError(
        f"DeepCache's non-uniform schedule cannot place {wanted} full steps in {num_steps} steps around "
        f"center={center} with pow<={pow}; lower `center`, raise `cache_interval`, or use uniform=True."
    )


@dataclass(frozen=True)
class DeepCacheSchedule:
    """Full step or reuse, for the one unit of DeepCache's scope (the deep path), by step index.

    Args:
        interval: N; 1 computes every step.
        uniform: the uniform schedule if True, else the paper's non-uniform one (needs the step count).
        pow: starting exponent of the non-uniform placement (> 1).
        center: step around which non-uniform full steps are densest.
    """

    interval: int
    uniform: bool = True
    pow: float = 1.4
    center: int = 15
    dynamic: ClassVar[bool] = False

    def full_steps(self, num_steps: int) -> tuple[int, ...]:
        """The full steps of a run of ``num_steps`` steps, ascending."""
        if self.interval == 1:
            return tuple(range(num_steps))
        if self.uniform:
            return tuple(range(0, num_steps, self.interval))
        return non_uniform_full_steps(num_steps, self.interval, self.center, self.pow)

    def decide(self, step: int, num_steps: int | None, unit: int) -> Action:
        if self.interval == 1 or (self.uniform and step % self.interval == 0):
            return Action.COMPUTE
        if self.uniform:
            return Action.REUSE
        if num_steps is None:
            raise DifcacheError(
                "DeepCache's non-uniform schedule needs the number of steps: apply it to the pipeline "
                "(difcache.apply_cache(pipe, ...)) rather than to the bare UNet, or use uniform=True."
            )
        full = non_uniform_full_steps(num_steps, self.interval, self.center, self.pow)
        return Action.COMPUTE if step in full else Action.REUSE

    def last_reuse(self, num_steps: int) -> int:
        """The last retrieve step of a run of ``num_steps`` steps (-1 if none): later features are never read."""
        full = set(self.full_steps(num_steps))
        return max((s for s in range(num_steps) if s not in full), default=-1)
