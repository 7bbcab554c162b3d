"""diffusers attention processors that run sparse attention, one per model family, and where they go.

Each processor keeps the processor it replaces and hands every call that should stay dense (warm-up steps,
dense layers, calls outside a denoiser forward) to it unchanged; sparse calls compute q, k, v the way the
family's own processor does (projections, QK norms, rotary embeddings), then call
:meth:`SparseRuntime.attend`. They are installed with ``attn.set_processor`` on the self-attention modules
only (never on cross-attention to text, which is short) and the originals are put back on removal.

| family | modules | sequence | text |
|---|---|---|---|
| Wan (``WanTransformer3DModel``) | ``blocks[i].attn1`` | video | none (cross-attention) |
| LTX (``LTXVideoTransformer3DModel``) | ``transformer_blocks[i].attn1`` | video | none |
| HunyuanVideo | ``transformer_blocks[i].attn``, ``single_…[i].attn`` | [video, text] | padded |
| CogVideoX | ``transformer_blocks[i].attn1`` | [text, video] | all valid |
| FLUX (images, t = 1) | ``transformer_blocks[i].attn``, ``single_…[i].attn`` | [text, image] | all valid |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb

from difcache.attention.runtime import SparseRuntime
from difcache.errors import DifcacheError


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, H*D]`` -> ``[B, H, N, D]``."""
    return x.unflatten(2, (heads, -1)).transpose(1, 2)


