"""Caches under ``torch.compile`` (inductor, CPU): does a compiled cached model keep the eager speedup?

For each model, four copies with the same weights: eager uncached, eager cached, compiled uncached, compiled
cached (``model.compile()`` in place; the two compiled copies are compiled once each, so switching between them
never recompiles). Each compiled copy is warmed up until a call compiles nothing new; that time is reported as
compile time, apart from run time. Then the four are timed interleaved (``--repeats`` rounds of A, B, C, D after
the warm-up) and the script prints

* eager speedup = eager uncached / eager cached, compiled speedup = compiled uncached / compiled cached,
* kept = compiled speedup / eager speedup (the issue's target: >= 0.9),
* compiled vs eager for the uncached model (what compiling buys on this CPU),
* graphs and graph breaks of each compiled copy (``torch._dynamo.utils.counters``).

    python scripts/bench_compile.py --model dit --method taylorseer:lite=True --repeats 7 --threads 1
    python scripts/bench_compile.py --model flux --method taylorseer --repeats 7 --threads 1

These are CPU inductor figures: they say nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

import difcache
from difcache.config import parse_fields
from difcache.models.flow_loop import FluxLoop, flux_transformer


def _dit(steps: int) -> Callable[[], Callable[[], Any]]:
    def make() -> Callable[[], Any]:
        pipe = difcache.models.load("dit")
        pipe.set_progress_bar_config(disable=True)
        return pipe, lambda: pipe([0, 1, 2, 3], num_inference_steps=steps, generator=torch.Generator().manual_seed(0))

    return make


def _flux(steps: int) -> Callable[[], Callable[[], Any]]:
    reference = flux_transformer()

    def make() -> Callable[[], Any]:
        loop = FluxLoop(copy.deepcopy(reference), image_tokens=256, text_tokens=32)
        return loop, lambda: loop(steps)

    return make


MODELS = {"dit": _dit, "flux": _flux}


def _warm(run: Callable[[], Any], limit: int = 6) -> tuple[float, int, int]:
    """Call ``run`` until a call compiles no new graph; seconds spent, graphs and breaks of this copy."""
    before_graphs = counters["stats"]["unique_graphs"]
    before_breaks = sum(counters["graph_break"].values())
    start = time.perf_counter()
    for _ in range(limit):
        graphs = counters["stats"]["unique_graphs"]
        run()
        if counters["stats"]["unique_graphs"] == graphs:
            break
    seconds = time.perf_counter() - start
    return (seconds, counters["stats"]["unique_graphs"] - before_graphs,
            sum(counters["graph_break"].values()) - before_breaks)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="dit")
    parser.add_argument("--method", default="taylorseer:lite=True", help="method[:key=value,...]")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name, _, fields = args.method.partition(":")
    settings = parse_fields(fields) if fields else {}
    make = MODELS[args.model](args.steps)
    dynamo.reset()
    counters.clear()

    keys = ("eager", "eager_cached", "compiled", "compiled_cached")
    copies: dict[str, tuple[Any, Callable[[], Any]]] = {key: make() for key in keys}
    handles = {key: difcache.apply_cache(copies[key][0], name, **settings) for key in keys if key.endswith("cached")}
    for key in ("compiled", "compiled_cached"):
        target = copies[key][0]
        (target.transformer if hasattr(target, "transformer") else target.unet).compile()
    runs = {key: run for key, (_, run) in copies.items()}
    warm = {key: _warm(runs[key]) for key in runs}  # eager copies: one warm-up call each
    torch.manual_seed(0)
    times: dict[str, list[float]] = {key: [] for key in runs}
    with torch.no_grad():
        for _ in range(args.repeats):
            for key, run in runs.items():
                start = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - start)
    median = {key: statistics.median(values) for key, values in times.items()}
    eager_speedup = median["eager"] / median["eager_cached"]
    compiled_speedup = median["compiled"] / median["compiled_cached"]
    stats = handles["compiled_cached"].stats()
    result = {
        "model": args.model, "method": args.method, "steps": args.steps, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "backend": "inductor (CPU)",
        "seconds": median, "eager_speedup": eager_speedup, "compiled_speedup": compiled_speedup,
        "kept": compiled_speedup / eager_speedup, "compile_vs_eager_uncached": median["eager"] / median["compiled"],
        "ideal_speedup": stats.ideal_speedup,
        "warmup": {key: {"seconds": w[0], "graphs": w[1], "graph_breaks": w[2]} for key, w in warm.items()},
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    plain, cached = warm["compiled"], warm["compiled_cached"]
    print(
        f"\n{args.model} {args.method}: eager {eager_speedup:.2f}x, compiled {compiled_speedup:.2f}x "
        f"(kept {result['kept']:.2f}; target >= 0.9), compiling the uncached model "
        f"{result['compile_vs_eager_uncached']:.2f}x, graphs uncached/cached {plain[1]}/{cached[1]}, breaks "
        f"{plain[2]}/{cached[2]}, compile s {plain[0]:.0f}/{cached[0]:.0f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
