"""Quality metrics that need no downloaded weights: PSNR, SSIM, FID (torchmetrics) and temporal flickering.

Conventions are the ones the caching papers use (TeaCache, TaylorSeer, DeepCache evaluations):

* images are float ``[N, C, H, W]`` in [0, 1] (any leading dims: videos ``[B, F, C, H, W]`` are scored per
  frame); ``uint8`` inputs are divided by 255;
* **PSNR** ``10 log10(1 / MSE)`` per image with data range 1, then averaged over images (``inf`` for an image
  equal to its reference, so the mean is ``inf`` if any image is);
* **SSIM**: 11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03, per image, averaged. Images smaller than
  11 px get the largest odd window that fits, with σ scaled in proportion, so 8×8 test images still work;
* **FID**: ``torchmetrics.image.fid.FrechetInceptionDistance`` on features from a :class:`FeatureExtractor`
  (Inception when torch-fidelity and its weights are present, else the bundled shape classifier; see
  :mod:`difcache.eval.features`). Features are extracted once per sample and fed to FID objects through an
  identity module, so one pass gives FID against real data *and* against the uncached samples;
* **temporal flickering** as VBench computes it: frames quantised to 8 bits, the mean absolute difference of
  consecutive frames, ``(255 - mean MAE) / 255`` per video. VBench first keeps only static videos (a RAFT
  filter that needs weights); without it this is *not* the VBench score, and reports say so.

PSNR and SSIM use torchmetrics' functional implementations (they import without torchvision).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance

from difcache.errors import DifcacheError


def as_images(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32 ``[N, C, H, W]`` in [0, 1]: leading dims are flattened, ``uint8`` is divided by 255."""
    if x.dim() < 3:
        raise DifcacheError(f"Expected images [..., C, H, W], got shape {tuple(x.shape)}.")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    x = x.reshape(-1, *x.shape[-3:])
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = as_images(a), as_images(b)
    if a.shape != b.shape:
        raise DifcacheError(
            f"Cannot compare images of shapes {tuple(a.shape)} and {tuple(b.shape)}: "
            "compare samples of the same seeds, sizes and frame counts."
        )
    return a, b


def psnr_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image (or frame) of ``a`` against ``b``, data range 1; ``inf`` where they are equal."""
    a, b = _pair(a, b)
    return peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM of each image (or frame) of ``a`` against ``b``: Gaussian window 11, σ 1.5 (smaller for tiny images)."""
    a, b = _pair(a, b)
    side = min(a.shape[-2:])
    kernel = min(11, side if side % 2 else side - 1)
    if kernel < 3:
        raise DifcacheError(f"SSIM needs images of at least 3×3 pixels, got {tuple(a.shape[-2:])}.")
    sigma = 1.5 * kernel / 11
    return structural_similarity_index_measure(
        a, b, data_range=1.0, kernel_size=kernel, sigma=sigma, reduction="none"
    ).reshape(-1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) of ``a`` against ``b``; ``inf`` if any image equals its reference exactly."""
    return float(psnr_per_image(a, b).mean())


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image SSIM of ``a`` against ``b``."""
    return float(ssim_per_image(a, b).mean())


def temporal_flickering(videos: torch.Tensor) -> torch.Tensor:
    """VBench's temporal-flickering score of each video ``[B, F, C, H, W]`` (or one ``[F, C, H, W]``), in [0, 1].

    Frames are quantised to 8 bits as a saved video would be; 1.0 means no change between frames. This is the
    formula only: VBench also drops non-static videos with a RAFT filter first, which needs its weights.
    """
    if videos.dim() == 4:
        videos = videos.unsqueeze(0)
    if videos.dim() != 5 or videos.shape[1] < 2:
        raise DifcacheError(f"Expected videos [B, F, C, H, W] with F >= 2, got shape {tuple(videos.shape)}.")
    frames = videos if videos.dtype == torch.uint8 else (videos.float().clamp(0, 1) * 255).round()
    frames = frames.float()
    mae = (frames[:, 1:] - frames[:, :-1]).abs().mean(dim=(2, 3, 4))  # [B, F-1]
    return (255.0 - mae.mean(dim=1)) / 255.0


class _Identity(torch.nn.Module):
    """Passes precomputed features through, so FID objects can be fed features instead of images."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class FIDAccumulator:
    """FID of several sample sets against one fixed set, from features (``[N, d]``), via torchmetrics.

    ``add_real`` once (all chunks), then per candidate set: ``add_fake`` its chunks, ``compute()``, ``reset()``.
    The real statistics survive ``reset()``.
    """

    def __init__(self, num_features: int) -> None:
        # Scoring runs on the main process only: never wait for other ranks in compute().
        self.metric = FrechetInceptionDistance(
            feature=_Identity(num_features), reset_real_features=False, sync_on_compute=False
        )
        self.metric.eval()

    def add_real(self, features: torch.Tensor) -> None:
        self.metric.update(features.detach().cpu().double(), real=True)

    def add_fake(self, features: torch.Tensor) -> None:
        self.metric.update(features.detach().cpu().double(), real=False)

    @property
    def num_real(self) -> int:
        return int(self.metric.real_features_num_samples)

    def compute(self) -> float:
        """The FID (squared Fréchet distance of the two Gaussians); needs at least 2 samples on each side."""
        if self.num_real < 2 or int(self.metric.fake_features_num_samples) < 2:
            raise DifcacheError("FID needs at least 2 samples on each side; generate more (--num-samples).")
        return float(self.metric.compute())

    def reset(self) -> None:
        self.metric.reset()


def fid_from_features(real: Iterable[torch.Tensor], fake: Iterable[torch.Tensor]) -> float:
    """FID between two feature sets given as chunks ``[n, d]`` (convenience for one pair)."""
    acc: FIDAccumulator | None = None
    for chunk in real:
        acc = acc or FIDAccumulator(chunk.shape[-1])
        acc.add_real(chunk)
    if acc is None:
        raise DifcacheError("FID needs real features; got none.")
    for chunk in fake:
        acc.add_fake(chunk)
    return acc.compute()
