"""Scoring the samples that :mod:`difcache.eval.generate` saved: one row per cache setting.

Runs on one process (the main one) and reads only the PNG files, so a score never depends on how many
processes generated the samples or on whether a run was resumed. Samples are read in chunks, so 50k samples
need no more memory than one chunk.

Images, per setting:
* ``fid``: FID against real data (the bundled models' procedural shapes, or a folder of images), with the
  extractor named in the report; the uncached row is the model's own FID;
* ``fid_vs_uncached``: FID against the uncached samples of the same seeds (how far caching moved the
  distribution; needs no real data);
* ``psnr``/``ssim`` against the uncached sample of the same seed (the papers' first numbers);
* ``clip``: CLIP score against the prompts (or class names), when a local CLIP is given.

Videos, per setting: ``psnr``/``ssim`` per frame against the uncached video of the same seed, the
temporal-flickering formula (not VBench: no static-video filter), and ``frame_fid_vs_uncached`` when an
extractor is given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from difcache.errors import DifcacheError
from difcache.eval.clip import ClipScorer
from difcache.eval.features import FeatureExtractor
from difcache.eval.generate import SampleStore, Setting, load_sample, setting_summary
from difcache.eval.metrics import FIDAccumulator, psnr_per_image, ssim_per_image, temporal_flickering
from difcache.eval.samplers import Item

ImageChunks = Callable[[], Iterator[torch.Tensor]]  # yields real images [n, C, H, W] in [0, 1]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_chunks(
    store: SampleStore, items: Sequence[Item], chunk: int = 64
) -> Iterator[tuple[list[Item], torch.Tensor]]:
    """``(items, uint8 samples)`` in chunks; a missing file is an error that says how to make it."""
    for start in range(0, len(items), chunk):
        part = list(items[start : start + chunk])
        missing = store.missing(part)
        if missing:
            raise DifcacheError(
                f"{len(missing)} samples of {store.setting.label!r} are missing (first: {store.path(missing[0])}); "
                "run the generation step again (it resumes) before scoring."
            )
        yield part, torch.stack([load_sample(store.path(item)) for item in part])


def folder_images(path: str | Path, limit: int | None = None, chunk: int = 64) -> ImageChunks:
    """Real images from a folder (sorted by name), as chunks in [0, 1], for the FID reference."""
    folder = Path(path)
    if not folder.is_dir():
        raise DifcacheError(f"--reference {folder}: not a folder of images.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if len(files) < 2:
        kinds = ", ".join(IMAGE_SUFFIXES)
        raise DifcacheError(f"--reference {folder}: found {len(files)} images ({kinds}); FID needs at least 2.")

    def chunks() -> Iterator[torch.Tensor]:
        for start in range(0, len(files), chunk):
            arrays = [np.asarray(Image.open(p).convert("RGB")) for p in files[start : start + chunk]]
            sizes = {a.shape for a in arrays}
            if len(sizes) > 1:
                raise DifcacheError(f"--reference {folder}: images of different sizes {sorted(sizes)}; resize them.")
            yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0

    return chunks


def _texts(items: Sequence[Item], class_names: Sequence[str] | None, template: str) -> list[str]:
    out = []
    for item in items:
        if isinstance(item.condition, str):
            out.append(item.condition)
        elif item.condition is not None and class_names:
            out.append(template.format(class_names[int(item.condition)]))
        else:
            raise DifcacheError("CLIP score needs prompts or class names; this model has neither.")
    return out


def score_images(
    out: str | Path,
    settings: Sequence[Setting],
    items: Sequence[Item],
    extractor: FeatureExtractor | None = None,
    reference: ImageChunks | None = None,
    clip: ClipScorer | None = None,
    class_names: Sequence[str] | None = None,
    clip_template: str = "a photo of a {}",
    chunk: int = 64,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One row per setting (see the module docstring); ``settings[0]`` must be the uncached baseline."""
    from tqdm import tqdm

    if settings[0].method is not None:
        raise DifcacheError("The first setting must be the uncached baseline (method None).")
    baseline = SampleStore(out, settings[0])
    vs_real = vs_uncached = None
    if extractor is not None:
        if reference is not None:
            vs_real = FIDAccumulator(extractor.num_features)
            for real in tqdm(reference(), desc="reference features", disable=not progress, leave=False):
                vs_real.add_real(extractor(real))
        vs_uncached = FIDAccumulator(extractor.num_features)
        for _, samples in read_chunks(baseline, items, chunk):
            vs_uncached.add_real(extractor(samples))
    rows = []
    for setting in tqdm(settings, desc="scoring", disable=not progress, leave=False):
        store = SampleStore(out, setting)
        row: dict[str, Any] = {**setting.to_dict(), "n": len(items), **setting_summary(store, items)}
        psnr_sum = ssim_sum = 0.0
        for accumulator in (vs_real, vs_uncached):
            if accumulator is not None:
                accumulator.reset()
        if clip is not None:
            clip.reset()
        for (part, samples), (_, refs) in zip(read_chunks(store, items, chunk), read_chunks(baseline, items, chunk),
                                              strict=True):  # fmt: skip
            if setting.method is not None:
                psnr_sum += float(psnr_per_image(samples, refs).sum())
                ssim_sum += float(ssim_per_image(samples, refs).sum())
            if extractor is not None:
                features = extractor(samples)
                if vs_real is not None:
                    vs_real.add_fake(features)
                if setting.method is not None:
                    vs_uncached.add_fake(features)
            if clip is not None:
                clip.update(samples, _texts(part, class_names, clip_template))
        row["fid"] = vs_real.compute() if vs_real is not None else None
        row["fid_vs_uncached"] = vs_uncached.compute() if vs_uncached is not None and setting.method else None
        row["psnr"] = psnr_sum / len(items) if setting.method is not None else None
        row["ssim"] = ssim_sum / len(items) if setting.method is not None else None
        row["clip"] = clip.compute() if clip is not None else None
        rows.append(row)
    return rows


