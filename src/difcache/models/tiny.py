"""Tiny, offline, random-weight models of the real diffusers classes, one per supported family.

Tiny models are a feature: they prove difcache's adapters, hooks and CFG handling on the code users run
(``DiTPipeline``, ``PixArtAlphaPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``, ``WanPipeline``,
``HunyuanVideoPipeline``, ``CogVideoXPipeline``, ``LTXPipeline``, ``StableDiffusionPipeline``,
``StableDiffusionXLPipeline``) in seconds, offline. Nothing is downloaded: text encoders and tokenizers are left
out and ``prompt_embeds`` are passed instead; VAEs are tiny.

    pipe = difcache.models.tiny("flux")
    out = pipe(**tiny_call_kwargs("flux", cfg=True, batch_size=2, num_inference_steps=4))
    model = tiny_denoiser("flux", num_layers=4, num_single_layers=8)   # the denoiser alone, other sizes

One builder: :func:`tiny_denoiser` makes every denoiser from the table ``DENOISERS`` (config overrides welcome),
and :func:`tiny` puts it into its pipeline. ``CFG_MODE[family]`` says how the pipeline runs classifier-free
guidance: "batched" (cond and uncond in one denoiser call), "sequential" (two calls per step) or "true_cfg"
(FLUX: sequential, with negative embeds).
"""

from __future__ import annotations

from typing import Any

import diffusers as d
import torch

FAMILIES = ("dit", "pixart", "sd3", "flux", "wan", "hunyuanvideo", "cogvideox", "ltx", "sd15", "sdxl")
CFG_MODE = {
    "dit": "batched",
    "pixart": "batched",
    "sd3": "batched",
    "flux": "sequential",
    "wan": "sequential",
    "hunyuanvideo": "sequential",
    "cogvideox": "batched",
    "ltx": "batched",
    "sd15": "batched",
    "sdxl": "batched",
}

# family -> (denoiser class name in diffusers, its tiny config)
DENOISERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dit": ("DiTTransformer2DModel", dict(
        sample_size=8, in_channels=4, out_channels=8, patch_size=2, num_layers=4, num_attention_heads=2,
        attention_head_dim=8, num_embeds_ada_norm=1000, norm_num_groups=8,
    )),
    "pixart": ("PixArtTransformer2DModel", dict(
        sample_size=8, in_channels=4, out_channels=8, patch_size=2, num_layers=4, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=16, caption_channels=32, norm_num_groups=8,
    )),
    "sd3": ("SD3Transformer2DModel", dict(
        sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
    )),
    "flux": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(2, 2, 4),
    )),
    "wan": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=3, cross_attn_norm=True, rope_max_seq_len=32,
    )),
    "hunyuanvideo": ("HunyuanVideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4), guidance_embeds=False,
    )),
    "cogvideox": ("CogVideoXTransformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=3, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8,
    )),
    "ltx": ("LTXVideoTransformer3DModel", dict(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=16, num_layers=3, caption_channels=16,
    )),
    "sd15": ("UNet2DConditionModel", dict(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    )),
    "sdxl": ("UNet2DConditionModel", dict(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=4 * 6 + 16,
        transformer_layers_per_block=(1, 2),
    )),
}  # fmt: skip


def _check(family: str) -> None:
    if family not in DENOISERS:
        raise ValueError(f"Unknown family {family!r}; one of {FAMILIES}.")


def tiny_denoiser(family: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """The tiny random-weight denoiser of ``family`` (in eval mode), its config updated with ``overrides``."""
    _check(family)
    class_name, config = DENOISERS[family]
    torch.manual_seed(seed)
    return getattr(d, class_name)(**{**config, **overrides}).eval()


def tiny(family: str, seed: int = 0, **overrides: Any) -> d.DiffusionPipeline:
    """A real diffusers pipeline of ``family`` around :func:`tiny_denoiser` (deterministic for ``seed``; config
    ``overrides`` such as ``num_layers=28`` go to the denoiser).

    Components are put in eval mode, as ``from_pretrained`` does: constructed modules start in training mode,
    where DiT's class-label dropout would make every call different.
    """
    pipe = _assemble(family, tiny_denoiser(family, seed, **overrides))
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


tiny_pipeline = tiny  # the name the recipes and tests have long used


def _vae_2d(latent: int = 4) -> d.AutoencoderKL:
    return d.AutoencoderKL(
        block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=latent, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), sample_size=16,
        shift_factor=0.0,
    )  # fmt: skip


