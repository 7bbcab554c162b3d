"""Caches under torch.compile (dynamo's eager backend, so graphs are traced but no compiler runs).

For every family and static method: the compiled cached output equals the eager cached output, no graph break is
added to the uncached model's, ``fullgraph=True`` holds, and the number of graphs does not grow with the step
count (10 then 30 steps). Compile before or after ``apply_cache``, in place, through the ``OptimizedModule``
wrapper and regionally (``compile_repeated_blocks``). Dynamic methods break the graph only at their one live
decision. One inductor run is marked slow.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

import difcache
from difcache.models.tiny import tiny, tiny_call_kwargs

TRANSFORMER_METHODS = [("fora", {}), ("taylorseer", {}), ("taylorseer", {"lite": True}), ("delta_dit", {})]
CASES = [(family, method, settings) for family in ("dit", "pixart", "sd3", "flux", "wan", "hunyuanvideo", "cogvideox",
                                                    "ltx") for method, settings in TRANSFORMER_METHODS]
CASES += [(family, method, {}) for family in ("sd15", "sdxl") for method in ("deepcache", "fora")]


def _run(pipe, family: str, steps: int) -> torch.Tensor:
    out = pipe(**tiny_call_kwargs(family, num_inference_steps=steps))
    return torch.as_tensor(out.images if hasattr(out, "images") else out.frames)


def _denoiser_name(pipe) -> str:
    return "transformer" if hasattr(pipe, "transformer") else "unet"


def _compiled_counts(pipe, family: str, steps: int) -> tuple[torch.Tensor, int, int]:
    out = _run(pipe, family, steps)
    return out, counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    counters.clear()
    yield
    dynamo.reset()


@pytest.mark.parametrize(("family", "method", "settings"), CASES, ids=lambda v: str(v))
def test_static_methods_compile_fullgraph_with_bounded_graphs(family, method, settings):
    pipe = tiny(family)
    pipe.set_progress_bar_config(disable=True)
    with difcache.apply_cache(pipe, method, **settings):
        eager = _run(pipe, family, 10)
    getattr(pipe, _denoiser_name(pipe)).compile(backend="eager", fullgraph=True)
    with difcache.apply_cache(pipe, method, **settings) as handle:
        compiled, graphs_10, breaks = _compiled_counts(pipe, family, 10)
        _, graphs_30, breaks_30 = _compiled_counts(pipe, family, 30)
        assert handle.stats().ideal_speedup > 1.05  # it really caches under compile
    assert torch.allclose(compiled, eager, atol=1e-5)
    assert breaks == breaks_30 == 0  # fullgraph=True would have raised otherwise; the uncached model has none
    assert graphs_30 == graphs_10 <= 4  # one graph per kind of step (skip / compute rows), not per step


def _dit_counts(apply_before: bool, wrap: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    pipe = tiny("dit")
    pipe.set_progress_bar_config(disable=True)
    with difcache.apply_cache(pipe, "taylorseer"):
        eager = _run(pipe, "dit", 10)
    if apply_before:
        handle = difcache.apply_cache(pipe, "taylorseer")
    if wrap:
        pipe.transformer = torch.compile(pipe.transformer, backend="eager", fullgraph=True)
    else:
        pipe.transformer.compile(backend="eager", fullgraph=True)
    if not apply_before:
        handle = difcache.apply_cache(pipe, "taylorseer")  # an OptimizedModule is unwrapped
    compiled = _run(pipe, "dit", 10)
    handle.remove()
    return eager, compiled, sum(counters["graph_break"].values())


@pytest.mark.parametrize("apply_before", [True, False], ids=["apply-then-compile", "compile-then-apply"])
@pytest.mark.parametrize("wrap", [False, True], ids=["in-place", "wrapper"])
def test_compile_before_or_after_in_place_or_wrapped(apply_before, wrap):
    eager, compiled, breaks = _dit_counts(apply_before, wrap)
    assert torch.allclose(compiled, eager, atol=1e-5) and breaks == 0


def test_remove_leaves_the_compiled_model_as_it_was():
    pipe = tiny("flux")
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.compile(backend="eager", fullgraph=True)
    plain = _run(pipe, "flux", 6)
    with difcache.apply_cache(pipe, "fora"):
        assert not torch.allclose(_run(pipe, "flux", 6), plain, atol=1e-6)
    assert torch.equal(_run(pipe, "flux", 6), plain)
    assert pipe.transformer._compiled_call_impl is not None  # still compiled, by the user's call


@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize(("method", "settings"), [("taylorseer", {}), ("fora", {}), ("taylorseer", {"lite": True})])
def test_regional_compilation_shares_graphs_across_blocks(family, method, settings):
    pipe = tiny(family)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.compile_repeated_blocks(backend="eager", fullgraph=True)
    _run(pipe, family, 4)
    uncached_graphs = counters["stats"]["unique_graphs"]
    dynamo.reset()
    counters.clear()
    with difcache.apply_cache(pipe, method, **settings):
        compiled, graphs_10, breaks = _compiled_counts(pipe, family, 10)
        _, graphs_30, _ = _compiled_counts(pipe, family, 30)
    with torch.compiler.set_stance("force_eager"), difcache.apply_cache(pipe, method, **settings):
        eager_free = _run(pipe, family, 10)
    assert torch.allclose(compiled, eager_free, atol=1e-5) and breaks == 0
    # Per block class: a graph per role in the cached range and per kind (skip / compute), never per block.
    assert graphs_30 == graphs_10 <= uncached_graphs + 5


@pytest.mark.parametrize("indicator", ["modulated_input", "first_block_residual"])
def test_dynamic_methods_break_only_at_their_live_decision(indicator):
    pipe = tiny("flux")
    pipe.set_progress_bar_config(disable=True)
    with difcache.apply_cache(pipe, "teacache", indicator=indicator, threshold=0.5):
        eager = _run(pipe, "flux", 10)
    pipe.transformer.compile(backend="eager")
    with difcache.apply_cache(pipe, "teacache", indicator=indicator, threshold=0.5) as handle:
        compiled = _run(pipe, "flux", 10)
        skipped = handle.stats().totals()["reuse"]
    reasons = list(counters["graph_break"])
    assert torch.allclose(compiled, eager, atol=1e-5) and skipped > 0
    assert reasons and all("decide_live" in reason for reason in reasons)


def test_stats_under_compile_count_flops_without_running_the_model():
    pipe = tiny("dit")
    pipe.set_progress_bar_config(disable=True)
    with difcache.apply_cache(pipe, "fora") as eager_handle:
        _run(pipe, "dit", 10)
        expected = eager_handle.stats().ideal_speedup
    pipe = tiny("dit")  # the same model, whose FLOPs were never measured: counted on fake tensors at stats()
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.compile(backend="eager", fullgraph=True)
    with difcache.apply_cache(pipe, "fora") as handle:
        _run(pipe, "dit", 10)
        stats = handle.stats()
    assert stats.flops_measured and stats.ideal_speedup == pytest.approx(expected)


@pytest.mark.slow
def test_inductor_cached_output_matches_eager_cached_output():
    pipe = tiny("flux")
    pipe.set_progress_bar_config(disable=True)
    with difcache.apply_cache(pipe, "taylorseer"):
        eager = _run(pipe, "flux", 10)
    pipe.transformer.compile(fullgraph=True)
    with difcache.apply_cache(pipe, "taylorseer"):
        compiled, graphs_10, breaks = _compiled_counts(pipe, "flux", 10)
        _, graphs_30, _ = _compiled_counts(pipe, "flux", 30)
    assert torch.allclose(compiled, eager, atol=1e-4) and breaks == 0 and graphs_30 == graphs_10
