"""What the bundled video model can and cannot do: one-step denoising of real clips vs sampling from noise.

    python scripts/video_denoise_figure.py     # writes docs/models/video_denoise.png

Rows, top to bottom: four rendered clips (every other frame), then the model's one-step estimate of each clip
``x0 = x_t - t * v(x_t, t)`` from noise levels t = 0.3, 0.6 and 0.9 (same class embedding as the clip). Printed:
the mean squared error of each estimate. The samples drawn from pure noise are in ``video_samples.png``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from difcache.models import load
from difcache.models.shapes import clip_frames, make_clips, to_uint8_grid

OUT = Path(__file__).resolve().parents[1] / "docs" / "models" / "video_denoise.png"


@torch.no_grad()
def main() -> None:
    pipe = load("video")
    model, table = pipe.transformer, pipe.class_embeddings.float()
    clips, labels = make_clips(4, seed=123)
    gen = torch.Generator().manual_seed(0)
    rows = [clips[:, :, ::2]]
    for t in (0.3, 0.6, 0.9):
        xt = (1 - t) * clips + t * torch.randn(clips.shape, generator=gen)
        v = model(xt, timestep=torch.full((len(clips),), t * 1000), encoder_hidden_states=table[labels],
                  return_dict=False)[0]  # fmt: skip
        estimate = xt - t * v
        print(f"t = {t}: x0 estimate MSE {F.mse_loss(estimate, clips).item():.4f}")
        rows.append(estimate[:, :, ::2])
    frames = clip_frames(torch.cat(rows))  # [rows * clips * frames, 3, H, W]
    to_uint8_grid(frames, 4 * rows[0].shape[2], upscale=4).save(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
