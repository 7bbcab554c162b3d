"""TeaCache's calibration: fit the rescaling polynomial from the indicator's relative change to the stack
output's, over uncached calibration runs, as the paper does (degree 4, ``np.polyfit``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from difcache.adapters.layout import Layout
from difcache.engine.calibration import CalibrationSession
from difcache.engine.scopes.block_range import Streams
from difcache.engine.scopes.signals import FirstBlockScope, indicator_scope
from difcache.errors import DifcacheError
from difcache.methods.registry import register_calibrator
from difcache.methods.teacache import TeaCacheConfig
from difcache.policies.teacache import relative_l1


@register_calibrator(TeaCacheConfig)
def calibrate(config: TeaCacheConfig, layout: Layout, session: CalibrationSession, call_kwargs: list) -> dict:
    """Fit the rescaling polynomial (degree 4) from the indicator's relative change to the stack output's."""
    scope = indicator_scope(config.indicator, layout)
    head, tail = scope.units[0].modules[0], scope.units[0].modules[-1]
    head_streams, tail_streams = Streams.of(head), Streams.of(tail)
    previous: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    pending: dict[tuple, torch.Tensor] = {}
    xs: list[float] = []
    ys: list[float] = []
    if isinstance(scope, FirstBlockScope):
        session.probe_inputs(layout.blocks[0].module, lambda info, a, k: scope.probe.pre_forward(None, *a, **k))
        session.probe(layout.blocks[0].module, lambda info, a, k, out: scope.probe.post_forward(None, out))

    def on_head(info: Any, args: tuple, kwargs: dict) -> None:
        pending[(session.call_index, info.branch)] = scope.signal(head, head_streams.bind(args, kwargs)).float()

    def on_tail(info: Any, args: tuple, kwargs: dict, output: Any) -> None:
        key = (session.call_index, info.branch)
        signal, out = pending.pop(key), tail_streams.outputs(output)[0].float()
        if key in previous:
            prev_signal, prev_out = previous[key]
            xs.append(relative_l1(signal, prev_signal))
            ys.append(relative_l1(out, prev_out))
        previous[key] = (signal, out)

    session.probe_inputs(head, on_head)
    session.probe(tail, on_tail)
    session.run(call_kwargs, desc="teacache calibration")
    if len(xs) < 5:
        raise DifcacheError("TeaCache calibration needs more steps or calls (fewer than 5 step pairs recorded).")
    coefficients = np.polyfit(np.asarray(xs), np.asarray(ys), 4).tolist()
    return {"coefficients": coefficients, "indicator": config.indicator, "pairs": len(xs)}
