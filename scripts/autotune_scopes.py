"""autotune with every scope against autotune restricted to coarse scopes: fidelity and wall time.

autotune chooses by fidelity at a FLOPs budget; a per-module scope pays more hook overhead per FLOP saved than
the block stack. This runs both on one bundled model at several budgets, fitted on the calibration calls and
judged on held-out seeds, timed as ``difcache bench`` times (each call paired with an uncached one):

    python scripts/autotune_scopes.py --model dit --speedups 1.5 2 3 4 5 --json docs/bench/autotune_scopes_dit.json
"""

from __future__ import annotations

import argparse
import json

import torch

from difcache.bench.run import autotune_variant, markdown_rows, run_bench
from difcache.bench.targets import build_target

COARSE = {"dit": ("ranges",), "video": ("ranges",), "unet": ("skip_branch",)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit", choices=sorted(COARSE))
    parser.add_argument("--speedups", type=float, nargs="+", default=[1.5, 2, 3, 4, 5])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    target = build_target(args.model, steps=args.steps, seeds=(0, 1))
    coarse = COARSE[args.model]
    makers = []
    for speedup in args.speedups:
        makers += [autotune_variant(speedup), autotune_variant(speedup, scopes=coarse)]
    report = run_bench(target, makers, repeats=args.repeats, progress=print)
    print(f"\n{report['target']}, {args.steps} steps, held-out seeds 0 and 1, {args.repeats} timed pairs")
    cells = []
    for row in report["rows"]:
        setting = row["setting"]
        head = [f"{setting['speedup']:g}×", ", ".join(setting.get("scopes", ("all",)))]
        measured = "—" if row["measured_speedup"] is None else f"{row['measured_speedup']:.2f}×"
        cells.append([*head, row["status"]] if row["status"] != "ok" else [
            *head, setting["chosen"], f"{row['ideal_speedup']:.2f}×", measured, f"{row['psnr']:.2f}",
        ])  # fmt: skip
    print(markdown_rows(["asked", "scopes", "chosen", "ideal", "measured", "PSNR dB"], cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