def score_videos(
    out: str | Path,
    settings: Sequence[Setting],
    items: Sequence[Item],
    extractor: FeatureExtractor | None = None,
    chunk: int = 16,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One row per setting for videos ``[F, C, H, W]`` (see the module docstring); none of it is VBench."""
    from tqdm import tqdm

    if settings[0].method is not None:
        raise DifcacheError("The first setting must be the uncached baseline (method None).")
    baseline = SampleStore(out, settings[0])
    frame_fid = None
    if extractor is not None:
        frame_fid = FIDAccumulator(extractor.num_features)
        for _, videos in read_chunks(baseline, items, chunk):
            frame_fid.add_real(extractor(videos.flatten(0, 1)))
    rows = []
    for setting in tqdm(settings, desc="scoring", disable=not progress, leave=False):
        store = SampleStore(out, setting)
        row: dict[str, Any] = {**setting.to_dict(), "n": len(items), **setting_summary(store, items)}
        flicker = psnr_sum = ssim_sum = 0.0
        frames = 0
        if frame_fid is not None:
            frame_fid.reset()
        for (_, videos), (_, refs) in zip(read_chunks(store, items, chunk), read_chunks(baseline, items, chunk),
                                          strict=True):  # fmt: skip
            if videos.dim() != 5:
                raise DifcacheError(f"{store.dir} holds images, not videos; score it with score_images.")
            flicker += float(temporal_flickering(videos).sum())
            frames += videos.shape[0] * videos.shape[1]
            if setting.method is not None:
                psnr_sum += float(psnr_per_image(videos, refs).sum())
                ssim_sum += float(ssim_per_image(videos, refs).sum())
                if frame_fid is not None:
                    frame_fid.add_fake(extractor(videos.flatten(0, 1)))
        cached = setting.method is not None
        row["temporal_flickering"] = flicker / len(items)
        row["psnr"] = psnr_sum / frames if cached else None
        row["ssim"] = ssim_sum / frames if cached else None
        row["frame_fid_vs_uncached"] = frame_fid.compute() if frame_fid is not None and cached else None
        rows.append(row)
    return rows
