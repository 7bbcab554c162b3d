"""The picture of an autotune profile: where each candidate's forecast error falls, which steps the chosen one
computes, and how the offline proxy ranked the candidates against their final-output PSNR."""

from __future__ import annotations

import math
from pathlib import Path

from difcache.profile import Profile


def plot_profile(profile: Profile, path: str | Path) -> Path:
    """Write a three-panel PNG of ``profile`` (an ``autotune`` profile) to ``path``:

    1. per step, the proxy error of every candidate that was run (gain-weighted squared forecast error, relative
       to each unit's energy, averaged over units; a gap where the step is computed), the chosen one in bold;
    2. the chosen computed steps, one row per cached unit;
    3. each candidate's proxy against its calibration PSNR, one colour per scope (the proxy ranks candidates
       within a scope; across scopes only the final output compares).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = profile.data
    steps = profile.num_steps
    ran = [c for c in data.get("candidates", []) if c.get("calibration_psnr") is not None]
    fig, axes = plt.subplots(3, 1, figsize=(9, 9.5), gridspec_kw={"height_ratios": [3, 1.3, 3]})

    ax = axes[0]
    for c in sorted(ran, key=lambda c: c["name"] == data["name"]):
        chosen = c["name"] == data["name"]
        errors = [e if e > 0 else math.nan for e in c.get("step_error", [])]  # computed steps: a gap
        if errors:
            ax.semilogy(range(len(errors)), errors, lw=2.5 if chosen else 0.8, alpha=1 if chosen else 0.5,
                        color="black" if chosen else None, label=c["name"] if chosen else None)  # fmt: skip
    ax.set_title(
        f"{profile.model_class}, {steps} steps, asked {data.get('requested_speedup', 0):g}x: chosen "
        f"{data['name']} (ideal {data['ideal_speedup']:.2f}x, calibration PSNR {data['calibration_psnr']:.1f} dB)",
        fontsize=9,
    )
    ax.set_ylabel("proxy error per skipped step")
    ax.set_xlim(-0.5, steps - 0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)

    ax = axes[1]
    units = data["units"]
    grid = [[1.0 if s in set(u["compute"]) else 0.0 for s in range(steps)] for u in units]
    ax.imshow(grid, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("step (dark: computed)")
    ax.set_ylabel("unit")
    ticks = list(range(0, len(units), max(1, len(units) // 8)))  # whole units, at most ~8 labels
    ax.set_yticks(ticks)
    if data.get("ranges"):  # block ranges read better as their blocks
        ax.set_yticklabels([_range_label(*data["ranges"][t]) for t in ticks])
    ax.set_xlim(-0.5, steps - 0.5)

    ax = axes[2]
    for scope in sorted({c["scope"] for c in ran}):
        points = [(c["proxy"], c["calibration_psnr"]) for c in ran if c["scope"] == scope]
        points = [(x, y) for x, y in points if x > 0 and math.isfinite(y)]
        ax.scatter([p[0] for p in points], [p[1] for p in points], label=scope, s=18)
    for c in ran:
        if c["name"] == data["name"] and c["proxy"] > 0:
            ax.scatter([c["proxy"]], [c["calibration_psnr"]], s=120, facecolors="none", edgecolors="black")
    ax.set_xscale("log")
    ax.set_xlabel("offline proxy (lower is better; compare within a scope)")
    ax.set_ylabel("calibration PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _range_label(first: int, last: int) -> str:
    return f"block {first}" if first == last else f"blocks {first}-{last}"
