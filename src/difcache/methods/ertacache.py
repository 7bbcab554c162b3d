"""ERTACache (Peng et al., "ERTACache: Error Rectification and Timesteps Adjustment for Efficient Diffusion",
arXiv 2508.21091, ICLR 2026; code announced at github.com/bytedance/ERTACache, which we could not read).

Scope: the residual of the whole block stack, ``r = h_after_blocks − h_before_blocks`` per stream, as in TeaCache
(:class:`~difcache.engine.range_scope.BlockRangeScope` over all blocks). The sampler is Euler on a flow-matching
ODE, ``x_{i+1} = x_i + Δσ_i·v_i``; a reused step feeds a velocity built from a stale residual, and the paper splits
the damage into a *feature-shift* error (the stale residual) and a *step-amplification* error (the step size
that multiplies it). Three parts answer them:

(a) **Offline reuse set** (:func:`select_reuse_steps`). Uncached calibration runs record the true residual
    ``r_i`` of every step. Walking the steps in order with ``c`` the last computed step, step ``i`` is reused iff
    ``‖r_c − r_i‖₁ / ‖r_i‖₁ < λ`` (``threshold``); otherwise it is computed and becomes ``c``. The first
    ``warmup`` and last ``cooldown`` steps are always computed. The result is one fixed set ``S`` for every
    prompt: at run time the schedule is a table (:class:`~difcache.policies.step_set.StepSetSchedule`), no
    tensor is read to decide. Across calibration samples (prompts × CFG branches) the per-sample errors of the
    same pair ``(c, i)`` are merged *before* the decision (``merge="mean"``: the average sample is within λ;
    ``"max"``: every sample is), so the walk is one walk and ``c`` is the same for all samples. Merging
    per-prompt sets after independent walks (intersection, majority) would not be self-consistent, because
    each walk's later decisions depend on its own computed steps. The error is measured on the image stream.
(b) **Trajectory-aware timestep adjustment** (:mod:`difcache.methods.ertacache_timesteps`).
On a reused step the Euler step is
    shrunk to ``φ_i·s·Δσ_i``, on a computed one it is ``s·Δσ_i``, where ``s = σ̂/σ_i`` rescales the default
    step by the remaining budget (σ̂: where the adjusted sampler actually is). This is the paper's
    ``Δt_c = (1 − Σ_{j≤i} Δt_j)/(1 − i/T)`` written for non-uniform (shifted) sigma schedules: the remaining
    steps share what is left, and the last (computed) step lands exactly on σ = 0. It wraps the scheduler's
    ``step`` as an instance attribute, restored on removal. The paper's factor is
    ``φ_i = clip(1 − ‖ṽ_i − v_i‖₁ / ‖v_i − v_{i−1}‖₁, 0, 1)``, which needs the true ``v_i``, so it is
    calibrated offline: per reused step, the mean over samples of that ratio.
(c) **Closed-form error rectification** (:mod:`difcache.forecasters.rectified`). The reuse error is modelled as
    ``ε_i = σ(K_i·r̃ + B_i)`` with σ linearised (``σ(z) ≈ z/4 + 1/2``), fitted in closed form per reused step,
    and subtracted: ``r̂_i = r̃ − ε̂_i``.

Choices and deviations (the official code was not retrievable; the equations come from the paper's text as
summarised by secondary sources):

* **Where the error is measured.** The paper writes ṽ, v for the cached and true outputs. We measure and
  rectify the *block-stack residual* (the cached unit), not the denoiser's output velocity: the engine's
  forecaster returns a residual that the scope adds to the current stack input, and the final norm and
  projection after the stack differ per family. ``ε = r̃ − r`` is the stack-output error that this last map
  (a modulated per-token normalisation, then a linear projection) turns into the velocity error; the
  regression *regressor* is ``r̃`` rather than ``x_i + r̃``. φ is
  likewise computed from residual norms, ``clip(1 − ‖r̂_i − r_i‖₁ / ‖r_i − r_{i−1}‖₁, 0, 1)``, with ``r̂_i``
  the feature the cache will return (rectified when ``rectify=True``, both variants stored in the profile).
  Note what this implies: without rectification a reused step directly after a computed one has
  ``r̃ = r_{i−1}``, so φ = 0 and the step contributes nothing; rectification is what makes φ > 0.
* **Coefficient granularity.** One scalar pair ``(K_i, B_i)`` per reused step and per stream (FLUX: image and
  text), pooled over all calibration samples; unknown in the paper.
* **What the denoiser is told.** The paper's text, as we have it, changes only Δt, so by default the pipeline's
  default timestep still reaches the denoiser although the latents sit at σ̂, not σ_i. ``adjust_model_time=True``
  (our option, off by default) adds a pre-forward hook that rescales the timestep argument by ``σ̂/σ_i``
  (exact for FlowMatchEuler, whose timesteps are ``σ·num_train_timesteps``), so the model is evaluated at the
  noise level its input has. On the random-weight test models neither variant was consistently closer to the
  uncached output.

Measured on random-weight tiny FLUX models (``tests/test_ertacache.py``; 20-30 steps, λ = 0.4, about 2/3 of the
steps reused): φ is near 0 on most reused steps (the scalar rectification removes little of the error there),
so the adjustment mostly hands the reused steps' share of the trajectory to the computed ones. The final
latents then end about 4-9x farther from the uncached ones than plain residual reuse with the same set
(relative L2 ≈ 0.02-0.05 against ≈ 0.005), and rectification alone changes the distance by only ±10%. Random
weights say little about trained models; these numbers are why no test claims that ERTACache beats plain reuse.
* **Why timestep adjustment is opt-in** (deviation: the paper applies it). Our reconstruction of φ could not
  be checked against the official code, and every measurement we have says it hurts: on the random-weight
  FLUX models above, and on the trained bundled DiT (``BENCHMARKS.md``: same calibrated reuse set, 50 steps,
  16.4 dB PSNR and FID 47 with the adjustment, 37.5 dB with reuse and rectification alone). So the default is
  reuse set + rectification; ``adjust_timesteps=True`` turns part (b) on, to experiment with or to verify
  once the official code is readable.
* **Step-size bookkeeping.** The adjusted step replaces the scheduler's Euler update by the same formula with
  the adjusted Δσ, in fp32 like diffusers, after calling the wrapped ``step`` (so step indices, the step
  tracker and any other wrapper still run). While no step has been changed (no reuse, or φ = 1), the
  scheduler's own result is returned untouched: bit-identical to the unwrapped scheduler.
* **Flow matching only** for the adjustment: the scheduler must be a ``FlowMatchEulerDiscreteScheduler``
  without ``stochastic_sampling``. Reuse and rectification are empirical and work with any scheduler
  (``adjust_timesteps=False``).
* **Thresholds.** Paper values: Wan2.1-1.3B 0.08, FLUX (30 steps) 0.6, CogVideoX 0.3 (Open-Sora 1.2: 0.1 / 0.18,
  not a diffusers family). They were tuned for the authors' error measure, which we could not check against
  ours. Elsewhere the default is 0.1 (ours: a conservative starting point; calibrate and look at
  ``profile.data["reuse_steps"]``). The threshold only acts in ``calibrate()``; applying a profile uses its
  reuse set, coefficients and φ.

Usage::

    profile = difcache.calibrate(pipe, "ertacache", [dict(prompt=p) for p in prompts], num_inference_steps=30)
    profile.save("flux-30.json")
    handle = difcache.apply_cache(pipe, "ertacache", profile="flux-30.json")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from difcache.adapters.layout import Layout
from difcache.calibration import CalibrationSession, subsample
from difcache.config import CacheConfig, check_choice, check_float, check_int
from difcache.engine.plan import Plan
from difcache.engine.range_scope import BlockRangeScope, _Streams
from difcache.errors import DifcacheError
from difcache.forecasters.rectified import RectifiedForecaster, fit_rectification, from_paper, to_paper
from difcache.forecasters.reuse import ReuseForecaster
from difcache.methods.ertacache_timesteps import TimestepAdjustment
from difcache.methods.registry import register_calibrator, register_method
from difcache.policies.step_set import StepSetSchedule
from difcache.profile import Profile

if TYPE_CHECKING:
    pass

MERGES = ("mean", "max")
# Paper thresholds (Wan2.1-1.3B, FLUX at 30 steps, CogVideoX); other families use the generic default (ours).
_PRESETS: dict[str, dict[str, Any]] = {
    "wan": {"threshold": 0.08},
    "flux": {"threshold": 0.6},
    "cogvideox": {"threshold": 0.3},
}

# one calibration sample (a prompt and CFG branch): residual[step][leaf] (leaf 0 image stream, 1 text stream)
Residuals = Sequence[Sequence[torch.Tensor | None]]


@dataclass(frozen=True)
class ERTACacheConfig(CacheConfig):
    """Args:
    threshold: λ, the largest relative L1 error of a reused residual (> 0); used by ``calibrate()`` only.
    rectify: subtract the calibrated linear error model from reused residuals.
    adjust_timesteps: shrink Euler steps on reused steps by φ and rescale the rest (flow-matching schedulers).
        Off by default, a deviation from the paper: see "Why timestep adjustment is opt-in" above.
    adjust_model_time: with adjusted steps, pass the denoiser the timestep of the adjusted trajectory (ours).
    merge: how calibration samples' errors are merged when selecting the reuse set: ``"mean"`` or ``"max"``.
    warmup: first steps always computed (>= 1). cooldown: last steps always computed (>= 1).
    max_entries: entries of each residual recorded during calibration (a seeded subsample when larger).
    profile: an ERTACache profile from ``difcache.calibrate`` (path or :class:`~difcache.profile.Profile`);
        required by ``apply_cache``.
    """

    method: ClassVar[str] = "ertacache"
    threshold: float = 0.1
    rectify: bool = True
    adjust_timesteps: bool = False
    adjust_model_time: bool = False
    merge: str = "mean"
    warmup: int = 1
    cooldown: int = 1
    max_entries: int = 65536
    profile: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_float(self, "threshold", 0.0, lo_open=True)
        for name in ("rectify", "adjust_timesteps", "adjust_model_time"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ERTACacheConfig.{name} must be True or False, got {getattr(self, name)!r}.")
        check_choice(self, "merge", MERGES)
        check_int(self, "warmup", 1, 1000)
        check_int(self, "cooldown", 1, 1000)
        check_int(self, "max_entries", 1)

    @classmethod
    def for_family(cls, family: str) -> ERTACacheConfig:
        return cls(**_PRESETS.get(family, {}))


# ---------------------------------------------------------------------------------------------- calibration math
def relative_l1(approx: torch.Tensor, true: torch.Tensor) -> float:
    """``‖approx − true‖₁ / ‖true‖₁`` in float64 (``inf`` when ``true`` is zero and ``approx`` is not)."""
    num = float((approx.double() - true.double()).abs().sum())
    den = float(true.double().abs().sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def select_reuse_steps(
    samples: Sequence[Residuals], threshold: float, merge: str = "mean", warmup: int = 1, cooldown: int = 1
) -> tuple[tuple[bool, ...], list[float | None]]:
    """ERTACache's offline reuse set: the greedy walk described in the module docstring (part a).

    Args:
        samples: per calibration sample, the true residual of every step (``samples[k][step][leaf]``); the
            error is measured on leaf 0.
    Returns:
        ``reuse[step]`` and the merged error of reusing the cached residual at each step that was tested
        (``None`` for the forced warm-up and cool-down steps).
    """
    if not samples:
        raise DifcacheError("ERTACache calibration recorded no residuals.")
    num_steps = len(samples[0])
    aggregate = max if merge == "max" else (lambda values: sum(values) / len(values))
    reuse = [False] * num_steps
    errors: list[float | None] = [None] * num_steps
    cached = 0
    for step in range(num_steps):
        if step < warmup or step >= num_steps - cooldown:
            cached = step
            continue
        error = aggregate([relative_l1(sample[cached][0], sample[step][0]) for sample in samples])
        errors[step] = error
        if error < threshold:
            reuse[step] = True
        else:
            cached = step
    return tuple(reuse), errors


def last_computed(reuse: Sequence[bool]) -> list[int]:
    """For each step, the step whose residual the cache holds then (itself when computed)."""
    source, cached = [], 0
    for step, reused in enumerate(reuse):
        if not reused:
            cached = step
        source.append(cached)
    return source


def fit_coefficients(
    samples: Sequence[Residuals], reuse: Sequence[bool]
) -> list[list[tuple[float, float] | None] | None]:
    """Per reused step and leaf, the closed-form ``(a, b)`` of ``r̃ − r ≈ a·r̃ + b`` pooled over samples (part c)."""
    source = last_computed(reuse)
    coefficients: list[list[tuple[float, float] | None] | None] = []
    for step, reused in enumerate(reuse):
        if not reused:
            coefficients.append(None)
            continue
        per_leaf: list[tuple[float, float] | None] = []
        for leaf in range(len(samples[0][step])):
            pairs = [(s[source[step]][leaf], s[step][leaf]) for s in samples]
            if any(c is None or t is None or c.shape != t.shape for c, t in pairs):
                per_leaf.append(None)
                continue
            cached = torch.cat([c.reshape(-1) for c, _ in pairs])
            true = torch.cat([t.reshape(-1) for _, t in pairs])
            per_leaf.append(fit_rectification(cached, true))
        coefficients.append(per_leaf)
    return coefficients


def step_factors(
    samples: Sequence[Residuals],
    reuse: Sequence[bool],
    coefficients: Sequence[Sequence[tuple[float, float] | None] | None],
) -> list[float]:
    """φ per step (part b): 1 on computed steps; on a reused step the mean over samples of
    ``clip(1 − ‖r̂_i − r_i‖₁ / ‖r_i − r_{i−1}‖₁, 0, 1)``, with ``r̂_i`` the feature the cache returns."""
    forecaster = RectifiedForecaster.from_lists(coefficients)
    source = last_computed(reuse)
    phi = []
    for step, reused in enumerate(reuse):
        if not reused or step == 0:
            phi.append(1.0)
            continue
        values = []
        for sample in samples:
            (returned,) = forecaster.predict([sample[source[step]][0]], step)[:1]
            true, previous = sample[step][0], sample[step - 1][0]
            num = float((returned.double() - true.double()).abs().sum())
            den = float((true.double() - previous.double()).abs().sum())
            ratio = (0.0 if num == 0.0 else math.inf) if den == 0.0 else num / den
            values.append(min(max(1.0 - ratio, 0.0), 1.0))
        phi.append(sum(values) / len(values))
    return phi


# ---------------------------------------------------------------------------------------------- build / calibrate
def _scope(layout: Layout) -> BlockRangeScope:
    if layout.is_unet:
        raise DifcacheError("ERTACache caches a transformer block stack; for UNets use method='deepcache'.")
    return BlockRangeScope(layout, [(0, len(layout.blocks) - 1)])


def _read_profile(config: ERTACacheConfig, layout: Layout) -> tuple[tuple[bool, ...], list, list[float]]:
    """The reuse set, per-step ``(a, b)`` per leaf and φ from a profile, with errors that name the bad field."""
    if config.profile is None:
        raise DifcacheError(
            "ERTACache needs a calibration profile: profile = difcache.calibrate(pipe, 'ertacache', "
            "call_kwargs=[...], num_inference_steps=N), then apply_cache(pipe, 'ertacache', profile=profile)."
        )
    profile = Profile.load(config.profile)
    profile.check("ertacache", type(layout.model).__name__, layout.fingerprint)
    data, steps = profile.data, profile.num_steps

    def bad(name: str, why: str) -> DifcacheError:
        return DifcacheError(f"ERTACache profile: field `data.{name}` {why}; recalibrate with difcache.calibrate.")

    for name in ("reuse_steps", "K", "B", "phi", "phi_reuse"):
        if not isinstance(data.get(name), list):
            raise bad(name, "is missing or not a list")
    reuse_steps = data["reuse_steps"]
    if not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s < steps - 1 for s in reuse_steps):
        raise bad("reuse_steps", f"must hold step indices in [1, {steps - 2}] (first and last steps are computed)")
    reuse = tuple(s in set(reuse_steps) for s in range(steps))
    for name in ("K", "B", "phi", "phi_reuse"):
        if len(data[name]) != steps:
            raise bad(name, f"has {len(data[name])} entries for a {steps}-step profile")
    phi = data["phi"] if config.rectify else data["phi_reuse"]
    if not all(_finite(p) and 0.0 <= p <= 1.0 for p in phi):
        raise bad("phi" if config.rectify else "phi_reuse", "must hold numbers in [0, 1]")
    coefficients: list = []
    for step, (ks, bs) in enumerate(zip(data["K"], data["B"], strict=True)):
        if ks is None and bs is None:
            coefficients.append(None)
            continue
        if not isinstance(ks, list) or not isinstance(bs, list) or len(ks) != len(bs):
            raise bad("K", f"and `data.B` at step {step} must be lists of equal length (one per stream) or null")
        leaves = []
        for k, b in zip(ks, bs, strict=True):
            if k is None or b is None:
                leaves.append(None)
            elif _finite(k) and _finite(b):
                leaves.append(from_paper(k, b))
            else:
                raise bad("K", f"and `data.B` at step {step} must be finite numbers or null")
        coefficients.append(leaves)
    return reuse, coefficients, [float(p) for p in phi]


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@register_method(ERTACacheConfig, "ERTACache: calibrated reuse set, rectified stack residual, adjusted Euler steps")
def build(config: ERTACacheConfig, layout: Layout) -> Plan:
    scope = _scope(layout)
    reuse, coefficients, phi = _read_profile(config, layout)
    forecaster = RectifiedForecaster.from_lists(coefficients) if config.rectify else ReuseForecaster()
    extras = (
        (TimestepAdjustment(reuse, tuple(phi), config.adjust_model_time).install,) if config.adjust_timesteps else ()
    )
    return Plan(scope, StepSetSchedule(reuse), forecaster, extras)


@register_calibrator(ERTACacheConfig)
def calibrate(config: ERTACacheConfig, layout: Layout, session: CalibrationSession, call_kwargs: list) -> dict:
    """Record the true stack residual of every step, then select the reuse set, fit (K, B) and φ."""
    scope = _scope(layout)
    head, tail = scope.units[0].modules[0], scope.units[0].modules[-1]
    head_streams, tail_streams = _Streams.of(head), _Streams.of(tail)
    inputs: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
    records: dict[tuple, dict[int, list[torch.Tensor | None]]] = {}

    def on_head(info: Any, args: tuple, kwargs: dict) -> None:
        bound = head_streams.bind(args, kwargs)
        encoder = bound.get(head_streams.encoder_arg) if head_streams.encoder_arg else None
        inputs[(session.call_index, info.branch)] = (bound[head_streams.hidden_arg], encoder)

    def on_tail(info: Any, args: tuple, kwargs: dict, output: Any) -> None:
        key = (session.call_index, info.branch)
        (in_hidden, in_encoder), (out_hidden, out_encoder) = inputs.pop(key), tail_streams.outputs(output)
        leaves = [subsample(out_hidden.float() - in_hidden.float(), config.max_entries), None]
        if out_encoder is not None and in_encoder is not None and out_encoder.shape == in_encoder.shape:
            leaves[1] = subsample(out_encoder.float() - in_encoder.float(), config.max_entries)
        records.setdefault(key, {})[info.step] = leaves

    session.probe_inputs(head, on_head)
    session.probe(tail, on_tail)
    session.run(call_kwargs, desc="ertacache calibration")
    num_steps = session.num_steps
    samples = []
    for key in sorted(records):
        missing = [s for s in range(num_steps) if s not in records[key]]
        if missing:
            raise DifcacheError(
                f"ERTACache calibration: call {key[0]} (branch {key[1]!r}) ran no denoiser at steps {missing[:5]}; "
                f"calibrate full {num_steps}-step runs (no img2img strength)."
            )
        samples.append([records[key][s] for s in range(num_steps)])
    if num_steps < 3:
        raise DifcacheError(
            f"ERTACache needs at least 3 steps to reuse any (first and last are computed); got {num_steps}."
        )
    reuse, errors = select_reuse_steps(samples, config.threshold, config.merge, config.warmup, config.cooldown)
    coefficients = fit_coefficients(samples, reuse)
    plain = [None if c is None else [None] * len(c) for c in coefficients]
    paper = [None if c is None else [None if p is None else to_paper(*p) for p in c] for c in coefficients]
    return {
        "threshold": config.threshold,
        "merge": config.merge,
        "reuse_steps": [s for s, r in enumerate(reuse) if r],
        "rel_l1": errors,
        "K": [None if c is None else [None if p is None else p[0] for p in c] for c in paper],
        "B": [None if c is None else [None if p is None else p[1] for p in c] for c in paper],
        "phi": step_factors(samples, reuse, coefficients),
        "phi_reuse": step_factors(samples, reuse, plain),
        "samples": len(samples),
        "entries": config.max_entries,
    }
