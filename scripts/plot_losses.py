"""Plot the bundled models' training losses (``docs/models/<name>_loss.csv``) into one PNG for the model card.

    python scripts/plot_losses.py       # writes docs/models/loss_curves.png

The CSVs are written by ``scripts/train_bundled.py`` (an exponential moving average of the loss, every 50 steps;
resumed stages continue the step count). One panel per model, log-scaled loss.
"""

from __future__ import annotations

import csv
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "models"
MODELS = ("dit", "unet", "video", "classifier")
# The DiT's CSV holds only its second stage (written before resumed runs continued the step count).
TITLES = {"dit": "dit (second stage: steps 1001-6000)", "video": "video (2-frame clips, then 8 frames from 8001)"}


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODELS), figsize=(4 * len(MODELS), 3.2))
    for ax, name in zip(axes, MODELS, strict=True):
        with open(DOCS / f"{name}_loss.csv") as f:
            rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]
        ax.plot([s for s, _ in rows], [loss for _, loss in rows], linewidth=1.5)
        ax.set_yscale("log")
        ax.set_title(TITLES.get(name, name))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("training loss (EMA)")
    fig.tight_layout()
    out = DOCS / "loss_curves.png"
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
