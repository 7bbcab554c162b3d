"""ERTACache (Peng et al., "ERTACache: Error Rectification and Timesteps Adjustment for Efficient Diffusion",
arXiv 2508.21091, ICLR 2026; code announced at github.com/bytedance/ERTACache, which we could not read).

Scope: the residual of the whole block stack, ``r = h_after_blocks − h_before_blocks`` per stream, as in TeaCache
(:class:`~difcache.engine.scopes.block_range.BlockRangeScope` over all blocks). The sampler is Euler on a flow-matching
ODE, ``x_{i+1} = x_i + Δσ_i·v_i``; a reused step feeds a velocity built from a stale residual, and the paper splits
the damage into a *feature-shift* error (the stale residual) and a *step-amplification* error (the step size
that multiplies it). Three parts answer them:

(a) **Offline reuse set** (:func:`select_reuse_steps`). Uncached calibration runs record the true residual
    ``r_i`` of every step. Walking the steps in order with ``c`` the last computed step, step ``i`` is reused iff
    ``‖r_c − r_i‖₁ / ‖r_i‖₁ < λ`` (``threshold``); otherwise it is computed and becomes ``c``. The first
    ``warmup`` and last ``cooldown`` steps are always computed. The result is one fixed set ``S`` for every
    prompt: at run time the schedule is a table (:class:`~difcache.policies.table.TableSchedule`), no
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
* **Why timestep adjustment is opt-in** (deviation: the paper applies it). Our reconstruction of φ could not
  be checked against the official code, and every measurement we have says it hurts: on random-weight FLUX
  models (final latents 4-9x farther from uncached than plain reuse of the same set), and on the trained
  bundled DiT (``BENCHMARKS.md``: same calibrated reuse set, 50 steps,
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
* **Threshold: one default, ours, from calibration on the bundled models.** The paper's values (Wan2.1-1.3B
  0.08, FLUX at 30 steps 0.6, CogVideoX 0.3) were tuned for the authors' error measure, which we could not check
  against ours (per-step relative L1 of the block-stack residual to the last computed step's). Measured with
  ours (``scripts/ertacache_thresholds.py``, ``BENCHMARKS.md``: calibrated on 4 calibration calls, judged on
  held-out seeds, 50 steps), λ = 0.6 reuses 44-45 of 50 steps on both bundled models (7.9-9.7× ideal, 17-22 dB),
  far past the paper's reported operating point (about 2× at preserved quality); λ = 0.1 gives 2.15× (40.4 dB)
  on the Wan video model and 2.26× (37.6 dB) on the DiT, and 0.08 gives 1.84-1.92×. So the default is
  ``threshold=0.1`` for every family; no per-family preset is kept, because none was measured here on FLUX or
  CogVideoX weights. Calibrate and read ``profile.data["reuse_steps"]``; an empty reuse set warns. The threshold
  only acts in ``calibrate()``; applying a profile uses its reuse set, coefficients and φ.

Usage::

    profile = difcache.calibrate(pipe, "ertacache", [dict(prompt=p) for p in prompts], num_inference_steps=30)
    profile.save("flux-30.json")
    handle = difcache.apply_cache(pipe, "ertacache", profile="flux-30.json")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from difcache.adapters.layout import Layout
from difcache.config import CacheConfig, check_bool, check_choice, check_float, check_int, check_profile
from difcache.core import Action, Plan
from difcache.engine.scopes.block_range import BlockRangeScope
from difcache.errors import DifcacheError
from difcache.forecasters.rectified import RectifiedForecaster, from_paper
from difcache.forecasters.reuse import ReuseForecaster
from difcache.methods.ertacache_timesteps import TimestepAdjustment
from difcache.methods.registry import register_method
from difcache.policies.table import TableSchedule
from difcache.profile import Profile

MERGES = ("mean", "max")

@dataclass(frozen=True)
class ERTACacheConfig(CacheConfig):
    """Args:
    threshold: λ, the largest relative L1 error of a reused residual (> 0); used by ``calibrate()`` only. Default
        0.1 for every family (ours, measured on the bundled models: see "Threshold" above).
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
            check_bool(self, name)
        check_choice(self, "merge", MERGES)
        check_int(self, "warmup", 1, 1000)
        check_int(self, "cooldown", 1, 1000)
        check_int(self, "max_entries", 1)
        check_profile(self)


def _scope(layout: Layout) -> BlockRangeScope:
    if layout.is_unet:
        raise DifcacheError("ERTACache caches a transformer block stack; for UNets use method='deepcache'.")
    return BlockRangeScope(layout, [(0, len(layout.blocks) - 1)])


def _read_profile(config: ERTACacheConfig, layout: Layout) -> tuple[Profile, tuple[bool, ...], list, list[float]]:
    """The reuse set, per-step ``(a, b)`` per leaf and φ from a profile, with errors that name the bad field."""
    usage = ("profile = difcache.calibrate(pipe, 'ertacache', call_kwargs=[...], num_inference_steps=N), then "
             "difcache.apply_cache(pipe, 'ertacache', profile=profile).")  # fmt: skip
    profile = Profile.for_model(config.profile, "ertacache", layout, usage)
    steps = profile.num_steps
    reuse_steps = set(profile.ints("reuse_steps", 1, steps - 2))  # first and last steps are always computed
    reuse = tuple(s in reuse_steps for s in range(steps))
    phi_name = "phi" if config.rectify else "phi_reuse"
    phi = profile.numbers(phi_name, length=steps, lo=0.0, hi=1.0)
    ks, bs = profile.value("K"), profile.value("B")
    if not isinstance(ks, list) or not isinstance(bs, list) or len(ks) != steps or len(bs) != steps:
        raise profile.bad("K", f"and `data.B` must be lists of {steps} entries (one per step)")
    coefficients: list = []
    for step, (k, b) in enumerate(zip(ks, bs, strict=True)):
        if k is None and b is None:
            coefficients.append(None)
            continue
        if not isinstance(k, list) or not isinstance(b, list) or len(k) != len(b):
            raise profile.bad("K", f"and `data.B` at step {step} must be lists of equal length (one per stream)")
        pairs = zip(profile._numbers(f"K[{step}]", k, None, None, None, True),
                    profile._numbers(f"B[{step}]", b, None, None, None, True), strict=True)  # fmt: skip
        coefficients.append([None if p is None or q is None else from_paper(p, q) for p, q in pairs])
    return profile, reuse, coefficients, phi  # type: ignore[return-value]


@register_method(ERTACacheConfig, "ERTACache: calibrated reuse set, rectified stack residual, adjusted Euler steps")
def build(config: ERTACacheConfig, layout: Layout) -> Plan:
    scope = _scope(layout)
    profile, reuse, coefficients, phi = _read_profile(config, layout)
    forecaster = RectifiedForecaster.from_lists(coefficients) if config.rectify else ReuseForecaster()
    extras = (
        (TimestepAdjustment(reuse, tuple(phi), config.adjust_model_time).install,) if config.adjust_timesteps else ()
    )
    policy = TableSchedule.from_skips(reuse, Action.REUSE, ("ERTACache reuse set", profile.remedy))
    return Plan(scope, policy, forecaster, extras)
