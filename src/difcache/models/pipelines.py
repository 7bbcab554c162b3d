"""Pipelines for the bundled models: small ``DiffusionPipeline`` subclasses that use diffusers' models and
schedulers the standard way (``set_timesteps`` once, ``scheduler.step`` once per step, progress bar,
``maybe_free_model_hooks``), so difcache's real code path runs on them.

* :class:`ShapesDiTPipeline`: class-conditional pixel-space ``DiTTransformer2DModel`` trained with rectified
  flow, sampled with ``FlowMatchEulerDiscreteScheduler``; classifier-free guidance is *batched* (cond and
  null-class halves in one call), as in diffusers' ``DiTPipeline``.
* :class:`ShapesVideoPipeline`: class-conditional pixel-space ``WanTransformer3DModel`` on short clips; the
  class is given as a learned "text" embedding; guidance is *sequential* (two denoiser calls per step inside
  ``cache_context("cond")``/``("uncond")``), as in diffusers' ``WanPipeline``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class ShapesDiTPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: DiTTransformer2DModel, scheduler: FlowMatchEulerDiscreteScheduler) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        generator: torch.Generator | None = None,
        output_type: str = "pt",
    ) -> ImagePipelineOutput:
        """Images of the given classes; ``output_type="pt"`` gives ``[N, 3, H, W]`` in [0, 1], ``"pil"`` PIL."""
        config = self.transformer.config
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=self.device).reshape(-1)
        null = torch.full_like(labels, config.num_embeds_ada_norm)
        cfg = guidance_scale > 1.0
        shape = (len(labels), config.in_channels, config.sample_size, config.sample_size)
        x = randn_tensor(shape, generator=generator, device=self.device, dtype=self.transformer.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([x, x]) if cfg else x
            model_labels = torch.cat([labels, null]) if cfg else labels
            v = self.transformer(model_input, timestep=t.expand(len(model_input)), class_labels=model_labels).sample
            if cfg:
                v_cond, v_uncond = v.chunk(2)
                v = v_uncond + guidance_scale * (v_cond - v_uncond)
            x = self.scheduler.step(v, t, x).prev_sample
        images = (x.float() / 2 + 0.5).clamp(0, 1)
        self.maybe_free_model_hooks()
        if output_type == "pil":
            return ImagePipelineOutput(images=self.numpy_to_pil(images.permute(0, 2, 3, 1).cpu().numpy()))
        return ImagePipelineOutput(images=images)


class ShapesVideoPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer"

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        class_embeddings: torch.Tensor,
    ) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self.class_embeddings = class_embeddings  # [num_classes + 1, tokens, text_dim]; the last row is "null"

    @property
    def components(self) -> dict[str, Any]:
        """diffusers' view of the ``__init__`` arguments; the embedding table is a tensor, not a registered module."""
        return {"transformer": self.transformer, "scheduler": self.scheduler, "class_embeddings": self.class_embeddings}

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor,
        num_frames: int = 8,
        size: int = 16,
        num_inference_steps: int = 30,
        guidance_scale: float = 3.0,
        generator: torch.Generator | None = None,
        output_type: str = "pt",
    ) -> ImagePipelineOutput:
        """Clips ``[N, 3, F, H, W]`` in [0, 1] of the given classes."""
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        table = self.class_embeddings.to(self.device, self.transformer.dtype)
        cond, uncond = table[labels], table[-1:].expand(len(labels), -1, -1)
        shape = (len(labels), self.transformer.config.in_channels, num_frames, size, size)
        x = randn_tensor(shape, generator=generator, device=self.device, dtype=self.transformer.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        for t in self.progress_bar(self.scheduler.timesteps):
            timestep = t.expand(len(labels))
            with self.transformer.cache_context("cond"):
                v = self.transformer(x, timestep=timestep, encoder_hidden_states=cond, return_dict=False)[0]
            if guidance_scale > 1.0:
                with self.transformer.cache_context("uncond"):
                    v_uncond = self.transformer(x, timestep=timestep, encoder_hidden_states=uncond, return_dict=False)[
                        0
                    ]
                v = v_uncond + guidance_scale * (v - v_uncond)
            x = self.scheduler.step(v, t, x).prev_sample
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=(x.float() / 2 + 0.5).clamp(0, 1))
