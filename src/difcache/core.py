"""difcache's shared vocabulary: what a policy decides, where a call sits in the sampling loop, and the three
pieces every caching method is made of, gathered in a :class:`Plan`.

* **Scope**: *what unit* is cached; installs the hooks that implement it.
* **Policy**: *when* a unit is recomputed; static (a pure function of step and unit, turned into a table when a
  run starts) or dynamic (reads a live signal once per step).
* **Forecaster**: *what to return* instead; a rule for the weights of a linear combination of the unit's last
  computed outputs (:class:`Combination`). Reuse, Taylor expansions and weights fitted on calibration runs
  differ only in the weights, so the feature store and the hooks need no per-forecaster code.

Hooks talk to the engine through one small object per unit, the :class:`Slot`: the engine fills it *before*
each denoiser call (outside any compiled graph) with whether the unit is skipped and, if so, the stored outputs
and weights to combine; otherwise the hook runs the unit and hands its output in (``slot.keep``). Nothing in a
hook reads a step index, a counter or a tensor value, which is what lets ``torch.compile`` trace a cached model
without graph breaks and with one graph per *kind* of step (skipped or computed, per unit).

This module depends on nothing else in difcache; everything else may depend on it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

Feature = list[torch.Tensor | None]  # a unit's output as its tensor leaves (None where a leaf is not a tensor)


class Action(enum.IntEnum):
    """COMPUTE runs the unit; REUSE returns its last computed output; FORECAST extrapolates from its history."""

    COMPUTE = 0
    REUSE = 1
    FORECAST = 2


@dataclass(frozen=True)
class StepInfo:
    """Where one denoiser call sits in the sampling loop.

    Attributes:
        run: index of the pipeline call (increments each time a new run starts).
        step: 0-based denoising step within the run.
        num_steps: steps in the run, or ``None`` when no source tells it.
        branch: CFG branch key ("cond", "uncond", or "call<k>" by position in the step).
        call_in_step: 0 for the first denoiser call of a step, 1 for the second (sequential CFG), ...
        start: the run's first step (``> 0`` for img2img runs that begin part-way through the schedule).
    """

    run: int
    step: int
    num_steps: int | None
    branch: str
    call_in_step: int
    start: int = 0

    @property
    def is_first_call_of_step(self) -> bool:
        return self.call_in_step == 0


@dataclass(frozen=True)
class Combination:
    """A forecast as weights: ``out[leaf] = scale[leaf] * sum_j coefficients[j] * entry_j[leaf] + bias[leaf]``.

    Entries are a unit's stored outputs, newest first. ``scale`` and ``bias`` (per leaf, optional) express
    per-leaf affine corrections such as ERTACache's rectification. Reuse is ``coefficients=(1.0,)``.
    """

    coefficients: tuple[float, ...]
    scale: tuple[float, ...] | None = None
    bias: tuple[float, ...] | None = None

    @property
    def is_reuse(self) -> bool:
        return self.coefficients == (1.0,) and self.scale is None and self.bias is None

    def as_tensor(self, device: torch.device) -> torch.Tensor:
        """``[coefficients..., scale..., bias...]`` in fp32, for compiled graphs (values as data, not constants)."""
        return torch.tensor([*self.coefficients, *(self.scale or ()), *(self.bias or ())], dtype=torch.float32,
                            device=device)  # fmt: skip

    def peak_bound(self, peaks: Sequence[float]) -> float:
        """An upper bound of ``max |out|`` from the entries' ``max |entry|`` (for fp16 overflow checks)."""
        total = sum(abs(c) * p for c, p in zip(self.coefficients, peaks, strict=False))
        if self.scale is not None:
            total *= max(abs(s) for s in self.scale)
        if self.bias is not None:
            total += max(abs(b) for b in self.bias)
        return total


def combine(entries: Sequence[Feature], combination: Combination) -> Feature:
    """Apply ``combination`` to ``entries`` (newest first), leaf by leaf, accumulating in fp32 (fp64 for fp64).

    Reuse returns the stored tensors themselves; zero weights are skipped. Compiled graphs use
    :func:`combine_weights` instead, which reads the weights as data.
    """
    coefficients = combination.coefficients
    if combination.is_reuse:
        return list(entries[0])
    out: Feature = []
    for leaf, first in enumerate(entries[0]):
        if first is None:
            out.append(None)
            continue
        wide = torch.promote_types(first.dtype, torch.float32)
        acc: torch.Tensor | None = None
        for c, entry in zip(coefficients, entries, strict=False):
            if c == 0.0:
                continue
            term = entry[leaf]
            if acc is None:  # a fresh tensor of our own, then accumulated in place
                acc = torch.mul(term, c) if term.dtype == wide else term.to(wide).mul_(c)
            else:
                acc.add_(term, alpha=c)
        if acc is None:
            acc = torch.zeros_like(first, dtype=wide)
        if combination.scale is not None:
            acc.mul_(combination.scale[leaf])
        if combination.bias is not None:
            acc.add_(combination.bias[leaf])
        out.append(acc.to(first.dtype))
    return out


