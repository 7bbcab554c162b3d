"""Engine benchmark (issue: core): hook overhead and TaylorSeer speedups on a not-trivial FLUX transformer.

Prints, measured in one process, each variant's call paired with an uncached call just before it (the median of
--repeats pair ratios after a warm-up, as ``difcache bench`` times):
  * hook overhead = time with every decision COMPUTE (method "always_compute") / uncached time - 1;
  * TaylorSeer (N=5, FLUX preset otherwise): measured speedup, ideal (FLOPs) speedup, oracle speedup
    (uncached time minus the measured time of the units it skipped), and engine efficiency = measured / oracle.

    python scripts/bench_engine.py --steps 50 --repeats 5 --json runs/bench_engine.json
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

import difcache
from difcache.bench.timing import oracle_speedup, paired_speedups, time_units
from difcache.models.flow_loop import FluxLoop, flux_transformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave torch's default)")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loop = FluxLoop(flux_transformer(), image_tokens=256, text_tokens=32)
    handles: dict[str, difcache.CacheHandle] = {}
    configs = {
        "always_compute": difcache.AlwaysComputeConfig(),
        "taylorseer": difcache.TaylorSeerConfig.for_family("flux").replace(interval=args.interval),
    }

    def setup(name: str):
        return lambda: handles.__setitem__(name, difcache.apply_cache(loop, configs[name]))

    def teardown(name: str):
        return lambda: handles[name].remove()

    run = lambda: loop(args.steps)  # noqa: E731
    medians, speedups = paired_speedups(
        {"uncached": run, "always_compute": run, "taylorseer": run},
        "uncached",
        repeats=args.repeats,
        setup={n: setup(n) for n in configs},
        teardown={n: teardown(n) for n in configs},
    )
    # Decisions and ideal speedup of one TaylorSeer call, then per-unit times of an instrumented uncached call.
    with difcache.apply_cache(loop, configs["taylorseer"]) as handle:
        reference_cached = loop(args.steps)
        stats = handle.stats()
        units = handle.layout.units
    unit_times = time_units(units, run, repeats=2)
    skipped = [u.skipped / stats.runs for u in stats.units]
    oracle = oracle_speedup(unit_times, skipped)
    measured = speedups["taylorseer"]
    reference = loop(args.steps)
    rel_err = float((reference_cached - reference).norm() / reference.norm())
    result = {
        "model": "FluxTransformer2DModel 4 double + 8 single blocks, 4x32 heads, 256 image + 32 text tokens",
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "seconds": medians,
        "hook_overhead": 1.0 / speedups["always_compute"] - 1.0,
        "taylorseer": {
            "config": configs["taylorseer"].to_dict(),
            "measured_speedup": measured,
            "ideal_speedup": stats.ideal_speedup,
            "oracle_speedup": oracle,
            "engine_efficiency": measured / oracle,
            "relative_error_vs_uncached": rel_err,
        },
    }
    ts = result["taylorseer"]
    print(
        f"uncached {medians['uncached']:.3f}s | always_compute {medians['always_compute']:.3f}s | "
        f"taylorseer {medians['taylorseer']:.3f}s (medians of {args.repeats}; ratios: medians of paired runs)"
    )
    print(f"hook overhead: {100 * result['hook_overhead']:+.2f}%  (target <= 2%)")
    print(
        f"TaylorSeer N={args.interval}: measured {ts['measured_speedup']:.2f}x, ideal {ts['ideal_speedup']:.2f}x, "
        f"oracle {ts['oracle_speedup']:.2f}x, engine efficiency {ts['engine_efficiency']:.3f} (target >= 0.95), "
        f"relative error {rel_err:.4f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
