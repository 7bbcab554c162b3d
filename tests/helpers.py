"""Helpers shared by tests in several folders (``tests/`` is on ``sys.path``, see ``pyproject.toml``)."""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel


class FluxLoop:
    """The part of FluxPipeline difcache interacts with: a transformer, a scheduler and the denoising loop."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
        ).eval()  # fmt: skip
        self.scheduler = FlowMatchEulerDiscreteScheduler()

    @torch.no_grad()
    def __call__(self, num_inference_steps: int = 8, seed: int = 0, tokens: int = 16) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, tokens, 8, generator=g)
        enc, pooled = torch.randn(1, 4, 16, generator=g), torch.randn(1, 16, generator=g)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            v = self.transformer(
                hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=(t / 1000).expand(1),
                img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(4, 3), return_dict=False,
            )[0]  # fmt: skip
            x = self.scheduler.step(v, t, x).prev_sample
        return x
