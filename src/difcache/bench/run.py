"""``difcache bench``: difcache's methods and the alternatives users have today, side by side, in one process.

For each variant (a difcache config or an alternative's setting) on one pipeline (``BENCHMARKS.md``):

* quality: PSNR/SSIM of its outputs against the uncached outputs of the same seeds;
* ideal speedup: denoiser FLOPs of an uncached call / of the cached call, counted the same way for every
  variant (a FLOP counter around the whole call, denoiser forwards only), so difcache and the alternatives are
  measured by one ruler;
* measured speedup: the median, over rounds, of the ratio of an uncached call to the variant's call timed
  right after it (uncached, A, uncached, B, ...; :func:`~difcache.bench.timing.paired_speedups`), each variant
  applied before and removed after its timed call;
* oracle speedup and engine efficiency (difcache variants): the uncached time minus the measured time of the
  units it skipped (an instrumented uncached run), and measured / oracle;
* FID (``fid_samples > 0`` and a target that can draw samples and real data, i.e. the bundled models): the
  bundled shape classifier's features of ``fid_samples`` generated images against as many freshly rendered real
  ones, for the uncached pipeline and for every variant (same seeds and labels);
* peak memory: the most tensor bytes a call allocates on top of the weights (:mod:`difcache.bench.memory`),
  measured on a separate untimed call.

Alternatives whose package is missing are reported as missing; one that fails on the model is reported with its
error. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import math
import platform
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import difcache
from difcache.bench.alternatives import ALTERNATIVES
from difcache.bench.memory import peak_call_memory
from difcache.bench.timing import oracle_speedup, paired_speedups, time_units
from difcache.denoiser import find_denoiser
from difcache.engine.flops import _CUSTOM


@dataclass
class BenchTarget:
    """A pipeline and how to call it: ``call(seed)`` returns images ``[N, C, H, W]`` (or frames) in [0, 1]."""

    name: str
    pipe: Any
    call: Callable[[int], torch.Tensor]
    steps: int
    seeds: Sequence[int] = (0, 1)
    sample: Callable[[int], torch.Tensor] | None = None  # n images for FID (fixed seeds and labels), in [0, 1]
    real: Callable[[int], torch.Tensor] | None = None  # n images of the training distribution, in [0, 1]
    # Calibration inputs, disjoint from ``seeds``: what autotune and the alternatives that calibrate (MagCache)
    # are fitted on, so every row is judged on seeds nobody tuned on.
    calibration_seed: int = 1000
    calibration_calls: Callable[[int], list[dict[str, Any]]] | None = None  # n calls' pipeline kwargs


@dataclass
class Variant:
    label: str
    group: str  # curve on the Pareto plot: "difcache:<method>" or the alternative's name
    apply: Callable[[], Callable[[], None]]  # returns its remover
    setting: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    label: str
    group: str
    setting: dict[str, Any]
    status: str = "ok"
    seconds: float | None = None
    measured_speedup: float | None = None
    ideal_speedup: float | None = None
    oracle_speedup: float | None = None
    engine_efficiency: float | None = None
    psnr: float | None = None
    ssim: float | None = None
    fid: float | None = None
    peak_mib: float | None = None
    store_mib: float | None = None


# Settings that change *what* a method caches rather than how often, so their rows are a curve of their own on
# the Pareto plot (TaylorSeer-Lite's one forecast per step against every module's; first-block cache against
# TeaCache's modulated input): joining them to the plain method's points would draw a line through two methods.
_CURVE_SETTINGS = ("lite", "indicator")


def curve_of(method: str, setting: dict[str, Any]) -> str:
    """The Pareto curve a difcache row belongs to: ``difcache:<method>`` plus any structural setting."""
    extra = [f"{k}={setting[k]}" for k in _CURVE_SETTINGS if setting.get(k) not in (None, False)]
    return f"difcache:{method}" + ("" if not extra else " " + ",".join(extra))


def difcache_variant(method: str, **setting: Any) -> Callable[[BenchTarget], Variant]:
    def make(target: BenchTarget) -> Variant:
        label = method + ("" if not setting else " " + ",".join(f"{k}={v}" for k, v in setting.items()))

        def apply() -> Callable[[], None]:
            return difcache.apply_cache(target.pipe, method, **setting).remove

        return Variant(label, curve_of(method, setting), apply, dict(setting))

    return make


def alternative_variant(name: str, **setting: Any) -> Callable[[BenchTarget], Variant]:
    alternative = ALTERNATIVES[name]

    def make(target: BenchTarget) -> Variant:
        label = name + ("" if not setting else " " + ",".join(f"{k}={v}" for k, v in setting.items()))
        full = {**setting, "calibration_call": lambda: target.call(target.calibration_seed)}
        return Variant(label, name, lambda: alternative.apply(target.pipe, full, target.steps), dict(setting))

    return make


def autotune_variant(speedup: float, calls: int = 4, **options: Any) -> Callable[[BenchTarget], Variant]:
    """``difcache.autotune`` at ``speedup``, fitted on the target's calibration calls (never on its seeds). It runs
    when the variant is first applied (a failure is reported in its row); its time and choice go in the setting."""

    def make(target: BenchTarget) -> Variant:
        setting: dict[str, Any] = {"speedup": speedup, "calls": calls, **options}
        profiles: list[Any] = []

        def apply() -> Callable[[], None]:
            if not profiles:
                if target.calibration_calls is None:
                    raise ValueError(f"{target.name} has no calibration calls to autotune on")
                start = time.perf_counter()
                profile = difcache.autotune(target.pipe, speedup, target.calibration_calls(calls), target.steps,
                                            progress=False, **options)  # fmt: skip
                setting["tuned_seconds"] = round(time.perf_counter() - start, 1)
                setting["chosen"] = profile.data["name"]
                setting["calibration_psnr"] = profile.data["calibration_psnr"]
                profiles.append(profile)
            return difcache.apply_cache(target.pipe, profile=profiles[0]).remove

        scopes = f" ({', '.join(options['scopes'])})" if "scopes" in options else ""
        return Variant(f"autotune {speedup:g}x{scopes}", "difcache:autotune", apply, setting)

    return make


def denoiser_flops(target: BenchTarget, seed: int) -> float:
    """FLOPs of all denoiser forwards in one call (deltas of a global counter around each forward)."""
    model, _ = find_denoiser(target.pipe)
    total = [0.0]
    with FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
        entry: list[int] = []
        pre = model.register_forward_pre_hook(lambda *_: entry.append(counter.get_total_flops()))
        post = model.register_forward_hook(
            lambda *_: total.__setitem__(0, total[0] + counter.get_total_flops() - entry.pop())
        )
        try:
            target.call(seed)
        finally:
            pre.remove()
            post.remove()
    return total[0]


def _fid_scorer(target: BenchTarget, fid_samples: int) -> Callable[[BenchTarget], float] | None:
    """``score(t)``: FID of ``t.sample(fid_samples)`` as the pipeline is now; ``None`` if FID is off."""
    if fid_samples <= 0 or target.sample is None or target.real is None:
        return None
    from difcache.eval.features import bundled_extractor
    from difcache.eval.metrics import FIDAccumulator

    extractor = bundled_extractor()
    accumulator = FIDAccumulator(extractor.num_features)
    accumulator.add_real(extractor(target.real(fid_samples)))

    def score(t: BenchTarget) -> float:
        accumulator.reset()
        accumulator.add_fake(extractor(t.sample(fid_samples)))
        return accumulator.compute()

    return score


def _resetting(target: BenchTarget, remove: Callable[[], None] | None) -> BenchTarget:
    """``target`` whose calls first run the state reset the variant's remover carries (diffusers' hooks), so
    every call of the variant starts from a fresh cache state; ``target`` itself when there is none."""
    reset = getattr(remove, "reset", None)
    if reset is None:
        return target

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *args: (reset(), fn(*args))[1]

    return replace(target, call=wrap(target.call), sample=None if target.sample is None else wrap(target.sample))


def run_bench(
    target: BenchTarget,
    makers: Sequence[Callable[[BenchTarget], Variant]],
    repeats: int = 5,
    fid_samples: int = 0,
    progress: Callable[[str], None] = print,
) -> dict:
    """Run every variant on ``target``; returns a JSON-serialisable report (see the module docstring)."""
    from difcache.eval.metrics import psnr, ssim

    variants = [make(target) for make in makers]
    references = {seed: target.call(seed) for seed in target.seeds}
    full_flops = denoiser_flops(target, target.seeds[0])
    device = find_denoiser(target.pipe)[0].device
    uncached_peak = peak_call_memory(lambda: target.call(target.seeds[0]), device) / 2**20
    fid = _fid_scorer(target, fid_samples)
    uncached_fid = fid(target) if fid is not None else None
    rows: list[Row] = []
    timed: dict[str, Callable[[], Any]] = {"uncached": lambda: target.call(target.seeds[0])}
    applied: dict[str, tuple[Callable[[], None], BenchTarget]] = {}  # label -> (remover, target to time)

    def apply_for_timing(variant: Variant) -> None:
        remove = variant.apply()
        applied[variant.label] = (remove, _resetting(target, remove))  # built here, outside the timed call

    setup: dict[str, Callable[[], None]] = {}
    teardown: dict[str, Callable[[], None]] = {}
    skipped_units: dict[str, tuple[list, list[float]]] = {}
    for number, variant in enumerate(variants, 1):
        progress(f"[{number}/{len(variants)}] {variant.label}")
        row = Row(variant.label, variant.group, variant.setting)
        rows.append(row)
        alt = ALTERNATIVES.get(variant.group)
        if alt is not None and not alt.available():
            row.status = f"missing: pip install {alt.package}"
            continue
        try:
            remove = variant.apply()
            try:
                vt = _resetting(target, remove)
                outputs = {seed: vt.call(seed) for seed in target.seeds}
                row.ideal_speedup = full_flops / max(denoiser_flops(vt, target.seeds[0]), 1.0)
                row.peak_mib = peak_call_memory(partial(vt.call, target.seeds[0]), device) / 2**20
                row.fid = fid(vt) if fid is not None else None
                handle = getattr(find_denoiser(target.pipe)[0], "_difcache_cache", None)
                if handle is not None:
                    handle.reset_stats()
                    target.call(target.seeds[0])
                    stats = handle.stats()
                    row.store_mib = stats.peak_store_bytes / 2**20
                    units = list(handle._runtime.plan.scope.units)
                    skipped_units[variant.label] = (units, [u.skipped / max(stats.runs, 1) for u in stats.units])
            finally:
                remove()
        except Exception as err:  # reported in the table, never dropped
            row.status = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
            traceback.print_exc()
            continue
        row.psnr = sum(psnr(outputs[s], references[s]) for s in target.seeds) / len(target.seeds)
        row.ssim = sum(ssim(outputs[s], references[s]) for s in target.seeds) / len(target.seeds)
        timed[variant.label] = lambda v=variant: applied[v.label][1].call(target.seeds[0])
        setup[variant.label] = partial(apply_for_timing, variant)
        teardown[variant.label] = lambda v=variant: applied.pop(v.label)[0]()
    medians: dict[str, float] = {}
    if repeats > 0:  # repeats=0: quality and FLOPs only
        progress(f"timing {len(timed) - 1} variants, each paired with an uncached call, {repeats} rounds")
        medians, speedups = paired_speedups(timed, "uncached", repeats=repeats, setup=setup, teardown=teardown)
        for row in rows:
            if row.label in speedups:
                row.seconds = medians[row.label]
                row.measured_speedup = speedups[row.label]
    for label, (units, skipped) in skipped_units.items() if repeats > 0 else ():
        row = next(r for r in rows if r.label == label)
        times = time_units(units, lambda: target.call(target.seeds[0]), repeats=3)
        row.oracle_speedup = oracle_speedup(times, skipped)
        row.engine_efficiency = row.measured_speedup / row.oracle_speedup if row.measured_speedup else None
    return {
        "target": target.name,
        "steps": target.steps,
        "seeds": list(target.seeds),
        "repeats": repeats,
        "uncached_seconds": medians.get("uncached"),
        "uncached_peak_mib": uncached_peak,
        "uncached_fid": uncached_fid,
        "fid_samples": fid_samples if fid is not None else 0,
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "difcache": difcache.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "rows": [asdict(r) for r in rows],
    }


def markdown_table(report: dict) -> str:
    lines = [
        f"**{report['target']}**, {report['steps']} steps, seeds {report['seeds']}, "
        + (
            f"measured: median of {report['repeats']} (uncached, variant) pairs, uncached "
            f"{report['uncached_seconds']:.3f}s, "
            if report["uncached_seconds"] is not None
            else "not timed (--repeats 0), "
        )
        + f"{report['threads']} threads, torch {report['torch']}.",
        "",
        "| variant | measured | ideal | oracle | efficiency | PSNR dB | SSIM | FID | peak MiB | cache MiB | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x: float | None, fmt: str) -> str:
        return "—" if x is None else format(x, fmt)

    fid_note = (
        f" FID: bundled classifier features, {report['fid_samples']} samples vs as many rendered real images."
        if report.get("fid_samples")
        else ""
    )
    lines[0] += fid_note
    lines.append(
        f"| uncached | 1.00× | 1.00× | 1.00× | — | ∞ | 1.0000 | {f(report.get('uncached_fid'), '.2f')} | "
        f"{f(report.get('uncached_peak_mib'), '.1f')} | 0.0 | reference |"
    )
    for r in report["rows"]:
        lines.append(
            f"| {r['label']} | {f(r['measured_speedup'], '.2f')}× | {f(r['ideal_speedup'], '.2f')}× | "
            f"{f(r['oracle_speedup'], '.2f')}{'×' if r['oracle_speedup'] else ''} | "
            f"{f(r['engine_efficiency'], '.3f')} | "
            f"{f(r['psnr'], '.2f')} | {f(r['ssim'], '.4f')} | {f(r.get('fid'), '.2f')} | "
            f"{f(r.get('peak_mib'), '.1f')} | {f(r['store_mib'], '.1f')} | {r['status']} |"
        )
    comparison = matched_comparison(report)
    if comparison:
        lines += [
            "",
            "At matched ideal speedup: for each alternative, difcache's best PSNR among its rows at the same or a "
            "higher ideal speedup.",
            "",
            "| alternative | ideal | PSNR dB | best difcache at ≥ that ideal | ideal | PSNR dB | difcache higher |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in comparison:
            best = c["difcache"]
            lines.append(
                f"| {c['label']} | {c['ideal']:.2f}× | {c['psnr']:.2f} | {best['label'] if best else '— (none)'} | "
                f"{f(best and best['ideal'], '.2f')}{'×' if best else ''} | {f(best and best['psnr'], '.2f')} | "
                f"{'yes' if c['beaten'] else 'tie' if c['tie'] else '**no**'} |"
            )
    return "\n".join(lines + _margins_table(report))


_PSNR_TIE = 0.01  # dB: equal PSNR to two decimals, e.g. the same algorithm and schedule giving identical images


def matched_comparison(report: dict) -> list[dict]:
    """For every alternative row that ran: the difcache row with the highest PSNR among those whose ideal
    speedup is at least the alternative's, and whether that PSNR is higher (``beaten``) or equal within 0.01 dB
    (``tie``: the same algorithm and schedule give the same images).

    This is the issue's "at matched ideal speedup" test made mechanical: a difcache setting that is at least as
    fast in FLOPs and closer to the uncached output wins; no interpolation between settings is assumed.
    """
    ok = [r for r in report["rows"] if r["status"] == "ok" and r["ideal_speedup"] and r["psnr"] is not None]
    ours = [r for r in ok if r["group"].startswith("difcache")]
    out = []
    for alt in (r for r in ok if not r["group"].startswith("difcache")):
        faster = [r for r in ours if r["ideal_speedup"] >= alt["ideal_speedup"]]
        best = max(faster, key=lambda r: r["psnr"], default=None)
        out.append({
            "label": alt["label"], "ideal": alt["ideal_speedup"], "psnr": alt["psnr"],
            "difcache": None if best is None else
            {"label": best["label"], "ideal": best["ideal_speedup"], "psnr": best["psnr"]},
            "beaten": best is not None and best["psnr"] > alt["psnr"] + _PSNR_TIE,
            "tie": best is not None and abs(best["psnr"] - alt["psnr"]) <= _PSNR_TIE,
        })  # fmt: skip
    return out


AUTOTUNE_GROUP = "difcache:autotune"


def autotune_margins(report: dict) -> list[dict]:
    """For every autotune row and every other curve (each alternative, each hand-set difcache method): that
    curve's best PSNR among its rows at the same or less work (ideal speedup at least autotune's), and autotune's
    margin over it in dB (``None`` where no row of the curve does that little work). Issue 20's target is a
    margin of at least 1 dB over every curve."""
    ok = [r for r in report["rows"] if r["status"] == "ok" and r["ideal_speedup"] and r["psnr"] is not None]
    out = []
    for tuned in (r for r in ok if r["group"] == AUTOTUNE_GROUP):
        margins: dict[str, dict | None] = {}
        for group in sorted({r["group"] for r in ok} - {AUTOTUNE_GROUP}):
            rows = [r for r in ok if r["group"] == group and r["ideal_speedup"] >= tuned["ideal_speedup"]]
            best = max(rows, key=lambda r: r["psnr"], default=None)
            margins[group] = None if best is None else {
                "label": best["label"], "ideal": best["ideal_speedup"], "psnr": best["psnr"],
                "margin": tuned["psnr"] - best["psnr"],
            }  # fmt: skip
        out.append({"label": tuned["label"], "ideal": tuned["ideal_speedup"], "psnr": tuned["psnr"],
                    "measured": tuned["measured_speedup"], "margins": margins})  # fmt: skip
    return out


def _margins_table(report: dict) -> list[str]:
    """Two tables, one row per compared curve and one column per autotune budget: autotune's margin in dB over
    the curve's best setting at the same or less work, then measured speedups (autotune's in the header)."""
    rows = autotune_margins(report)
    if not rows:
        return []
    groups = sorted({g for r in rows for g in r["margins"]})
    head = ["curve", *(f"{r['label']} ({r['ideal']:.2f}×, {r['psnr']:.2f} dB)" for r in rows)]
    margins = [[g, *("—" if r["margins"][g] is None else f"{r['margins'][g]['margin']:+.2f}" for r in rows)]
               for g in groups]  # fmt: skip
    lines = [
        "",
        "autotune against each curve's best PSNR at the same or less work (ideal speedup at least autotune's): "
        "margin in dB (— where no setting of that curve does that little work).",
        "",
        markdown_rows(head, margins),
    ]
    if all(r["measured"] is None for r in rows):
        return lines
    measured = {row["label"]: row["measured_speedup"] for row in report["rows"]}
    speeds = [["autotune", *(_speedup(r["measured"]) for r in rows)]]
    speeds += [[g, *(_speedup(None if r["margins"][g] is None else measured.get(r["margins"][g]["label"]))
                     for r in rows)] for g in groups]  # fmt: skip
    return lines + [
        "",
        "Wall time: measured speedup of autotune (first row) and of each curve's setting compared above.",
        "",
        markdown_rows(["curve", *(r["label"] for r in rows)], speeds),
    ]


def markdown_rows(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table of ``header`` and ``rows`` (cells already formatted; short rows are padded)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([*row, *[""] * (len(header) - len(row))]) + " |" for row in rows]
    return "\n".join(lines)


def _speedup(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def pareto_points(rows: list[dict], x: str) -> tuple[dict[str, list[tuple[float, float]]], float | None]:
    """The plotted ``(speedup, PSNR)`` points per curve, and where identical outputs (infinite PSNR) are drawn
    (``None`` if there are none): 5 dB above the best finite PSNR rounded up to 5 dB, so a finite point is never
    drawn over or clipped."""
    rows = [r for r in rows if r["status"] == "ok" and r[x] is not None and r["psnr"] is not None]
    finite = [r["psnr"] for r in rows if math.isfinite(r["psnr"])]
    cap = 5 * math.ceil(max(finite, default=55.0) / 5) + 5
    groups: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append((r[x], r["psnr"] if math.isfinite(r["psnr"]) else cap))
    return groups, (cap if len(finite) < len(rows) else None)


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The ``(speedup, PSNR)`` points no other point beats on both, by increasing speedup."""
    best: list[tuple[float, float]] = []
    for point in sorted(points, key=lambda p: (-p[0], -p[1])):  # fastest first; keep what beats all faster ones
        if not best or point[1] > best[-1][1]:
            best.append(point)
    return best[::-1]


