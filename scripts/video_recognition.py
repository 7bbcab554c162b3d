"""Are the bundled video model's samples recognisable? The bundled shape classifier judges every frame.

    python scripts/video_recognition.py                # 32 clips (8 per class), 30 steps, CFG 3.0

The classifier (trained on 32×32 still images of the same four shapes) labels rendered video frames, upscaled
to 32×32, correctly 100 % of the time; here it labels frames *sampled from noise* by the video model. Printed:
the share of frames it assigns to the class the clip was asked for, overall and per class. Chance is 25 %.
"""

from __future__ import annotations

import argparse

import torch

from difcache.models import CLASSES, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=3.0)
    args = parser.parse_args()
    pipe, classifier = load("video"), load("classifier")
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(args.clips) % len(CLASSES)
    clips = pipe(labels.tolist(), num_inference_steps=args.steps, guidance_scale=args.guidance,
                 generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    correct = classifier.recognised_frames(clips, labels).float()
    per_class = correct.view(args.clips, -1).mean(1)
    print(f"frames recognised as the requested class: {correct.mean():.1%} ({args.clips} clips, {args.steps} steps, "
          f"CFG {args.guidance})")  # fmt: skip
    for k, name in enumerate(CLASSES):
        print(f"  {name:9s} {per_class[labels == k].mean():.1%}")


if __name__ == "__main__":
    main()
