"""The ``difcache`` command: ``demo``, ``bench``, ``calibrate``, ``autotune`` and ``list``.

difcache demo                                   # bundled DiT + UNet, uncached vs cached, side-by-side PNG
difcache bench --model dit --out runs/bench     # every method and the alternatives, JSON/Markdown/Pareto
difcache bench --model dit --autotune 1.5 2 3 4 5 --out runs/autotune-dit   # vs every curve's best at equal work
difcache calibrate --model dit --method teacache --out dit-teacache.json
difcache autotune --model dit --speedup 3 --out dit-3x.json   # schedule, scope and forecast fitted; + dit-3x.png
difcache list                                   # methods and supported models
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from difcache.config import parse_fields
from difcache.errors import DifcacheError

# difcache.tuning.autotune.SCOPES, spelled out so that `difcache --help` does not import torch (tested equal)
AUTOTUNE_SCOPES = ("ranges", "modules", "skip_branch")


def _parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    """``"taylorseer:interval=4,order=2"`` -> ``("taylorseer", {"interval": 4, "order": 2})``."""
    name, _, rest = text.partition(":")
    try:
        return name.strip(), parse_fields(rest)
    except ValueError as err:
        raise DifcacheError(f"bad setting {text!r}: {err}") from None


def _check_setting(method: str, setting: dict[str, Any]) -> None:
    """Fail now, naming the field, rather than after minutes of uncached reference runs."""
    from difcache.methods import method_spec

    try:
        method_spec(method).config_cls().replace(**setting)
    except (TypeError, ValueError) as err:
        raise DifcacheError(f"{method}: {err}") from None


def _check_out(path: str, is_dir: bool) -> None:
    """Make sure ``path`` (a folder, or a file's folder) can be written before any work starts."""
    folder = Path(path) if is_dir else Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".difcache-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise DifcacheError(f"cannot write to {folder} ({err.strerror}); choose another --out.") from None


def _cmd_list(args: argparse.Namespace) -> int:
    import difcache
    from difcache.adapters import registered_adapters
    from difcache.bench.alternatives import ALTERNATIVES

    print("methods:")
    for name, description in difcache.list_methods().items():
        print(f"  {name:<16} {description}")
    print("models with adapters:", ", ".join(registered_adapters()))
    print("alternatives for `difcache bench`:")
    for name, alt in ALTERNATIVES.items():
        print(f"  {name:<30} {'installed' if alt.available() else 'missing (pip install ' + alt.package + ')'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from difcache.demo import run_demo

    overrides = _parse_setting("x:" + args.set)[1] if args.set else {}
    _check_setting(args.method, overrides)
    _check_setting(args.unet_method, {})
    _check_out(args.out, is_dir=True)
    run_demo(
        method=args.method,
        unet_method=args.unet_method,
        steps=args.steps,
        seeds=args.seeds,
        out=args.out,
        overrides=overrides,
        include_unet=not args.no_unet,
        autotune=args.autotune,
    )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from difcache.bench.alternatives import ALTERNATIVES
    from difcache.bench.autotune import run_autotune_bench, sweep_variants
    from difcache.bench.run import alternative_variant, difcache_variant, markdown_table, run_bench, write_report
    from difcache.bench.targets import build_target, default_variants

    makers = []
    for text in args.variants or ():
        name, setting = _parse_setting(text)
        if "-" in name:
            if name not in ALTERNATIVES:
                raise DifcacheError(f"unknown alternative {name!r}; one of {', '.join(sorted(ALTERNATIVES))}.")
            makers.append(alternative_variant(name, **setting))
        else:
            _check_setting(name, setting)
            makers.append(difcache_variant(name, **setting))
    _check_out(args.out, is_dir=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    target = build_target(args.model, steps=args.steps, seeds=args.seeds)
    if args.autotune:  # autotune against every curve's best setting at its work (sweep, then time the contenders)
        others = makers or sweep_variants(args.model)
        report = run_autotune_bench(target, args.autotune, others, calls=args.calls, repeats=args.repeats)
    else:
        report = run_bench(target, makers or default_variants(args.model), repeats=args.repeats,
                           fid_samples=args.fid_samples)  # fmt: skip
    out = write_report(report, args.out)
    print(markdown_table(report))
    print(f"\nwrote {out}/bench.json, bench.md and the Pareto plots")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import difcache
    from difcache.bench.targets import build_target

    _check_out(args.out, is_dir=False)
    target = build_target(args.model, steps=args.steps, seeds=(0,))
    profile = difcache.calibrate(
        target.pipe, args.method, target.calibration_calls(args.calls), num_inference_steps=args.steps
    )
    profile.save(args.out)
    print(f"wrote {args.out}: {json.dumps({k: v for k, v in profile.config.items()})}")
    return 0


def _cmd_autotune(args: argparse.Namespace) -> int:
    import difcache
    from difcache.bench.targets import build_target
    from difcache.tuning.figure import plot_profile

    _check_out(args.out, is_dir=False)
    target = build_target(args.model, steps=args.steps, seeds=(0,))
    profile = difcache.autotune(
        target.pipe, args.speedup, target.calibration_calls(args.calls), args.steps, seconds=args.seconds,
        scopes=args.scopes,
    )
    profile.save(args.out)
    data = profile.data
    print(
        f"wrote {args.out}: {data['name']}, ideal {data['ideal_speedup']:.3f}x (asked {args.speedup:g}x), "
        f"calibration PSNR {data['calibration_psnr']:.2f} dB over {args.calls} calls"
    )
    tracking = ", ".join(f"{scope} {rho:+.2f}" for scope, rho in data.get("proxy_tracking", {}).items())
    print(f"proxy vs calibration PSNR, Spearman's rho per scope: {tracking or 'too few candidates ran'}")
    try:
        print(f"wrote {plot_profile(profile, Path(args.out).with_suffix('.png'))}")
    except ImportError:
        print("matplotlib is not installed: no figure (pip install matplotlib).")
    print(f'use it: difcache.apply_cache(pipe, profile="{args.out}")')
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2), like every other difcache error."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _above_one(text: str) -> float:
    value = float(text)
    if not value > 1:
        raise argparse.ArgumentTypeError(f"must be a number > 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="difcache", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="bundled tiny models, uncached vs cached, side by side")
    demo.add_argument("--method", default="taylorseer", help="method for the DiT (default taylorseer)")
    demo.add_argument("--unet-method", default="deepcache", help="method for the UNet (default deepcache)")
    demo.add_argument("--set", default="", help="overrides for --method, e.g. 'interval=4,order=2'")
    demo.add_argument("--steps", type=_positive, default=50)
    demo.add_argument(
        "--autotune", type=_above_one, default=None, metavar="SPEEDUP",
        help="run the profile difcache.autotune fits at this ideal speedup instead of --method",
    )  # fmt: skip
    demo.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    demo.add_argument("--out", default="outputs/demo")
    demo.add_argument("--no-unet", action="store_true", help="only the DiT")
    demo.set_defaults(fn=_cmd_demo)

    bench = sub.add_parser("bench", help="methods and alternatives side by side (BENCHMARKS.md)")
    bench.add_argument("--model", default="dit", help="bundled model (dit, unet, video) or tiny:<family>")
    bench.add_argument("--variants", nargs="*", help="e.g. taylorseer:interval=4 diffusers-fbc:threshold=0.1")
    bench.add_argument("--steps", type=_positive, default=50)
    bench.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    bench.add_argument("--repeats", type=_non_negative, default=5, help="timed rounds (0: quality and FLOPs only)")
    bench.add_argument(
        "--autotune", type=_above_one, nargs="+", metavar="SPEEDUP",
        help="autotune at these ideal speedups (fitted on calibration calls, never the bench seeds) against every "
        "alternative's and hand-set method's best setting at equal work (--variants: only those)",
    )  # fmt: skip
    bench.add_argument("--calls", type=_positive, default=4, help="calibration calls for --autotune")
    bench.add_argument("--threads", type=int, default=0)
    bench.add_argument(
        "--fid-samples", type=int, default=128,
        help="images per variant for FID with the bundled classifier (bundled dit/unet only; 0 = off)",
    )  # fmt: skip
    bench.add_argument("--out", default="runs/bench")
    bench.set_defaults(fn=_cmd_bench)

    cal = sub.add_parser("calibrate", help="calibrate a method on a bundled model and save the profile")
    cal.add_argument("--model", default="dit")
    cal.add_argument("--method", required=True)
    cal.add_argument("--steps", type=_positive, default=50)
    cal.add_argument("--calls", type=_positive, default=4, help="calibration pipeline calls")
    cal.add_argument("--out", required=True)
    cal.set_defaults(fn=_cmd_calibrate)

    tune = sub.add_parser("autotune", help="fit schedule, scope and forecast to a model and budget (profile + PNG)")
    tune.add_argument("--model", default="dit", help="bundled model (dit, unet, video) or tiny:<family>")
    tune.add_argument("--speedup", type=_above_one, required=True, help="ideal (FLOPs) speedup, e.g. 3")
    tune.add_argument("--steps", type=_positive, default=50)
    tune.add_argument("--calls", type=_positive, default=4, help="calibration pipeline calls")
    tune.add_argument("--seconds", type=float, default=75.0, help="time for running candidates after recording")
    tune.add_argument(
        "--scopes", nargs="+", choices=AUTOTUNE_SCOPES, default=list(AUTOTUNE_SCOPES),
        help="scopes to search; 'ranges' (or 'skip_branch' on a UNet) alone favours wall time on small models",
    )  # fmt: skip
    tune.add_argument("--out", required=True, help="profile JSON; the figure goes beside it as .png")
    tune.set_defaults(fn=_cmd_autotune)

    lst = sub.add_parser("list", help="methods, supported models and installed alternatives")
    lst.set_defaults(fn=_cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except DifcacheError as err:
        print(f"difcache: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