def _ddim() -> d.DDIMScheduler:
    return d.DDIMScheduler(steps_offset=1, clip_sample=False)


def _assemble(family: str, denoiser: torch.nn.Module) -> d.DiffusionPipeline:
    if family == "dit":
        return d.DiTPipeline(denoiser, _vae_2d(), _ddim())
    if family == "pixart":
        return d.PixArtAlphaPipeline(None, None, _vae_2d(), denoiser, _ddim())
    if family == "sd3":
        return d.StableDiffusion3Pipeline(
            denoiser, d.FlowMatchEulerDiscreteScheduler(), _vae_2d(), None, None, None, None, None, None
        )
    if family == "flux":
        return d.FluxPipeline(
            d.FlowMatchEulerDiscreteScheduler(), _vae_2d(latent=4), None, None, None, None, denoiser
        )
    if family == "wan":
        vae = d.AutoencoderKLWan(
            base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
            latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_temporal=1, scale_factor_spatial=2,
        )  # fmt: skip
        return d.WanPipeline(None, None, vae, d.FlowMatchEulerDiscreteScheduler(), denoiser)
    if family == "hunyuanvideo":
        vae = d.AutoencoderKLHunyuanVideo(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
            down_block_types=("HunyuanVideoDownBlock3D",) * 2, up_block_types=("HunyuanVideoUpBlock3D",) * 2,
            layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=2, temporal_compression_ratio=4,
        )  # fmt: skip
        return d.HunyuanVideoPipeline(None, None, denoiser, vae, d.FlowMatchEulerDiscreteScheduler(), None, None)
    if family == "cogvideox":
        vae = d.AutoencoderKLCogVideoX(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), norm_num_groups=2,
            down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
            layers_per_block=1, temporal_compression_ratio=4,
        )  # fmt: skip
        return d.CogVideoXPipeline(None, None, vae, denoiser, d.CogVideoXDDIMScheduler())
    if family == "ltx":
        vae = d.AutoencoderKLLTXVideo(
            in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
            decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
            upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False,
            patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False,
        )  # fmt: skip
        return d.LTXPipeline(d.FlowMatchEulerDiscreteScheduler(), vae, None, None, denoiser)
    if family == "sd15":
        return d.StableDiffusionPipeline(
            _vae_2d(), None, None, denoiser, _ddim(), None, None, requires_safety_checker=False
        )
    if family == "sdxl":
        return d.StableDiffusionXLPipeline(_vae_2d(), None, None, None, None, denoiser, _ddim())
    raise ValueError(f"Unknown family {family!r}; one of {FAMILIES}.")


