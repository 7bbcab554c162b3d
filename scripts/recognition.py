"""Are the bundled models' samples recognisable? The bundled shape classifier judges every image or frame.

    python scripts/recognition.py video                 # 32 clips (8 per class), 30 steps, CFG 3.0
    python scripts/recognition.py video --guidance 6
    python scripts/recognition.py dit                   # the image DiT judged the same way, for reference
    python scripts/recognition.py video --grid docs/models/video_samples_16.png   # also save 16 of the samples
    python scripts/recognition.py video --sparse psa=0.25   # with block-sparse attention (topk=D, psa=D, topp=P)

A frame counts as recognised when the classifier (trained on 32×32 still images of the same four shapes)
names the class that was asked for **and** the frame holds one shape of the data's size: its foreground share
lies within the range of rendered frames' (``ShapeClassifier.recognised_frames`` with a reference). The size
check matters: the classifier labels a blank frame a circle or a triangle, and a blob filling the frame as
whatever it resembles, so on its own it counts degenerate samples as shapes (the first version of this check
did, and reported 44.9 % for the video model then shipped where this one finds 21 %). Rendered video frames
pass 100 % of the time (128 clips of the current data); chance is at most 25 %. Printed: the share of frames
recognised, overall and per class, and the classifier-only share for comparison.

``--sparse`` samples with :func:`difcache.apply_sparse_attention` (block 32, tiles 2×4×4, the first 20 % of steps
dense, as ``scripts/bench_sparse.py video``): whether sparse attention keeps the samples recognisable, which
PSNR against dense samples alone does not say.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

import difcache
from difcache.models import CLASSES, load
from difcache.models.shapes import clip_frames, make_clips, make_images, to_uint8_grid


def _sparse_attention(pipe, spec: str):
    """``apply_sparse_attention`` for ``METHOD=VALUE`` (``topk=0.25``, ``psa=0.25``, ``topp=0.9``); a no-op for ''."""
    if not spec:
        return contextlib.nullcontext()
    method, _, value = spec.partition("=")
    if method not in ("topk", "psa", "topp") or not value:
        raise SystemExit(f"--sparse takes topk=DENSITY, psa=DENSITY or topp=P, got {spec!r}.")
    budget = {"p" if method == "topp" else "density": float(value)}
    return difcache.apply_sparse_attention(pipe, method, block_size=32, tile=(2, 4, 4), warmup_steps=0.2,
                                           dense_layers=0, **budget)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["video", "dit"], nargs="?", default="video")
    parser.add_argument("--samples", type=int, default=32, help="clips or images, cycling through the classes")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the pipeline's)")
    parser.add_argument("--grid", type=str, default="", help="write the first 16 samples here (PNG, a row each)")
    parser.add_argument("--sparse", type=str, default="", help="video: METHOD=VALUE, topk=D, psa=D or topp=P")
    args = parser.parse_args()
    pipe, classifier = load(args.model), load("classifier")
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(args.samples) % len(CLASSES)
    options = {} if args.guidance is None else {"guidance_scale": args.guidance}
    with _sparse_attention(pipe, args.sparse):
        out = pipe(labels.tolist(), num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0),
                   **options).images  # fmt: skip
    clips = out if out.dim() == 5 else out.unsqueeze(2)  # images as one-frame clips
    # rendered data of the model (500 clips or images) sets the range of shape sizes a frame may show
    if args.model == "video":
        reference = make_clips(500, seed=1)[0]
    else:
        reference = make_images(500, size=clips.shape[-1], seed=1)[0].unsqueeze(2)
    correct = classifier.recognised_frames(clips, labels, reference=(reference + 1) / 2).float()
    classifier_only = classifier.recognised_frames(clips, labels).float().mean()
    per_sample = correct.view(args.samples, -1).mean(1)
    unit = "frames" if clips.shape[2] > 1 else "images"
    guidance = options.get("guidance_scale", "default")
    sparse = f", sparse attention {args.sparse}" if args.sparse else ""
    print(f"{args.model}: {unit} recognised as the requested class: {correct.mean():.1%} ({args.samples} samples, "
          f"{args.steps} steps, CFG {guidance}{sparse}; classifier alone: {classifier_only:.1%})")  # fmt: skip
    for k, name in enumerate(CLASSES):
        print(f"  {name:9s} {per_sample[labels == k].mean():.1%}")
    if args.grid:
        to_uint8_grid(clip_frames(clips[:16]), clips.shape[2], upscale=3).save(args.grid)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
