"""CLIP score from a local CLIP checkpoint, with torchmetrics' ``CLIPScore``.

``CLIPScore`` = ``max(100 · mean cos(image embedding, text embedding), 0)`` (torchmetrics' definition). The model
is loaded from a folder saved with ``CLIPModel.save_pretrained`` / ``CLIPProcessor.save_pretrained`` and never
downloaded. With transformers >= 5, ``get_image_features`` returns a model output instead of a tensor, which
torchmetrics 1.9 cannot use (Lightning-AI/torchmetrics#3407); :class:`_Embeddings` returns the projected
embeddings as tensors, so both versions work.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from difcache.errors import DifcacheError


class _Embeddings(torch.nn.Module):
    """A CLIP model whose ``get_image_features``/``get_text_features`` always return ``[N, d]`` tensors."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: object) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class ClipScorer:
    """Accumulates torchmetrics' CLIP score over chunks of (images in [0, 1], texts)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel, CLIPProcessor

        path = Path(path)
        if not (path / "config.json").is_file():
            raise DifcacheError(
                f"--clip {path}: no CLIP checkpoint there (config.json missing). Save one on a machine with access: "
                "CLIPModel.from_pretrained('openai/clip-vit-large-patch14').save_pretrained(DIR) and the same for "
                "CLIPProcessor."
            )
        try:
            model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
            processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise DifcacheError(f"--clip {path}: cannot load CLIP model and processor: {err}") from None
        self.path, self.device = path, torch.device(device)
        self.metric = CLIPScore(model_name_or_path=lambda: (_Embeddings(model), processor), sync_on_compute=False)

    def update(self, images: torch.Tensor, texts: Sequence[str]) -> None:
        """Add images ``[N, 3, H, W]`` in [0, 1] (or uint8) and their prompts."""
        x = images if images.dtype == torch.uint8 else (images.clamp(0, 1) * 255).round().to(torch.uint8)
        self.metric.update(list(x.to(self.device)), list(texts))  # the model runs where the images are

    def compute(self) -> float:
        return float(self.metric.compute())

    def reset(self) -> None:
        self.metric.reset()
