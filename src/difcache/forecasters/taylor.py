"""Taylor-series forecast from finite differences (TaylorSeer, Liu et al., ICCV 2025, arXiv 2503.06923).

At each computed step ``a`` with distance ``d = a - a_prev`` (in step-index units), the official recursion is

    factor_0 = F(a),    factor_{k+1} = (factor_k(new) - factor_k(old)) / d,   k < order,

and a later step ``s`` is forecast as ``sum_k factor_k * (s - a)**k / k!``. Faithful details kept from the
official code (``taylor_utils.derivative_approximation``):

* every order is divided by the *latest* distance, even when the earlier spacing differed (after warm-up);
* a higher factor is only formed when the previous state has the factor below it, so the order builds up
  one computed step at a time, and differences start at step ``warmup - 1`` (``step > first_enhance - 2``).

Non-finite values: a state whose highest factor is not finite (checked once per computed step, by one
reduction, a host synchronisation on GPUs that happens only on computed steps) predicts
``None`` and the engine recomputes the unit; forecasts cast to fp16 are checked too (fp32/bf16 cannot
overflow from finite factors at these step distances).

Deviation: factors are kept in fp32 (diffusers' hook defaults to bf16, where differences of nearly equal
activations are mostly rounding noise). The forecast is cast back to the unit's output dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from difcache.forecasters.base import Feature


@dataclass
class TaylorState:
    """Factors in folded form: ``factor_k = scales[k] * terms[k]`` (see :meth:`TaylorForecaster.update`)."""

    step: int
    terms: list[Feature]  # terms[k][leaf]
    scales: list[float]
    dtypes: list[torch.dtype | None]
    finite: bool = True

    @property
    def factors(self) -> list[Feature]:
        """The Taylor factors themselves (materialised; for inspection and tests, not the hot path)."""
        return [[None if t is None else t * s for t in term] for term, s in zip(self.terms, self.scales, strict=True)]


def _difference(new: torch.Tensor | None, old: torch.Tensor | None, ratio: float, out: torch.Tensor | None):
    """``new - ratio * old``, written into ``out`` when given (it may be ``old`` itself: elementwise, in place)."""
    if new is None:
        return None
    return new.sub(old, alpha=ratio) if out is None else torch.sub(new, old, alpha=ratio, out=out)


@dataclass(frozen=True)
class TaylorForecaster:
    order: int
    warmup: int = 0

    def update(self, state: TaylorState | None, step: int, value: Feature) -> TaylorState:
        """Store ``value`` (computed at ``step``) and the finite differences it completes.

        Speed: each factor is kept as an unscaled term and a Python scale, so a difference costs one
        elementwise pass instead of two (subtract, then divide):

            factor_{k+1} = (s_k' D_k' - s_k D_k) / d = (s_k' / d) * (D_k' - (s_k / s_k') D_k).

        The values are the official recursion's up to float rounding (tested against it). ``state`` is
        consumed: the new differences are written into its difference buffers (``D_k'`` overwrites ``D_k``,
        the only place it is still read; ``D_1'`` takes the buffer of the highest term, which no new
        difference reads), so a run at full order allocates nothing here (on CPU, fresh feature-sized tensors
        every unit and step are fresh pages to fault in).
        """
        terms: list[Feature] = [[None if t is None else t.detach().float() for t in value]]
        scales = [1.0]
        if state is not None and step > self.warmup - 2:
            distance = step - state.step
            spare = state.terms[self.order] if len(state.terms) > self.order >= 1 else None
            for k in range(self.order):
                if k >= len(state.terms) or distance <= 0:
                    break
                ratio = state.scales[k] / scales[k]
                # terms[0] of the old state is a module output (not ours to overwrite); the others are ours.
                buffers = state.terms[k] if k > 0 else (spare or [None] * len(value))
                terms.append(
                    [_difference(n, o, ratio, b) for n, o, b in zip(terms[k], state.terms[k], buffers, strict=True)]
                )
                scales.append(scales[k] / distance)
        dtypes = [None if t is None else t.dtype for t in value]
        # One reduction instead of an elementwise pass: a sum is non-finite iff an entry is (or it overflows,
        # which errs on the safe side: the unit is recomputed).
        finite = all(math.isfinite(t.sum().item()) for t in terms[-1] if t is not None)
        return TaylorState(step, terms, scales, dtypes, finite)

    def predict(self, state: TaylorState, step: int) -> Feature | None:
        if not state.finite:
            return None
        h = step - state.step
        coefficients = [s * h**k / math.factorial(k) for k, s in enumerate(state.scales)]  # coefficients[0] = 1
        out: Feature = []
        for leaf, dtype in enumerate(state.dtypes):
            if dtype is None:
                out.append(None)
                continue
            acc = state.terms[0][leaf]
            if len(state.terms) > 1:  # one fresh tensor, then accumulate in place: no temporaries per order
                acc = torch.add(acc, state.terms[1][leaf], alpha=coefficients[1])
                for k in range(2, len(state.terms)):
                    acc.add_(state.terms[k][leaf], alpha=coefficients[k])
            acc = acc.to(dtype)
            if dtype == torch.float16 and not bool(torch.isfinite(acc).all()):
                return None
            out.append(acc)
        return out

    def tensors(self, state: TaylorState) -> list[torch.Tensor]:
        return [t for term in state.terms for t in term if t is not None]