def _merge(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, H, N, D]`` -> ``[B, N, H*D]``."""
    return x.transpose(1, 2).flatten(2, 3).to(dtype)


class SparseProcessor:
    """Base: dense calls go to the original processor; subclasses implement ``sparse``."""

    def __init__(self, original: Any, runtime: SparseRuntime, layer: int) -> None:
        self.original = original
        self.runtime = runtime
        self.layer = layer


class WanSparseProcessor(SparseProcessor):
    """Wan self-attention (``attn1``): RMS-normed q/k, interleaved rotary embedding, video tokens only."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if (
            encoder_hidden_states is not None
            or attention_mask is not None
            or self.runtime.dense_reason(self.layer)
        ):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        if rotary_emb is not None:
            query, key = _wan_rotary(query, *rotary_emb), _wan_rotary(key, *rotary_emb)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        out = _merge(self.runtime.attend(self.layer, q, k, v, 0), query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def _wan_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on ``[B, N, H, D]``: rotate interleaved (even, odd) pairs."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


class LTXSparseProcessor(SparseProcessor):
    """LTX self-attention (``attn1``): q/k RMS-normed over all heads, LTX's rotary embedding, video only."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        if (
            encoder_hidden_states is not None
            or attention_mask is not None
            or self.runtime.dense_reason(self.layer)
        ):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb as ltx_rotary

        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if image_rotary_emb is not None:
            query, key = ltx_rotary(query, image_rotary_emb), ltx_rotary(key, image_rotary_emb)
        q, k, v = (_heads(x, attn.heads) for x in (query, key, value))
        out = _merge(self.runtime.attend(self.layer, q, k, v, 0), query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


class HunyuanVideoSparseProcessor(SparseProcessor):
    """HunyuanVideo joint attention: ``[video, text]``, rotary on video only, text padding in the mask."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        if encoder_hidden_states is None or self.runtime.dense_reason(self.layer):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        n_video, n_text = hidden_states.shape[1], encoder_hidden_states.shape[1]
        joint = attn.add_q_proj is None
        x = torch.cat([hidden_states, encoder_hidden_states], dim=1) if joint else hidden_states
        query, key, value = (
            proj(x).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = torch.cat([apply_rotary_emb(query[:, :n_video], image_rotary_emb, sequence_dim=1),
                               query[:, n_video:]], dim=1)  # fmt: skip
            key = torch.cat([apply_rotary_emb(key[:, :n_video], image_rotary_emb, sequence_dim=1),
                             key[:, n_video:]], dim=1)  # fmt: skip
        if not joint:
            eq, ek, ev = (
                proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = (torch.cat(p, dim=1) for p in ((query, eq), (key, ek), (value, ev)))
        text_valid = None
        if attention_mask is not None:  # [B, 1, 1, N] bool over the joint sequence; video keys are all valid
            text_valid = attention_mask.reshape(attention_mask.shape[0], -1)[:, n_video:].to(torch.bool)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        out = _merge(self.runtime.attend(self.layer, q, k, v, 0, text_valid), query.dtype)
        video, text = out[:, :n_video], out[:, n_video : n_video + n_text]
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return video, text


class CogVideoXSparseProcessor(SparseProcessor):
    """CogVideoX joint attention: ``[text, video]``, rotary on the video part of q and k."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None
    ):
        if attention_mask is not None or self.runtime.dense_reason(self.layer):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        n_text = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        q, k, v = (_heads(proj(x), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            q = torch.cat([q[:, :, :n_text], apply_rotary_emb(q[:, :, n_text:], image_rotary_emb)], dim=2)
            k = torch.cat([k[:, :, :n_text], apply_rotary_emb(k[:, :, n_text:], image_rotary_emb)], dim=2)
        out = _merge(self.runtime.attend(self.layer, q, k, v, n_text), x.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out[:, n_text:], out[:, :n_text]


class FluxSparseProcessor(SparseProcessor):
    """FLUX joint attention: double blocks ``[text, image]`` from two streams, single blocks pre-concatenated."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        if attention_mask is not None or self.runtime.dense_reason(self.layer):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            eq, ek, ev = (x.unflatten(-1, (-1, attn.head_dim)) for x in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            query, key, value = (torch.cat(p, dim=1) for p in ((eq, query), (ek, key), (ev, value)))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        n_text = query.shape[1] - self.runtime.n_video
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        out = _merge(self.runtime.attend(self.layer, q, k, v, n_text), query.dtype)
        if encoder_hidden_states is None:
            return out
        text, image = out[:, :n_text], out[:, n_text:]
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())


# ---------------------------------------------------------------------------------------------- families
def _config(model: torch.nn.Module, name: str, default: Any = None) -> Any:
    return getattr(model.config, name, default)


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _wan_grid(model, args, kwargs):
    _, _, f, h, w = _hidden(args, kwargs).shape
    pt, ph, pw = _config(model, "patch_size")
    return f // pt, h // ph, w // pw


def _hunyuan_grid(model, args, kwargs):
    _, _, f, h, w = _hidden(args, kwargs).shape
    p, pt = _config(model, "patch_size"), _config(model, "patch_size_t", 1)
    return f // pt, h // p, w // p


def _cogvideox_grid(model, args, kwargs):
    _, f, _, h, w = _hidden(args, kwargs).shape  # CogVideoX takes [B, F, C, H, W]
    p, pt = _config(model, "patch_size"), _config(model, "patch_size_t") or 1
    return -(-f // pt), h // p, w // p


def _ltx_grid(model, args, kwargs):
    names = ("num_frames", "height", "width")
    if not all(kwargs.get(n) is not None for n in names):
        raise DifcacheError(
            "LTX sparse attention needs num_frames, height and width passed to the transformer."
        )
    p, pt = _config(model, "patch_size", 1), _config(model, "patch_size_t", 1)
    return kwargs["num_frames"] // pt, kwargs["height"] // p, kwargs["width"] // p


def _flux_grid(model, args, kwargs):
    ids = kwargs.get("img_ids")
    if ids is None:
        raise DifcacheError("FLUX sparse attention needs `img_ids` passed to the transformer by keyword.")
    ids = ids[0] if ids.dim() == 3 else ids
    rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1  # one host sync per forward
    if rows * cols != ids.shape[0]:
        raise DifcacheError(f"FLUX img_ids ({ids.shape[0]} tokens) do not form a {rows}x{cols} grid.")
    return 1, rows, cols


@dataclass(frozen=True)
class Family:
    """Where a model family's self-attention modules are, which processors they must have, how to get the grid."""

    name: str
    module_lists: tuple[str, ...]
    attribute: str
    processor_classes: tuple[str, ...]
    processor: type[SparseProcessor]
    grid: Callable[[torch.nn.Module, tuple, dict], tuple[int, int, int]]


FAMILIES = {
    "WanTransformer3DModel": Family(
        "wan", ("blocks",), "attn1", ("WanAttnProcessor", "WanAttnProcessor2_0"), WanSparseProcessor, _wan_grid
    ),
    "HunyuanVideoTransformer3DModel": Family(
        "hunyuanvideo", ("transformer_blocks", "single_transformer_blocks"), "attn",
        ("HunyuanVideoAttnProcessor2_0",), HunyuanVideoSparseProcessor, _hunyuan_grid,
    ),
    "CogVideoXTransformer3DModel": Family(
        "cogvideox", ("transformer_blocks",), "attn1", ("CogVideoXAttnProcessor2_0",), CogVideoXSparseProcessor,
        _cogvideox_grid,
    ),
    "LTXVideoTransformer3DModel": Family(
        "ltx", ("transformer_blocks",), "attn1", ("LTXVideoAttnProcessor", "LTXVideoAttentionProcessor2_0"),
        LTXSparseProcessor, _ltx_grid,
    ),
    "FluxTransformer2DModel": Family(
        "flux", ("transformer_blocks", "single_transformer_blocks"), "attn", ("FluxAttnProcessor",),
        FluxSparseProcessor, _flux_grid,
    ),
}  # fmt: skip


def family_of(model: torch.nn.Module) -> Family:
    """The :class:`Family` of ``model`` by class name (subclasses included); a clear error otherwise."""
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    supported = ", ".join(sorted(FAMILIES))
    raise DifcacheError(
        f"Sparse attention does not support {type(model).__name__}; supported denoisers: {supported}. "
        "Use apply_cache for other models, or open an issue to add this family's attention processor."
    )


def attention_modules(model: torch.nn.Module, family: Family) -> list[torch.nn.Module]:
    """The self-attention modules of ``model`` in execution order; checks their processors are the defaults."""
    modules = []
    for list_name in family.module_lists:
        for block in getattr(model, list_name, None) or []:
            attn = getattr(block, family.attribute, None)
            if attn is None:
                continue
            name = type(attn.processor).__name__
            if name not in family.processor_classes:
                raise DifcacheError(
                    f"{type(model).__name__}.{list_name} has attention processor {name}, not the default "
                    f"{family.processor_classes[0]}; sparse attention replaces only default processors. Call "
                    "remove() on whatever installed it (or model.set_default_attn_processor()) first."
                )
            modules.append(attn)
    if not modules:
        raise DifcacheError(
            f"Found no {family.attribute} modules in {type(model).__name__}; is it a {family.name}?"
        )
    return modules
