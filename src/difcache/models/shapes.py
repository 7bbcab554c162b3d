"""Procedural data for the bundled models: bold, large, coloured shapes, rendered with Pillow.

Small images of a few simple classes train quickly on a CPU and give samples a person can judge at a glance,
which is what the bundled models are for (real feature dynamics for caching, a recognisable demo). Everything
is seeded; the same seed gives the same images on every machine.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "cross")
_BACKGROUNDS = ((245, 245, 240), (25, 25, 35))


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        corners = [
            (math.cos(angle + k * math.pi / 2 + math.pi / 4), math.sin(angle + k * math.pi / 2 + math.pi / 4))
            for k in range(4)
        ]
        return [(cx + r * x, cy + r * y) for x, y in corners]
    if kind == "triangle":
        return [
            (
                cx + r * math.cos(angle + k * 2 * math.pi / 3 - math.pi / 2),
                cy + r * math.sin(angle + k * 2 * math.pi / 3 - math.pi / 2),
            )
            for k in range(3)
        ]
    # cross: a plus sign of two bars, width 2/5 of its span, rotated
    w = 0.4 * r
    arm = [(-r, -w), (-w, -w), (-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in arm]


def render(
    kind: str,
    size: int,
    rng: np.random.Generator,
    cx: float | None = None,
    cy: float | None = None,
    radius: tuple[float, float] = (0.28, 0.42),
) -> Image.Image:
    """One shape of class ``kind`` on a plain background; position, size, colour and rotation drawn from ``rng``."""
    scale = 4  # draw large, then downsample: anti-aliased edges
    big = size * scale
    background = _BACKGROUNDS[int(rng.integers(2))]
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    r = rng.uniform(*radius) * big
    cx = big / 2 + rng.uniform(-0.12, 0.12) * big if cx is None else cx * scale
    cy = big / 2 + rng.uniform(-0.12, 0.12) * big if cy is None else cy * scale
    hue = rng.uniform(0, 1)
    colour = tuple(int(255 * (0.5 + 0.5 * math.cos(2 * math.pi * (hue + k / 3)))) for k in range(3))
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, rng.uniform(-0.35, 0.35)), fill=colour)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def make_images(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``[n, 3, size, size]`` in [-1, 1] and their class labels ``[n]``, balanced over classes."""
    rng = np.random.default_rng(seed)
    labels = torch.arange(n) % len(CLASSES)
    images = np.stack([np.asarray(render(CLASSES[int(k)], size, rng)) for k in labels])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, labels


def make_clips(
    n: int,
    frames: int = 8,
    size: int = 16,
    seed: int = 0,
    radius: tuple[float, float] = (0.30, 0.40),
    max_speed: float = 0.3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` clips ``[n, 3, frames, size, size]`` in [-1, 1] of one shape moving in a straight line, and labels.

    The shape's radius is a fraction of ``size``; it moves at most ``max_speed`` pixels per frame along each axis.
    Large, slow shapes are what the small video model learns to draw in a CPU budget (model card).
    """
    rng = np.random.default_rng(seed)
    labels = torch.arange(n) % len(CLASSES)
    clips = []
    for k in labels:
        start, velocity = rng.uniform(0.35, 0.65, 2) * size, rng.uniform(-max_speed, max_speed, 2)
        state = rng.bit_generator.state
        frames_np = []
        for f in range(frames):
            rng.bit_generator.state = state  # same colour, size, rotation in every frame; only the position moves
            cx, cy = start + velocity * f
            frames_np.append(np.asarray(render(CLASSES[int(k)], size, rng, float(cx), float(cy), radius)))
        rng.bit_generator.state = state
        rng.uniform(size=8)  # advance past this clip's draws
        clips.append(np.stack(frames_np))
    x = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    return x, labels


def clip_frames(clips: torch.Tensor) -> torch.Tensor:
    """Clips ``[N, C, F, H, W]`` as frames ``[N * F, C, H, W]``, each clip's frames in order: the image tools
    (classifier, grids, per-image metrics) judge a video frame by frame."""
    return clips.movedim(2, 1).flatten(0, 1)


def foreground_share(frames: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """``[N]``: the share of each frame ``[N, 3, H, W]`` (in [0, 1]) whose colour differs from the median colour of
    the frame's border by more than ``threshold`` in some channel.

    Rendered shapes sit on a plain background, inside the frame, so this is the shape's area: a blank frame
    gives 0 and a blob filling the frame nearly 1. It lets a recognition check refuse frames that hold no
    shape of the data's size, which a classifier trained only on shapes still assigns to some class.
    """
    border = torch.cat([frames[..., 0, :], frames[..., -1, :], frames[..., 1:-1, 0], frames[..., 1:-1, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]
    return ((frames - background).abs().amax(dim=1) > threshold).float().mean(dim=(1, 2))


def to_uint8_grid(images: torch.Tensor, columns: int, upscale: int = 1) -> Image.Image:
    """Images in [-1, 1] or [0, 1] (``[N, 3, H, W]``) as one PNG-ready grid; ``upscale`` repeats each pixel
    (nearest-neighbour), so 16-pixel samples are large enough to judge by eye."""
    x = images.detach().float()
    if x.min() < 0:
        x = (x + 1) / 2
    x = (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    x = x.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w, _ = x.shape
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = x[i]
    return Image.fromarray(grid)
