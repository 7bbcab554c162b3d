"""Accumulated-change policy (TeaCache, Liu et al., CVPR 2025, arXiv 2411.19108; ali-vilab/TeaCache).

At every step the policy receives a *signal* (the first block's timestep-modulated input, the timestep
embedding, or the first block's residual) and accumulates the rescaled relative L1 change

    δ_i = mean|I_i − I_{i−1}| / mean|I_{i−1}|,     A ← A + f(δ_i),   f = poly (highest degree first),

skipping the block stack while ``A < threshold``; a computed step resets ``A = 0``. The previous signal is
updated every step, skipped ones included. The first ``warmup`` and the last ``cooldown`` steps are always
computed (and reset ``A``), as in the official code; ``max_consecutive`` optionally bounds runs of skips.

This policy is **dynamic**: it reads a tensor every step (one host synchronisation per step on a GPU) and, under
``torch.distributed``, reduces the two sums of δ across ranks so every rank takes the same decision. Under
sequential CFG it decides once per step, on the step's first denoiser call, and the other branch follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from difcache.core import Action, StepInfo
from difcache.engine.distributed import global_sums


@dataclass
class ChangeState:
    accumulated: float = 0.0
    previous: torch.Tensor | None = None
    consecutive: int = 0


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """``mean|current − previous| / mean|previous|`` of the full tensor, summed across ranks if distributed."""
    sums = torch.stack([(current - previous).abs().sum(), previous.abs().sum()]).double()
    num, den = global_sums(sums).tolist()
    return num / den if den > 0 else float("inf")


def polyval(coefficients: tuple[float, ...], x: float) -> float:
    result = 0.0
    for c in coefficients:
        result = result * x + c
    return result


@dataclass(frozen=True)
class AccumulatedChangePolicy:
    threshold: float
    coefficients: tuple[float, ...]
    warmup: int = 1
    cooldown: int = 1
    max_consecutive: int | None = None
    skip_action: Action = Action.REUSE
    dynamic: ClassVar[bool] = True

    def new_state(self) -> ChangeState:
        return ChangeState()

    def decide_live(self, state: ChangeState, info: StepInfo, signal: torch.Tensor | None) -> Action:
        current = None if signal is None else signal.detach().float()
        previous, state.previous = state.previous, current
        forced = info.step < self.warmup or previous is None or current is None
        if info.num_steps is not None and info.step >= info.num_steps - self.cooldown:
            forced = True
        if not forced:
            state.accumulated += polyval(self.coefficients, relative_l1(current, previous))
            too_many = self.max_consecutive is not None and state.consecutive >= self.max_consecutive
            if state.accumulated < self.threshold and not too_many:
                state.consecutive += 1
                return self.skip_action
        state.accumulated = 0.0
        state.consecutive = 0
        return Action.COMPUTE
