"""The bundled models: their configs, how to build them, and how to load the shipped weights offline.

Weights live in ``difcache/models/weights/<name>.safetensors`` (fp16) with ``<name>.json`` (config and training
facts), made by ``scripts/train_bundled.py``. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
    WanTransformer3DModel,
)
from diffusers.models.transformers.transformer_wan import WanTimeTextImageEmbedding
from safetensors.torch import load_file

from difcache.errors import DifcacheError
from difcache.models.pipelines import ShapesDiTPipeline, ShapesVideoPipeline
from difcache.models.shapes import CLASSES, clip_frames, foreground_share

WEIGHTS = Path(__file__).parent / "weights"
NAMES = ("dit", "unet", "video", "classifier")


class ShapeClassifier(torch.nn.Module):
    """A small CNN over 32×32 shapes; ``features`` (128-d) are the offline FID's feature space."""

    def __init__(self, num_classes: int = len(CLASSES), width: int = 32) -> None:
        super().__init__()
        layers, channels = [], 3
        for out in (width, 2 * width, 4 * width):
            layers += [torch.nn.Conv2d(channels, out, 3, padding=1), torch.nn.GroupNorm(8, out), torch.nn.SiLU()]
            layers += [torch.nn.Conv2d(out, out, 3, padding=1, stride=2), torch.nn.SiLU()]
            channels = out
        self.body = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(channels, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 128]`` features of images in [-1, 1]."""
        return self.body(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def recognised_frames(
        self, clips: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per frame ``[N * F]``: is the frame of clip ``[N, 3, F, H, W]`` (in [0, 1]) a ``labels[n]``?

        The classifier must name that class (frames are upscaled, nearest, to the 32×32 it was trained on). With
        ``reference`` (rendered clips of the same data, in [0, 1]) the frame must also hold one shape of the
        data's size: its foreground share (:func:`~difcache.models.shapes.foreground_share`) within the range
        of the reference frames', widened by 10 %. Without that, a blank frame counts as a circle or a triangle
        (the classifier labels plain colours so) and a blob filling the frame as whatever it resembles.
        """
        frames = clip_frames(clips)
        predicted = self(torch.nn.functional.interpolate(frames * 2 - 1, size=32, mode="nearest")).argmax(1)
        correct = predicted == labels.to(predicted.device).repeat_interleave(clips.shape[2])
        if reference is not None:
            share = foreground_share(frames)
            bounds = foreground_share(clip_frames(reference)).aminmax()
            correct &= (share >= 0.9 * bounds.min) & (share <= 1.1 * bounds.max)
        return correct


# The bundled diffusers models: class and constructor arguments. Loading builds the class from the config saved
# beside the weights instead, so weights and architecture always match.
_ARCHITECTURES: dict[str, tuple[type, dict[str, Any]]] = {
    "dit": (DiTTransformer2DModel, dict(
        sample_size=16, in_channels=3, out_channels=3, patch_size=2, num_layers=6, num_attention_heads=4,
        attention_head_dim=32, num_embeds_ada_norm=len(CLASSES), norm_num_groups=32,
    )),
    "unet": (UNet2DModel, dict(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64, 64, 96),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8,
    )),
    "video": (WanTransformer3DModel, dict(
        patch_size=(2, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=3, out_channels=3,
        text_dim=32, freq_dim=64, ffn_dim=512, num_layers=4, cross_attn_norm=True, rope_max_seq_len=64,
    )),
}  # fmt: skip


