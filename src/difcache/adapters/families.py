"""Adapters for the diffusers model families difcache supports.

Unit names were read from diffusers 0.42 block classes; each is a sub-module whose output the block gates
or adds afterwards, so caching it and recomputing the gate every step is what FORA and TaylorSeer do. FLUX and
HunyuanVideo single-stream blocks have no single such sub-module: their unit is the output of ``proj_out`` over
the attention and MLP branches (a composite unit), as in the official TaylorSeer-FLUX and -HunyuanVideo code.
"""

from __future__ import annotations

from difcache.adapters.registry import block_adapter, register_adapter
from difcache.adapters.unet import unet_adapter

_BASIC = {"attn1": "attn", "attn2": "cross_attn", "ff": "ffn"}  # BasicTransformerBlock (DiT, PixArt, UNet)
# FLUX / HunyuanVideo single-stream blocks: one pre-gate unit, proj_out(cat(attn, act_mlp(proj_mlp(x)))), as the
# official TaylorSeer caches `total`; the block still applies its current gate and residual (adapters docstring).
_SINGLE_STREAM = ("attn", "proj_mlp", "act_mlp", "proj_out")

register_adapter("DiTTransformer2DModel", block_adapter("dit", ["transformer_blocks"], _BASIC))
register_adapter("PixArtTransformer2DModel", block_adapter("pixart", ["transformer_blocks"], _BASIC))
register_adapter(
    "SD3Transformer2DModel",
    block_adapter("sd3", ["transformer_blocks"], {"attn": "attn", "attn2": "attn", "ff": "ffn", "ff_context": "ffn"}),
)
for model_cls, family in (("FluxTransformer2DModel", "flux"), ("HunyuanVideoTransformer3DModel", "hunyuanvideo")):
    register_adapter(
        model_cls,
        block_adapter(
            family,
            ["transformer_blocks", "single_transformer_blocks"],
            {"attn": "attn", "ff": "ffn", "ff_context": "ffn"},
            composite_groups={"single_transformer_blocks": _SINGLE_STREAM},
        ),
    )
register_adapter(
    "WanTransformer3DModel",
    block_adapter("wan", ["blocks"], {"attn1": "attn", "attn2": "cross_attn", "ffn": "ffn"}),
)
register_adapter(
    "CogVideoXTransformer3DModel",
    block_adapter("cogvideox", ["transformer_blocks"], {"attn1": "attn", "ff": "ffn"}),
)
register_adapter(
    "LTXVideoTransformer3DModel",
    block_adapter("ltx", ["transformer_blocks"], {"attn1": "attn", "attn2": "cross_attn", "ff": "ffn"}),
)
# UNets: transformer-block units (FORA, TaylorSeer) plus the skip branches (DeepCache). UNet2DModel has no
# BasicTransformerBlocks, so only skip branches.
register_adapter(
    "UNet2DConditionModel",
    unet_adapter("unet", block_adapter("unet", [], _BASIC, block_classes=["BasicTransformerBlock"])),
)
register_adapter("UNet2DModel", unet_adapter("unet2d"))