def combine_weights(entries: Sequence[Feature], weights: torch.Tensor, affine: tuple[bool, bool]) -> Feature:
    """:func:`combine` with the weights as a tensor (:meth:`Combination.as_tensor`) and ``affine`` = (has scale,
    has bias): what compiled graphs run, so a new step's weights are new data for the same graph rather than new
    constants for a new graph. Nothing here reads a Python float."""
    k, leaves = len(entries), len(entries[0])
    has_scale, has_bias = affine
    out: Feature = []
    for leaf, first in enumerate(entries[0]):
        if first is None:
            out.append(None)
            continue
        wide = torch.promote_types(first.dtype, torch.float32)
        acc = entries[0][leaf].to(wide) * weights[0]
        for j in range(1, k):
            acc = acc + entries[j][leaf].to(wide) * weights[j]
        if has_scale:
            acc = acc * weights[k + leaf]
        if has_bias:
            acc = acc + weights[k + (leaves if has_scale else 0) + leaf]
        out.append(acc.to(first.dtype))
    return out


class Slot:
    """The engine's interface to one unit's hooks for the current denoiser call (see the module docstring).

    Written by the engine before the call: ``skip`` (a plain bool, which ``torch.compile`` guards by value); on
    skipped calls ``entries`` (the stored outputs the forecast combines, newest first), ``combination`` and, for
    compiled graphs, the same as ``weights`` (a tensor) and ``affine`` (whether it has a per-leaf scale and bias).
    Written by the hook on computed calls (:meth:`keep`): ``fresh``, the unit's output, and ``peak``, a 0-dim
    tensor ``max |output|`` the engine reads later, once per step, to catch non-finite values. The engine stores
    only the outputs a later forecast will read, and says where in ``keep_as`` (``(branch, step)``, or ``None``):
    a hook hands an output in only when :meth:`wants` it, so a computed step nothing will forecast from costs no
    residual, copy or peak.
    """

    def __init__(self, unit: int, live: Live) -> None:
        self.unit = unit
        self.live = live
        self.skip = False
        self.keep_as: tuple[str, int] | None = None
        self.entries: tuple[Feature, ...] = ()
        self.combination = Combination((1.0,))
        self.weights: torch.Tensor | None = None
        self.affine = (False, False)
        self.fresh: Feature | None = None
        self.peak: torch.Tensor | None = None

    def forecast(self) -> Feature:
        """The unit's output on a skipped call."""
        if torch.compiler.is_compiling():
            return combine_weights(self.entries, self.weights, self.affine)  # type: ignore[arg-type]
        return combine(self.entries, self.combination)

    def wants(self) -> bool:
        """Whether a computed call's output will be read by a later forecast. Always under ``torch.compile``
        (``keep_as`` is then never read, so it adds no guard and no graph: a kept output is one more output of
        the same graph; the engine drops it afterwards if ``keep_as`` is ``None``)."""
        return torch.compiler.is_compiling() or self.keep_as is not None

    def keep(self, leaves: Feature) -> None:
        """Hand a computed call's output to the engine, with its peak for the non-finite check."""
        self.fresh = leaves
        self.peak = peak(leaves)


def peak(leaves: Feature) -> torch.Tensor | None:
    """``max |x|`` over the tensor leaves as a 0-dim fp32 tensor (non-finite iff some entry is), without a
    host read: the engine reads it later, once per step, outside any compiled graph."""
    peaks = []
    for t in leaves:
        if t is not None:
            low, high = torch.aminmax(t.detach())
            peaks.append(torch.maximum(high.float(), -low.float()))
    return torch.stack(peaks).amax() if peaks else None


class Live:
    """Shared by a cache's slots: ``active`` is True only while a tracked denoiser call runs; ``compiled`` once a
    call ran under ``torch.compile``."""

    def __init__(self) -> None:
        self.active = False
        self.compiled = False


class StaticPolicy(Protocol):
    """A schedule known before the run starts: a pure function of (step, number of steps, unit)."""

    dynamic: ClassVar[bool]

    def decide(self, step: int, num_steps: int | None, unit: int) -> Action: ...


class DynamicPolicy(Protocol):
    """A rule that reads a live signal once per step; it keeps per-run state created by ``new_state``."""

    dynamic: ClassVar[bool]

    def new_state(self) -> Any: ...

    def decide_live(self, state: Any, info: StepInfo, signal: Any) -> Action: ...


class Forecaster(Protocol):
    """How many computed outputs a unit keeps (``history``) and the weights to forecast from them.

    ``combination(step, entry_steps, unit)`` gets the steps of the stored entries, newest first, and returns
    the :class:`Combination` for ``step``, or ``None`` when it cannot forecast (the unit is then computed).
    """

    history: int

    def combination(self, step: int, entry_steps: tuple[int, ...], unit: int) -> Combination | None: ...


class UnitRuntime(Protocol):
    """What a scope's hooks use of the engine: one :class:`Slot` per unit, and the live decision of dynamic
    policies (one host decision per step, taken by the first hook of the unit)."""

    slots: tuple[Slot, ...]

    def decide_live(self, slot: Slot, signal: Callable[[], torch.Tensor | None]) -> None: ...


class Scope(Protocol):
    """What a method caches; installs the hooks that implement it and returns their removers."""

    units: tuple[Any, ...]

    def install(self, runtime: UnitRuntime) -> list[Callable[[], None]]: ...


# installer(runtime) -> remover: what a method changes outside the denoiser's modules (ERTACache wraps the
# scheduler). Called once after the scope's hooks are in place; removers run in reverse order on remove().
Extra = Callable[[Any], Callable[[], None]]


@dataclass(frozen=True)
class Plan:
    """A method applied to one layout; the engine executes it."""

    scope: Scope
    policy: StaticPolicy | DynamicPolicy
    forecaster: Forecaster
    extras: tuple[Extra, ...] = ()
    notes: tuple[tuple[str, str], ...] = ()  # what the method chose for this model, shown in stats (a preset...)
