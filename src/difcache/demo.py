"""``difcache demo``: the bundled DiT (and UNet), uncached and cached on the same seeds, side by side.

``difcache demo --autotune 3`` runs, on each model, the profile :func:`difcache.autotune` fits at 3x instead.
Prints the measured speedup (paired with uncached calls, as ``difcache bench`` times), the ideal (FLOPs) speedup
and PSNR/SSIM against the uncached images, and writes a PNG per model: uncached on top, cached below, the
amplified difference last.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

import difcache
from difcache.bench.timing import paired_ratios, spread
from difcache.eval.metrics import psnr, ssim
from difcache.models import CLASSES, available, load
from difcache.models.shapes import to_uint8_grid

TIMING_PAIRS = 5
AUTOTUNE_SECONDS = 75.0  # autotune's time for running candidates, per model (its default)
SPREAD_LIMIT = 0.25  # (max - min) / median of the pair ratios above which the timing is reported as untrustworthy


def _dit_call(pipe: Any, seeds: list[int], steps: int) -> torch.Tensor:
    labels = [s % len(CLASSES) for s in seeds]
    images = []
    for seed, label in zip(seeds, labels, strict=True):
        images.append(pipe([label], num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)).images)
    return torch.cat(images)


def _unet_call(pipe: Any, seeds: list[int], steps: int) -> torch.Tensor:
    images = []
    for seed in seeds:
        out = pipe(
            batch_size=1, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np"
        )
        images.append(torch.from_numpy(out.images).permute(0, 3, 1, 2))
    return torch.cat(images)


def _side_by_side(reference: torch.Tensor, cached: torch.Tensor, path: Path, title: str) -> None:
    diff = ((cached - reference).abs() * 4).clamp(0, 1)
    grid = to_uint8_grid(torch.cat([reference, cached, diff]), columns=len(reference))
    scale = max(1, 128 // reference.shape[-1])  # 16 px -> 128 px: big enough to judge by eye
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (grid.width + 130, grid.height + 24), "white")
    canvas.paste(grid, (130, 24))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill="black")
    row = grid.height // 3
    for i, label in enumerate(("uncached", "cached", "|diff| x4")):
        draw.text((4, 24 + i * row + row // 2 - 6), label, fill="black")
    canvas.save(path)


def _compare(
    name: str, pipe: Any, call: Any, method: str, apply: Callable[[], Any], seeds: list[int], steps: int, out: Path
) -> dict:
    pipe.set_progress_bar_config(leave=False, desc=f"{name}")
    reference = call(pipe, seeds, steps)
    handle = apply()
    cached = call(pipe, seeds, steps)
    stats = handle.stats()
    handle.remove()
    # Timed as `difcache bench` does: a warm-up each, then (uncached, cached) pairs back to back, median ratio.
    holder: dict[str, Any] = {}
    _, ratios = paired_ratios(
        {"uncached": lambda: call(pipe, seeds[:1], steps), "cached": lambda: call(pipe, seeds[:1], steps)},
        "uncached",
        repeats=TIMING_PAIRS,
        setup={"cached": lambda: holder.__setitem__("h", apply())},
        teardown={"cached": lambda: holder.pop("h").remove()},
    )
    result = {
        "model": name,
        "method": method,
        "config": stats.method,
        "measured_speedup": statistics.median(ratios["cached"]),
        "timing_spread": spread(ratios["cached"]),
        "ideal_speedup": stats.ideal_speedup,
        "psnr": psnr(cached, reference),
        "ssim": ssim(cached, reference),
    }
    title = (
        f"{name} {steps} steps, {method}: measured {result['measured_speedup']:.2f}x, ideal "
        f"{result['ideal_speedup']:.2f}x, PSNR {result['psnr']:.1f} dB, SSIM {result['ssim']:.3f}"
    )
    _side_by_side(reference, cached, out / f"demo_{name}.png", title)
    print(title)
    if result["timing_spread"] > SPREAD_LIMIT:
        print(
            f"  (the {TIMING_PAIRS} timed pairs disagree by {100 * result['timing_spread']:.0f}% of the median: the "
            "machine is busy, so the measured speedup is not to be trusted; the ideal speedup is)"
        )
    print(stats)
    return result


# The demo's DiT settings when none are given: the best TaylorSeer setting near 3.8x ideal speedup in the
# bundled-DiT benchmark (BENCHMARKS.md), in its Lite form (the authors' one-forecast-per-step variant), which on
# this small model is both faster and closer to uncached than forecasting every attention and MLP output.
# TaylorSeer's own default for DiT models is the official preset (N=4, O=4, W=2, per module); on this small
# model its order-4 arithmetic costs more than it saves.
DEMO_DIT_SETTINGS = {"taylorseer": {"interval": 5, "order": 2, "warmup": 4, "lite": True}}


def _applier(name: str, pipe: Any, method: str, settings: dict, autotune: float | None, steps: int):
    """What caches ``pipe`` for the demo: ``method`` with ``settings``, or a profile that ``difcache.autotune``
    fits at ``autotune``x on the model's calibration calls (seeds the demo's images do not use)."""
    if autotune is None:
        return method, lambda: difcache.apply_cache(pipe, method, **settings)
    from difcache.bench.targets import calibration_calls

    pipe.set_progress_bar_config(disable=True)
    profile = difcache.autotune(pipe, autotune, calibration_calls(name, 4), steps, seconds=AUTOTUNE_SECONDS)
    return f"autotune {autotune:g}x ({profile.data['name']})", lambda: difcache.apply_cache(pipe, profile=profile)


def run_demo(
    method: str = "taylorseer",
    unet_method: str = "deepcache",
    steps: int = 50,
    seeds: list[int] | None = None,
    out: str | Path = "outputs/demo",
    overrides: dict | None = None,
    include_unet: bool = True,
    autotune: float | None = None,
) -> list[dict]:
    """Run the demo; returns one result dict per model and writes ``demo_<model>.png`` under ``out``. With
    ``autotune`` (an ideal speedup), each model runs the profile ``difcache.autotune`` fits instead of a method
    (about a minute and a half per model on a 2-core CPU)."""
    seeds = list(seeds or [0, 1, 2, 3])
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = overrides or DEMO_DIT_SETTINGS.get(method, {})
    dit = load("dit")
    label, apply = _applier("dit", dit, method, settings, autotune, steps)
    results = [_compare("dit", dit, _dit_call, label, apply, seeds, steps, out_dir)]
    if include_unet:
        if "unet" in available():
            unet = load("unet")
            label, apply = _applier("unet", unet, unet_method, {}, autotune, steps)
            results.append(_compare("unet", unet, _unet_call, label, apply, seeds, steps, out_dir))
        else:
            print("The bundled UNet is not trained yet (python scripts/train_bundled.py unet): DiT only.")
    written = ", ".join(str(out_dir / f"demo_{r['model']}.png") for r in results)
    print(f"\nwrote {written}")
    return results
