"""A FLUX denoising loop without text encoders or VAE: the part of ``FluxPipeline`` a cache interacts with.

Used by the engine benchmark, where encoders and VAE would only add time that no cache touches, and by tests
that need a transformer of a chosen size driven by a real scheduler (``set_timesteps``/``step`` per call).
Build the transformer with :func:`flux_transformer` (:func:`difcache.models.tiny.tiny_denoiser` at the engine
benchmark's "tiny but not trivial" size).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from difcache.models.tiny import tiny_denoiser


def flux_transformer(
    num_layers: int = 4,
    num_single_layers: int = 8,
    heads: int = 4,
    head_dim: int = 32,
    channels: int = 64,
    seed: int = 0,
) -> FluxTransformer2DModel:
    """A random-weight FLUX transformer of the given size (defaults: the engine benchmark's)."""
    return tiny_denoiser(
        "flux",
        seed,
        in_channels=channels,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=heads * head_dim,
        pooled_projection_dim=heads * head_dim,
        axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),
    )
class FluxLoop:
    """Callable like a pipeline: ``loop(steps, seed)`` returns the final latents."""

    def __init__(self, transformer: FluxTransformer2DModel, image_tokens: int = 256, text_tokens: int = 32) -> None:
        self.transformer = transformer
        self.scheduler = FlowMatchEulerDiscreteScheduler()
        self.image_tokens, self.text_tokens = image_tokens, text_tokens
        config = transformer.config
        self._channels, self._text_dim, self._pooled_dim = (
            config.in_channels,
            config.joint_attention_dim,
            config.pooled_projection_dim,
        )

    @torch.no_grad()
    def __call__(self, num_inference_steps: int = 50, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, self.image_tokens, self._channels, generator=g)
        text = torch.randn(1, self.text_tokens, self._text_dim, generator=g)
        pooled = torch.randn(1, self._pooled_dim, generator=g)
        side = int(self.image_tokens**0.5)
        img_ids = torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(), indexing="ij"), -1
        )
        img_ids = img_ids.reshape(-1, 3).float()
        txt_ids = torch.zeros(self.text_tokens, 3)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            velocity = self.transformer(
                hidden_states=x,
                encoder_hidden_states=text,
                pooled_projections=pooled,
                timestep=(t / 1000).expand(1),
                img_ids=img_ids,
                txt_ids=txt_ids,
                return_dict=False,
            )[0]
            x = self.scheduler.step(velocity, t, x).prev_sample
        return x
