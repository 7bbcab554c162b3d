"""ERTACache's λ on the bundled models: where its default comes from (issue 23, item 5).

For each bundled transformer model and each λ on a grid, ERTACache is calibrated on the model's calibration
calls (seeds 1000+, never the seeds it is judged on), then applied to the held-out seeds: the table gives the
reuse set's size, the ideal (FLOPs) speedup and PSNR/SSIM against the uncached output. No timing, so a busy
machine does not change the numbers.

    python scripts/ertacache_thresholds.py --models dit video --steps 50 --json runs/ertacache-thresholds.json
"""

from __future__ import annotations

import argparse
import json

import torch

import difcache
from difcache.bench.run import BenchTarget, Variant, markdown_rows, run_bench
from difcache.bench.targets import build_target

GRID = (0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3, 0.6)


def threshold_variant(threshold: float, calls: int, reuse: dict[float, int]):
    """ERTACache at ``threshold``, calibrated when first applied on the target's calibration calls."""

    def make(target: BenchTarget) -> Variant:
        profiles: list[difcache.Profile] = []

        def apply():
            if not profiles:
                profile = difcache.calibrate(
                    target.pipe, "ertacache", target.calibration_calls(calls), target.steps, threshold=threshold
                )
                reuse[threshold] = len(profile.data["reuse_steps"])
                profiles.append(profile)
            return difcache.apply_cache(target.pipe, "ertacache", profile=profiles[0]).remove

        return Variant(f"ertacache threshold={threshold:g}", "difcache:ertacache", apply, {"threshold": threshold})

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["dit", "video"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--calls", type=int, default=4, help="calibration calls")
    parser.add_argument("--grid", type=float, nargs="+", default=list(GRID))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = {}
    for name in args.models:
        target = build_target(name, steps=args.steps, seeds=(0, 1))
        reuse: dict[float, int] = {}
        makers = [threshold_variant(t, args.calls, reuse) for t in args.grid]
        report = run_bench(target, makers, repeats=0, progress=lambda _: None)
        rows = [
            {"threshold": r["setting"]["threshold"], "reused_steps": reuse.get(r["setting"]["threshold"]),
             "ideal_speedup": r["ideal_speedup"], "psnr": r["psnr"], "ssim": r["ssim"], "status": r["status"]}
            for r in report["rows"]
        ]  # fmt: skip
        results[name] = {"target": report["target"], "steps": args.steps, "rows": rows}
        print(f"\n{report['target']}, {args.steps} steps, held-out seeds 0 and 1")
        cells = [
            [f"{r['threshold']:g}", r["status"]] if r["status"] != "ok" else [
                f"{r['threshold']:g}", str(r["reused_steps"]), f"{r['ideal_speedup']:.2f}x", f"{r['psnr']:.2f}",
                f"{r['ssim']:.4f}",
            ]
            for r in rows
        ]  # fmt: skip
        print(markdown_rows(["λ", "reused steps", "ideal speedup", "PSNR (dB)", "SSIM"], cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