def tiny_call_kwargs(
    family: str, *, cfg: bool = True, batch_size: int = 1, num_inference_steps: int = 4, seed: int = 0
) -> dict[str, Any]:
    """Keyword arguments for ``pipe(**kwargs)``: offline embeddings, small sizes, a seeded generator."""
    g = torch.Generator().manual_seed(1000 + seed)
    gen = torch.Generator().manual_seed(seed)
    b = batch_size
    common: dict[str, Any] = {"num_inference_steps": num_inference_steps, "generator": gen}
    scale = 4.0 if cfg else 1.0
    if family == "dit":
        return {**common, "class_labels": list(range(b)), "guidance_scale": scale, "output_type": "np"}
    if family == "pixart":
        emb, mask = torch.randn(b, 6, 32, generator=g), torch.ones(b, 6)
        return {
            **common, "prompt_embeds": emb, "prompt_attention_mask": mask, "negative_prompt_embeds": torch.zeros_like(emb),
            "negative_prompt_attention_mask": mask, "guidance_scale": scale, "height": 16, "width": 16,
            "use_resolution_binning": False, "output_type": "np", "negative_prompt": None,
        }  # fmt: skip
    if family == "sd3":
        emb, pooled = torch.randn(b, 6, 32, generator=g), torch.randn(b, 32, generator=g)
        return {
            **common, "prompt_embeds": emb, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": torch.zeros_like(emb),
            "negative_pooled_prompt_embeds": torch.zeros_like(pooled), "guidance_scale": scale, "height": 16,
            "width": 16, "output_type": "np",
        }  # fmt: skip
    if family == "flux":
        emb, pooled = torch.randn(b, 6, 32, generator=g), torch.randn(b, 32, generator=g)
        kwargs = {**common, "prompt_embeds": emb, "pooled_prompt_embeds": pooled, "height": 16, "width": 16}
        if cfg:
            kwargs |= {"negative_prompt_embeds": torch.zeros_like(emb), "negative_pooled_prompt_embeds": -pooled}
        return {**kwargs, "true_cfg_scale": scale, "guidance_scale": 1.0, "output_type": "np"}
    if family == "wan":
        emb = torch.randn(b, 6, 32, generator=g)
        return {
            **common, "prompt_embeds": emb, "negative_prompt_embeds": torch.zeros_like(emb), "guidance_scale": scale,
            "height": 16, "width": 16, "num_frames": 5, "output_type": "np",
        }  # fmt: skip
    if family == "hunyuanvideo":
        emb, pooled, mask = torch.randn(b, 6, 16, generator=g), torch.randn(b, 8, generator=g), torch.ones(b, 6)
        kwargs = {
            **common, "prompt_embeds": emb, "pooled_prompt_embeds": pooled, "prompt_attention_mask": mask,
            "height": 16, "width": 16, "num_frames": 5, "output_type": "np", "guidance_scale": 1.0,
        }  # fmt: skip
        if cfg:
            kwargs |= {
                "negative_prompt_embeds": torch.zeros_like(emb), "negative_pooled_prompt_embeds": torch.zeros_like(pooled),
                "negative_prompt_attention_mask": mask, "true_cfg_scale": scale,
            }  # fmt: skip
        return kwargs
    if family == "cogvideox":
        emb = torch.randn(b, 8, 16, generator=g)
        return {
            **common, "prompt_embeds": emb, "negative_prompt_embeds": torch.zeros_like(emb), "guidance_scale": scale,
            "height": 16, "width": 16, "num_frames": 9, "output_type": "np", "use_dynamic_cfg": False,
        }  # fmt: skip
    if family == "ltx":
        emb, mask = torch.randn(b, 6, 16, generator=g), torch.ones(b, 6)
        return {
            **common, "prompt_embeds": emb, "prompt_attention_mask": mask, "negative_prompt_embeds": torch.zeros_like(emb),
            "negative_prompt_attention_mask": mask, "guidance_scale": scale, "height": 32, "width": 32,
            "num_frames": 9, "output_type": "np",
        }  # fmt: skip
    if family == "sdxl":
        emb, pooled = torch.randn(b, 6, 16, generator=g), torch.randn(b, 16, generator=g)
        return {
            **common, "prompt_embeds": emb, "pooled_prompt_embeds": pooled, "guidance_scale": scale,
            "negative_prompt_embeds": torch.zeros_like(emb), "negative_pooled_prompt_embeds": torch.zeros_like(pooled),
            "height": 16, "width": 16, "output_type": "np",
        }  # fmt: skip
    if family == "sd15":
        emb = torch.randn(b, 6, 16, generator=g)
        return {
            **common, "prompt_embeds": emb, "negative_prompt_embeds": torch.zeros_like(emb), "guidance_scale": scale,
            "height": 16, "width": 16, "output_type": "np",
        }  # fmt: skip
    raise ValueError(f"Unknown family {family!r}; one of {FAMILIES}.")


def output_of(result: Any) -> torch.Tensor:
    """The pipeline's images or frames as a float tensor."""
    images = getattr(result, "images", None)
    if images is None:
        images = result.frames
    return torch.as_tensor(images).float()
