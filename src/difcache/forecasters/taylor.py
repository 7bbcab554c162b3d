"""Taylor-series forecast from finite differences (TaylorSeer, Liu et al., ICCV 2025, arXiv 2503.06923).

At each computed step ``a`` with distance ``d = a - a_prev`` (in step-index units), the official recursion is

    factor_0 = F(a),    factor_{k+1} = (factor_k(new) - factor_k(old)) / d,   k < order,

and a later step ``s`` is forecast as ``sum_k factor_k * (s - a)**k / k!``. Faithful details kept from the
official code (``taylor_utils.derivative_approximation``):

* every order is divided by the *latest* distance, even when the earlier spacing differed (after warm-up);
* a higher factor is only formed when the previous state has the factor below it, so the order builds up
  one computed step at a time, and differences start at step ``warmup - 1`` (``step > first_enhance - 2``).

Each factor is a linear combination of the last ``order + 1`` computed outputs, so the forecast is too: this
forecaster runs the recursion on those combinations' weights (:func:`taylor_weights`, pure Python, cached) and
the engine applies the weights to the stored outputs in fp32. The official code keeps the factors themselves
(in the model's dtype); the values agree up to float rounding (tested against the recursion on tensors), with
no difference pass on computed steps and the arithmetic in fp32 (deviation: diffusers' hook and the official
code difference in bf16, where differences of nearly equal activations are mostly rounding noise).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from difcache.core import Combination


@functools.lru_cache(maxsize=8192)
def taylor_weights(order: int, warmup: int, step: int, entry_steps: tuple[int, ...]) -> tuple[float, ...]:
    """Weights on the stored outputs (newest first, computed at ``entry_steps``) of the official TaylorSeer
    forecast of order ``order`` at ``step``; trailing zero weights are dropped."""
    n = len(entry_steps)

    @functools.cache
    def factors(i: int) -> list[list[float]]:
        # The state the official recursion holds after the computed step entry_steps[i], as weight vectors.
        unit = [0.0] * n
        unit[i] = 1.0
        vectors = [unit]
        if i + 1 < n and entry_steps[i] > warmup - 2:
            distance = entry_steps[i] - entry_steps[i + 1]
            previous = factors(i + 1)
            for k in range(order):
                if k >= len(previous) or distance <= 0:
                    break
                vectors.append([(a - b) / distance for a, b in zip(vectors[k], previous[k], strict=True)])
        return vectors

    h = step - entry_steps[0]
    weights = [0.0] * n
    for k, vector in enumerate(factors(0)):
        scale = h**k / math.factorial(k)
        for j, value in enumerate(vector):
            weights[j] += scale * value
    while len(weights) > 1 and weights[-1] == 0.0:
        weights.pop()
    return tuple(weights)


@dataclass(frozen=True)
class TaylorForecaster:
    order: int
    warmup: int = 0

    @property
    def history(self) -> int:
        return self.order + 1

    def combination(self, step: int, entry_steps: tuple[int, ...], unit: int) -> Combination:
        return Combination(taylor_weights(self.order, self.warmup, step, entry_steps))
