"""Feature extractors for FID, and which one a run used.

FID is only as meaningful as its feature space, so every report names the extractor:

* ``inception``: torchmetrics' FID Inception-v3 (the 2048-d pool features every paper reports). It needs
  ``torch-fidelity`` (which needs a working ``torchvision``) and the weights file
  ``weights-inception-2015-12-05-6726825d.pth`` in ``$TORCH_HOME/hub/checkpoints`` (or ``--inception-weights``).
  Only these numbers are comparable with published FIDs.
* ``bundled``: the bundled shape classifier's 128-d features (``difcache.models.load("classifier")``), trained
  on the same procedural shapes as the bundled DiT and UNet. Offline, meaningful for the bundled models only,
  not comparable with any published number.
* ``random``: a randomly initialised conv net. For smoke tests of the plumbing; its numbers mean nothing, and
  reports say so in the extractor's description.

``auto`` picks Inception when it is usable, else the bundled classifier, and says why. torch-fidelity is never
imported when this module is imported (a broken torchvision would break ``import torchmetrics`` itself).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

from difcache.errors import DifcacheError
from difcache.eval.metrics import as_images

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
EXTRACTORS = ("auto", "inception", "bundled", "random")


class FeatureExtractor(torch.nn.Module):
    """Images (float ``[N, C, H, W]`` in [0, 1], or ``uint8``) to features ``[N, d]``, with a name that reports show.

    Args:
        body: the network; it receives images resized to ``input_size`` (if given) and mapped to ``value_range``,
            or quantised to ``uint8`` when ``value_range`` is ``"uint8"``.
        num_features: ``d``.
        name: short name for tables (``inception``, ``bundled``, ``random``).
        description: one line that says what the numbers can be compared with.
    """

    def __init__(
        self,
        body: torch.nn.Module,
        num_features: int,
        name: str,
        description: str,
        input_size: int | None = None,
        value_range: tuple[float, float] | str = (0.0, 1.0),
    ) -> None:
        super().__init__()
        self.body = body.eval()
        self.num_features = num_features
        self.name, self.description = name, description
        self.input_size, self.value_range = input_size, value_range

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.body.parameters(), torch.empty(0)).device
        x = as_images(images.to(device))
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True)
        if self.value_range == "uint8":
            x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        else:
            low, high = self.value_range
            x = x * (high - low) + low
        return self.body(x).reshape(len(x), -1).float().cpu()


def inception_status(weights: str | Path | None = None) -> tuple[bool, str]:
    """Whether the Inception extractor can run offline here, and if not, what is missing and how to fix it."""
    if importlib.util.find_spec("torch_fidelity") is None:
        return False, "torch-fidelity is not installed (pip install torch-fidelity; it needs a working torchvision)"
    if importlib.util.find_spec("torchvision") is None:
        return False, "torchvision is not installed (torch-fidelity needs it)"
    path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not path.is_file():
        return False, (
            f"the Inception weights {path} are missing: download {INCEPTION_FILE} from torch-fidelity's v0.2.0 "
            "GitHub release on a machine with internet, copy it there or pass --inception-weights PATH"
        )
    return True, f"Inception-v3 weights at {path}"


def inception_extractor(weights: str | Path | None = None) -> FeatureExtractor:
    """torchmetrics' FID Inception-v3 (2048-d), from local weights only; raises with the fix when unusable."""
    ok, why = inception_status(weights)
    if not ok:
        raise DifcacheError(f"Inception FID is unavailable: {why}. Or use --features bundled (offline).")
    from torchmetrics.image.fid import FrechetInceptionDistance

    path = str(weights) if weights else str(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE)
    inception = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=path).inception
    return FeatureExtractor(
        inception, 2048, "inception", f"Inception-v3 pool3 (torchmetrics/torch-fidelity, {path}): comparable with "
        "published FID at the same sample count and reference set", value_range="uint8",
    )  # fmt: skip


def bundled_extractor() -> FeatureExtractor:
    """The bundled shape classifier's 128-d features (weights shipped in the package)."""
    from difcache.models import load

    classifier = load("classifier")
    body = _Features(classifier)
    return FeatureExtractor(
        body, 128, "bundled", "bundled shape-classifier features (128-d, offline): comparable only between runs "
        "on the bundled models, never with published FID", input_size=32, value_range=(-1.0, 1.0),
    )  # fmt: skip


def random_extractor(seed: int = 0, width: int = 16) -> FeatureExtractor:
    """A random-weight conv net (smoke tests only: its FIDs are meaningless, and the description says so)."""
    generator = torch.Generator().manual_seed(seed)
    body = torch.nn.Sequential(
        torch.nn.Conv2d(3, width, 3, stride=2, padding=1),
        torch.nn.SiLU(),
        torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        torch.nn.SiLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )
    with torch.no_grad():
        for p in body.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return FeatureExtractor(
        body, 2 * width, "random", "RANDOM conv-net features: smoke test of the plumbing only, the FID values "
        "mean nothing", value_range=(-1.0, 1.0),
    )  # fmt: skip


class _Features(torch.nn.Module):
    def __init__(self, classifier: torch.nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)


def check_extractor(name: str, inception_weights: str | Path | None = None) -> None:
    """Raise now, before any sampling, if ``--features NAME`` cannot work here (nothing is loaded)."""
    from difcache.models import available

    if name not in (*EXTRACTORS, "none"):
        raise DifcacheError(f"Unknown --features {name!r}; choose one of {', '.join(EXTRACTORS)} or none.")
    inception_ok, why = inception_status(inception_weights) if name in ("inception", "auto") else (False, "")
    if name == "inception" and not inception_ok:
        raise DifcacheError(f"Inception FID is unavailable: {why}. Or use --features bundled (offline).")
    if (name == "bundled" or (name == "auto" and not inception_ok)) and "classifier" not in available():
        raise DifcacheError(
            ("" if name == "bundled" else f"Inception is unavailable ({why}) and ")
            + "the bundled classifier's weights are missing (train them with `python scripts/train_bundled.py "
            "classifier`). Or pass --features none (no FID), or --features random for a smoke test."
        )


def resolve_extractor(
    name: str = "auto", inception_weights: str | Path | None = None, log=print
) -> FeatureExtractor | None:
    """The extractor for ``--features NAME``; ``auto`` prefers Inception, then the bundled classifier.

    Returns ``None`` for ``"none"`` (no FID). ``log`` receives one line saying which extractor is used and, for
    ``auto``, why Inception was not.
    """
    if name == "none":
        return None
    if name == "inception":
        extractor = inception_extractor(inception_weights)
    elif name == "bundled":
        extractor = _bundled_or_raise()
    elif name == "random":
        extractor = random_extractor()
    elif name == "auto":
        ok, why = inception_status(inception_weights)
        if ok:
            extractor = inception_extractor(inception_weights)
        else:
            log(f"FID features: Inception unavailable ({why}); using the bundled shape classifier instead.")
            extractor = _bundled_or_raise(f"Inception is unavailable ({why}) and ")
    else:
        raise DifcacheError(f"Unknown --features {name!r}; choose one of {', '.join(EXTRACTORS)} or none.")
    log(f"FID features: {extractor.description}")
    return extractor


def _bundled_or_raise(prefix: str = "") -> FeatureExtractor:
    try:
        return bundled_extractor()
    except DifcacheError as err:
        message = (
            f"{prefix}the bundled classifier cannot be loaded: {err} Or pass --features none (no FID), or "
            "--features random for a smoke test whose FIDs mean nothing."
        )
        raise DifcacheError(message[0].upper() + message[1:]) from None
