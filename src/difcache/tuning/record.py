"""The online half of ``autotune``: one uncached pass over the calibration calls, recording what the search needs.

Per calibration sample (a call and, under sequential CFG, a branch) and step:

* every transformer block's residual (output − input, both streams), as a fixed seeded subsample of its entries
  (:func:`~difcache.engine.calibration.subsample`: the same positions in every block, so the residual of any
  contiguous range of blocks is the sum of its blocks' rows);
* every cacheable unit's output (pre-gate attention / FFN), subsampled the same way;
* for UNets, the deep feature below each skip branch (what DeepCache reuses);
* the scheduler's *gain*: how much an error in the model output at that step moves the next latent, measured on
  a copy of the scheduler with a small perturbation (any diffusers scheduler, multistep ones included);

and, once, the FLOPs of a denoiser call in total and per block, unit and deep path, and the uncached pipeline
outputs with the random states that made them (so candidates can be run again on the very same noise).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from difcache.adapters.layout import Layout
from difcache.engine.calibration import CalibrationSession, subsample
from difcache.engine.flops import measure_flops
from difcache.engine.scopes.block_range import Streams
from difcache.engine.scopes.skip_branch import deep_path
from difcache.errors import DifcacheError

# Recorded floats at most (blocks + units + branches) x samples x steps x entries: keeps a calibration in memory.
_BUDGET = 96 * 2**20
_MAX_ENTRIES = 8192


@dataclass
class Recording:
    """What one calibration pass recorded (see the module docstring). Feature tensors are ``[S, T, E]``."""

    num_steps: int
    scheduler: str
    blocks: list[torch.Tensor] = field(default_factory=list)  # each block's residual on the image stream
    # ... and on the text stream where the block returns one of its input's shape (``None`` elsewhere: SD3's last
    # block returns no text)
    blocks_text: list[torch.Tensor | None] = field(default_factory=list)
    units: list[torch.Tensor] = field(default_factory=list)
    deep: dict[int, torch.Tensor] = field(default_factory=dict)
    gains: np.ndarray = field(default_factory=lambda: np.ones(0))
    outputs: list[torch.Tensor] = field(default_factory=list)
    flops_call: float = 0.0
    flops_blocks: list[float] = field(default_factory=list)
    flops_units: list[float] = field(default_factory=list)
    flops_deep: dict[int, float] = field(default_factory=dict)


def pipeline_output(result: Any) -> torch.Tensor:
    """A pipeline's images or frames as one float tensor (numpy, tensors or PIL images, nested for videos)."""
    images = getattr(result, "images", None)
    if images is None:
        images = getattr(result, "frames", result)
    return _as_tensor(images)


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.asarray(value, dtype=np.float32))
    if isinstance(value, list | tuple):
        return torch.stack([_as_tensor(v) for v in value])
    if hasattr(value, "getdata"):  # a PIL image
        return torch.from_numpy(np.asarray(value, dtype=np.float32) / 255.0)
    raise DifcacheError(f"Cannot read a {type(value).__name__} output as images; pass output_type='np' or 'pt'.")


class Replay:
    """The calibration calls' keyword arguments with their random generators' starting states, so each call can
    be run again on the very same noise (a generator object in the kwargs advances with every call)."""

    def __init__(self, call_kwargs: Sequence[dict[str, Any]]) -> None:
        self.calls = [dict(kwargs) for kwargs in call_kwargs]
        self._states = [
            [(g, g.get_state()) for g in tree_flatten(kwargs)[0] if isinstance(g, torch.Generator)]
            for kwargs in self.calls
        ]

    def __len__(self) -> int:
        return len(self.calls)

    def __iter__(self):
        for kwargs, states in zip(self.calls, self._states, strict=True):
            for generator, state in states:
                generator.set_state(state)
            yield kwargs