def pareto_plot(report: dict, path: str | Path, x: str = "ideal_speedup") -> None:
    """Speedup vs PSNR: per method / alternative, a line through its best settings (the Pareto frontier) and
    its other settings as faint markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    groups, cap = pareto_points(report["rows"], x)
    colours = plt.get_cmap("tab20").colors  # more groups than the default cycle's 10 colours
    for number, (group, points) in enumerate(sorted(groups.items())):
        colour, marker = colours[number % 20], "o" if group.startswith("difcache") else "s"
        best = frontier(points)
        ax.plot([p[0] for p in best], [p[1] for p in best], "-" if marker == "o" else "--", marker=marker,
                label=group, color=colour)  # fmt: skip
        dominated = [p for p in points if p not in best]
        if dominated:  # a swept curve's other settings: there, but not what the curve can do
            ax.plot([p[0] for p in dominated], [p[1] for p in dominated], marker, color=colour, alpha=0.3, ms=4)
    ax.set_xlabel(x.replace("_", " ") + " (×)")
    ax.set_ylabel("PSNR vs uncached (dB)" if cap is None else f"PSNR vs uncached (dB; identical drawn at {cap:.0f})")
    ax.set_title(f"{report['target']}\nspeed vs fidelity, {report['steps']} steps", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the plot: never over a curve
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    (out / "bench.md").write_text(markdown_table(report) + "\n")
    try:
        pareto_plot(report, out / "pareto_ideal.png", "ideal_speedup")
        pareto_plot(report, out / "pareto_measured.png", "measured_speedup")
    except ImportError:
        print("matplotlib is not installed: no Pareto plot (pip install matplotlib).")
    return out