class PositionChannelsConv3d(torch.nn.Conv3d):
    """Wan's patch embedding, fed the clip plus three channels holding each pixel's (frame, row, column) in
    [-1, 1].

    Wan sees positions only through RoPE, which is relative; a shape drawn at a fixed place in a tiny frame
    needs absolute ones (DiT adds sin-cos position embeddings for the same reason).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = [torch.linspace(-1, 1, n, device=x.device, dtype=x.dtype) for n in x.shape[2:]]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij")).expand(len(x), -1, -1, -1, -1)
        return super().forward(torch.cat([x, grid], dim=1))


class PooledTextTimeEmbedding(WanTimeTextImageEmbedding):
    """Wan's condition embedder with the pooled text added to the time embedding, as SD3 and FLUX add their
    pooled text projection.

    Wan alone sees the text only through cross-attention; the class then never reaches the adaLN modulation
    that DiT conditions on, and the small video model learned the class poorly (model card, attempt 5).
    """

    def __init__(self, dim: int, time_freq_dim: int, time_proj_dim: int, text_embed_dim: int) -> None:
        super().__init__(dim, time_freq_dim, time_proj_dim, text_embed_dim)
        self.pooled_embedder = torch.nn.Linear(text_embed_dim, dim)

    def forward(
        self,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        timestep_seq_len: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        if encoder_hidden_states_image is not None or timestep_seq_len is not None:
            raise DifcacheError("The bundled video model takes neither image embeddings nor per-token timesteps.")
        temb = self.time_embedder(self.timesteps_proj(timestep).to(encoder_hidden_states.dtype))
        temb = temb + self.pooled_embedder(encoder_hidden_states.mean(dim=1))
        return temb, self.time_proj(self.act_fn(temb)), self.text_embedder(encoder_hidden_states), None


def _shapes_wan(model: WanTransformer3DModel) -> WanTransformer3DModel:
    """The bundled video model: a ``WanTransformer3DModel`` (so difcache's Wan paths run on it) whose patch
    embedding gets position channels and whose condition embedder gets the pooled class "text"."""
    config = model.config
    dim = config.num_attention_heads * config.attention_head_dim
    model.patch_embedding = PositionChannelsConv3d(
        config.in_channels + 3, dim, kernel_size=config.patch_size, stride=config.patch_size
    )
    model.condition_embedder = PooledTextTimeEmbedding(dim, config.freq_dim, dim * 6, config.text_dim)
    return model


_ADDITIONS = {"video": _shapes_wan}  # bundled models that are a diffusers class with submodules replaced


def _with_additions(name: str, model: torch.nn.Module) -> torch.nn.Module:
    return _ADDITIONS[name](model) if name in _ADDITIONS else model


def build(name: str) -> torch.nn.Module:
    """A freshly initialised model with the bundled architecture."""
    if name == "classifier":
        return ShapeClassifier()
    if name not in _ARCHITECTURES:
        raise DifcacheError(f"No bundled model {name!r}; available: {', '.join(NAMES)}.")
    cls, config = _ARCHITECTURES[name]
    return _with_additions(name, cls(**config))


def dit_pipeline(model: DiTTransformer2DModel) -> ShapesDiTPipeline:
    return ShapesDiTPipeline(model, FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000))


def unet_pipeline(model: UNet2DModel) -> DDIMPipeline:
    return DDIMPipeline(model, DDIMScheduler(num_train_timesteps=1000))


def video_pipeline(model: WanTransformer3DModel, class_embeddings: torch.Tensor) -> ShapesVideoPipeline:
    return ShapesVideoPipeline(model, FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000), class_embeddings)


def available() -> list[str]:
    """Bundled models whose weights are present."""
    return [n for n in NAMES if (WEIGHTS / f"{n}.safetensors").exists()]


def info(name: str) -> dict:
    """Config and training facts of a bundled model."""
    return json.loads(_path(name, ".json").read_text())


def _path(name: str, suffix: str) -> Path:
    if name not in NAMES:
        raise DifcacheError(f"No bundled model {name!r}; available: {', '.join(NAMES)}.")
    path = WEIGHTS / f"{name}{suffix}"
    if not path.exists():
        raise DifcacheError(
            f"The bundled {name!r} weights are missing ({path}); train them with "
            f"`python scripts/train_bundled.py {name}`."
        )
    return path


def load(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The bundled pipeline (``"dit"``, ``"unet"``, ``"video"``) or the classifier, loaded offline."""
    state = load_file(_path(name, ".safetensors"))
    extra = {k: state.pop(k) for k in [k for k in state if k == "class_embeddings"]}
    if name == "classifier":
        model = build(name)
    else:
        model = _with_additions(name, _ARCHITECTURES[name][0].from_config(info(name)["config"]))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model = model.to(device=device).eval()
    if dtype != torch.float32:  # diffusers warns on every dtype cast, even a no-op one: cast only when asked
        model = model.to(dtype=dtype)
    if name == "classifier":
        return model
    if name == "dit":
        pipe = dit_pipeline(model)
    elif name == "unet":
        pipe = unet_pipeline(model)
    else:
        pipe = video_pipeline(model, extra["class_embeddings"].float())
    return pipe.to(device)