def _entries(layout: Layout, samples: int, steps: int, rows: int) -> int:
    return max(256, min(_MAX_ENTRIES, _BUDGET // max(rows * samples * steps, 1)))


def record(
    pipe: Any, layout: Layout, replay: Replay, num_steps: int, units: bool = True, progress: bool = True
) -> Recording:
    """Run the uncached pipeline once per calibration call and record (see the module docstring)."""
    model = layout.model
    samples_per_call = 2  # an upper bound on CFG branches, only for the memory budget
    branches = list(range(len(layout.branches))) if layout.is_unet else []
    text_rows = 0 if layout.is_unet else sum(bool(Streams.of(b.module).encoder_arg) for b in layout.blocks)
    rows = len(layout.blocks) + text_rows + (len(layout.units) if units else 0) + len(branches)
    entries = _entries(layout, samples_per_call * len(replay.calls), num_steps, rows)
    store: dict[tuple[str, int], dict[tuple[int, str], dict[int, torch.Tensor]]] = {}

    def keep(kind: str, index: int, info: Any, call: int, value: torch.Tensor) -> None:
        store.setdefault((kind, index), {}).setdefault((call, info.branch), {})[info.step] = subsample(value, entries)

    session = CalibrationSession(pipe, model, num_steps)
    gains: list[list[float]] = []
    try:
        _probe_blocks(session, layout, keep)
        if units:
            for u, unit in enumerate(layout.units):
                session.probe(unit.module, lambda info, a, k, out, u=u: keep("unit", u, info, session.call_index,
                                                                             _flat(out)))  # fmt: skip
        for b in branches:
            last = model.get_submodule(deep_path(layout, b)[-1])
            session.probe(last, lambda info, a, k, out, b=b: keep("deep", b, info, session.call_index, _flat(out)))
        with _measure_gains(pipe.scheduler, gains):
            outputs = [pipeline_output(o) for o in session.run(replay, desc="autotune: recording", progress=progress)]
    finally:
        session.close()
    rec = Recording(num_steps, type(pipe.scheduler).__name__, outputs=outputs)
    if not layout.is_unet:  # a UNet's transformer blocks are not a residual stack: its scopes are units and branches
        rec.blocks = [_stack(store.get(("block", b), {}), num_steps) for b in range(len(layout.blocks))]
        rec.blocks_text = [
            _stack(store[("text", b)], num_steps) if ("text", b) in store else None for b in range(len(layout.blocks))
        ]
    rec.units = [_stack(store.get(("unit", u), {}), num_steps) for u in range(len(layout.units))] if units else []
    rec.deep = {b: _stack(store.get(("deep", b), {}), num_steps) for b in branches}
    rec.gains = _step_gains(gains, num_steps)
    _count_flops(rec, pipe, layout, replay, branches)
    return rec


def _probe_blocks(session: CalibrationSession, layout: Layout, keep: Any) -> None:
    if layout.is_unet:
        return
    for b, block in enumerate(layout.blocks):
        streams = Streams.of(block.module)
        inputs: dict[tuple, tuple] = {}

        def on_input(info: Any, args: tuple, kwargs: dict, b: int = b, streams: Streams = streams,
                     inputs: dict = inputs) -> None:  # fmt: skip
            bound = streams.bind(args, kwargs)
            encoder = bound.get(streams.encoder_arg) if streams.encoder_arg else None
            inputs[(session.call_index, info.branch)] = (bound[streams.hidden_arg], encoder)

        def on_output(info: Any, args: tuple, kwargs: dict, output: Any, b: int = b, streams: Streams = streams,
                      inputs: dict = inputs) -> None:  # fmt: skip
            hidden_in, encoder_in = inputs.pop((session.call_index, info.branch))
            hidden_out, encoder_out = streams.outputs(output)
            keep("block", b, info, session.call_index, (hidden_out.float() - hidden_in.float()).reshape(-1))
            if encoder_out is not None and encoder_in is not None and encoder_out.shape == encoder_in.shape:
                keep("text", b, info, session.call_index, (encoder_out.float() - encoder_in.float()).reshape(-1))

        session.probe_inputs(block.module, on_input)
        session.probe(block.module, on_output)


def _flat(output: Any) -> torch.Tensor:
    leaves = [leaf.detach().float().reshape(-1) for leaf in tree_flatten(output)[0] if isinstance(leaf, torch.Tensor)]
    return torch.cat(leaves) if len(leaves) > 1 else leaves[0]


def _stack(per_sample: dict[tuple[int, str], dict[int, torch.Tensor]], num_steps: int) -> torch.Tensor:
    rows = []
    for key in sorted(per_sample):
        steps = per_sample[key]
        missing = [s for s in range(num_steps) if s not in steps]
        if missing:
            raise DifcacheError(
                f"autotune recorded no output at steps {missing[:5]} of call {key[0]} (branch {key[1]!r}); calibrate "
                f"full {num_steps}-step runs (no img2img strength, no early exit)."
            )
        rows.append(torch.stack([steps[s] for s in range(num_steps)]))
    if not rows:
        raise DifcacheError("autotune recorded nothing: did the pipeline call its denoiser?")
    return torch.stack(rows)


class _measure_gains:
    """Wraps ``scheduler.step`` (instance attribute) to measure, at every step, ``|Δ next latent| / |Δ output|``
    for a small perturbation of the model output, on a copy of the scheduler (the real step is untouched)."""

    def __init__(self, scheduler: Any, out: list[list[float]]) -> None:
        self.scheduler, self.out = scheduler, out

    def __enter__(self) -> None:
        scheduler, out, inner = self.scheduler, self.out, self.scheduler.step
        self._had = "step" in vars(scheduler)
        generator = torch.Generator().manual_seed(0)
        step_of_class = type(scheduler).step

        def step(model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            probe = {k: v for k, v in kwargs.items() if k not in ("generator", "return_dict")}
            scale = float(model_output.float().pow(2).mean().sqrt()) or 1.0
            delta = 1e-3 * scale * torch.randn(model_output.shape, generator=generator).to(model_output)
            results = []
            for output in (model_output, model_output + delta):
                twin = copy.deepcopy({k: v for k, v in vars(scheduler).items() if not callable(v)})
                clone = object.__new__(type(scheduler))
                clone.__dict__.update(twin)
                results.append(step_of_class(clone, output, timestep, sample, *args, return_dict=False, **probe)[0])
            change = float((results[1].float() - results[0].float()).norm() / delta.float().norm())
            out.append([change])
            return inner(model_output, timestep, sample, *args, **kwargs)

        scheduler.step = step

    def __exit__(self, *exc: object) -> None:
        if self._had:
            return
        vars(self.scheduler).pop("step", None)


def _step_gains(gains: list[list[float]], num_steps: int) -> np.ndarray:
    """Per step, the mean gain over calibration calls (calls are recorded one after the other)."""
    values = np.array([g[0] for g in gains], dtype=np.float64)
    if values.size < num_steps or values.size % num_steps:
        return np.ones(num_steps)
    per_call = values.reshape(-1, num_steps)
    gains_ = per_call.mean(axis=0)
    return np.where(np.isfinite(gains_) & (gains_ > 0), gains_, 1.0)


def _count_flops(rec: Recording, pipe: Any, layout: Layout, replay: Replay, branches: list[int]) -> None:
    """FLOPs of one denoiser call, in total and per block, unit and deep path (a short uncached run). The total
    is the denoiser's own (its forward counted as one more group), not the pipeline's: a VAE or text encoder is
    no part of what a cache can save, nor of the bench's ideal speedup."""
    model = layout.model
    groups = [[b.module] for b in layout.blocks] + [list(u.modules) for u in layout.units]
    groups += [[model.get_submodule(name) for name in deep_path(layout, b)] for b in branches]
    groups.append([model])
    calls = [0]
    handle = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    kwargs = {**next(iter(replay)), "num_inference_steps": 2}
    try:
        with torch.no_grad():
            _, _, per = measure_flops(groups, lambda: pipe(**kwargs))
    finally:
        handle.remove()
    n = max(calls[0], 1)
    nb, nu = len(layout.blocks), len(layout.units)
    rec.flops_call = per[-1] / n
    rec.flops_blocks = [f / n for f in per[:nb]]
    rec.flops_units = [f / n for f in per[nb : nb + nu]]
    rec.flops_deep = {b: f / n for b, f in zip(branches, per[nb + nu : -1], strict=True)}
    if not math.isfinite(rec.flops_call) or rec.flops_call <= 0:
        raise DifcacheError("autotune could not count the denoiser's FLOPs.")
