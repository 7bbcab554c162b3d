"""Where the cacheable units of ComfyUI's native diffusion models are.

ComfyUI does not run diffusers models: its FLUX, Wan and SD/SDXL UNet are its own classes (``comfy.ldm``), with
their own block and sub-module names. Each gets a :class:`ComfyAdapter`: a difcache layout (built with
:func:`difcache.block_adapter`) and the *scope kind* that says how its units are cached. Read from ComfyUI's
source (``comfy/ldm/flux/layers.py``, ``comfy/ldm/wan/model.py``, ``comfy/ldm/modules/attention.py``):

* **FLUX** (``Flux``): ``double_blocks`` of ``DoubleStreamBlock(img, txt, vec, pe, ...) -> (img, txt)`` and
  ``single_blocks`` of ``SingleStreamBlock(x, vec, pe, ...) -> x``. Attention is computed inline (q/k/v from
  ``img_attn.qkv``, then ``attention(...)``, then ``img_attn.proj``), so no sub-module stands for the
  attention before its gate; ``img_mlp``/``txt_mlp`` are pre-gate, but caching them alone would leave the
  attention running. The unit is therefore the whole block, cached as its per-stream **residual**
  (output - input) and added to the current input on skipped steps (``scope="residual"``,
  :mod:`difcache.comfy.scope`). The blocks also write into their inputs in place (``txt +=``, ``x +=``), which
  that scope is built to survive. Gates are inside the residual, not recomputed: a documented deviation from
  TaylorSeer/FORA, which recompute gates on cached steps.
* **Wan** (``WanModel`` and subclasses): ``blocks`` of ``WanAttentionBlock`` whose ``self_attn`` and ``ffn``
  outputs are multiplied by their gates afterwards and ``cross_attn`` is added ungated, exactly the units of
  the official TaylorSeer Wan code. ComfyUI never writes into these outputs in place, so difcache's own module
  scope caches them (``scope="module"``).
* **SD 1.x/2.x, SDXL** (``UNetModel``): every ``BasicTransformerBlock`` (inside ``SpatialTransformer``) has
  ``attn1``, ``attn2`` and ``ff`` sub-modules, added to the residual stream (``x = n + x``), as in diffusers'
  UNet (``scope="module"``). Blocks whose attention a ComfyUI ``attn1``/``attn2`` replace-patch takes over do
  not call the sub-module; they are then simply computed.

The registry is keyed by class name and searched along the model's class hierarchy, like difcache's own. It is
kept apart from the diffusers adapters on purpose: these layouts are only correct with ComfyUI's sampler
driving the steps and, for FLUX, with the residual scope, so ``difcache.apply_cache`` must not pick them up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from difcache.adapters.layout import Layout
from difcache.adapters.registry import block_adapter
from difcache.errors import DifcacheError

SCOPES = ("module", "residual")


@dataclass(frozen=True)
class ComfyAdapter:
    """How to cache one ComfyUI model class.

    Attributes:
        layout: ``model -> Layout`` (family name, blocks, units).
        scope: ``"module"``: units are sub-modules whose outputs nothing writes into, cached by difcache's
            module scope; ``"residual"``: units are whole blocks, cached as per-stream residuals.
        streams: for ``"residual"``, block class name -> names of the forward arguments that are the block's
            streams, in the order the block returns them (one stream: the block returns a tensor).
    """

    layout: Callable[[torch.nn.Module], Layout]
    scope: str = "module"
    streams: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"ComfyAdapter.scope must be one of {list(SCOPES)}, got {self.scope!r}.")

    def streams_of(self, block: torch.nn.Module) -> tuple[str, ...]:
        name = type(block).__name__
        for cls_name, args in self.streams:
            if cls_name == name:
                return args
        raise DifcacheError(
            f"The residual scope does not know the streams of {name}; register the adapter with "
            f"streams=(('{name}', ('x',)),) naming the forward arguments the block returns, in order."
        )


_COMFY_ADAPTERS: dict[str, ComfyAdapter] = {}


def register_comfy_adapter(class_name: str, adapter: ComfyAdapter) -> None:
    """Register how to cache ComfyUI's model class ``class_name`` (replaces an earlier registration)."""
    _COMFY_ADAPTERS[class_name] = adapter


def registered_comfy_adapters() -> list[str]:
    return sorted(_COMFY_ADAPTERS)


def comfy_adapter(model: torch.nn.Module) -> ComfyAdapter:
    """The adapter of ``model`` (a ComfyUI ``diffusion_model``), found along its class hierarchy."""
    for cls in type(model).__mro__:
        adapter = _COMFY_ADAPTERS.get(cls.__name__)
        if adapter is not None:
            return adapter
    raise DifcacheError(
        f"difcache has no ComfyUI adapter for {type(model).__name__}. Supported: "
        f"{', '.join(registered_comfy_adapters())}. Register one with difcache.comfy.register_comfy_adapter("
        f"'{type(model).__name__}', ComfyAdapter(difcache.block_adapter(...)))."
    )


def comfy_layout(model: torch.nn.Module) -> tuple[Layout, ComfyAdapter]:
    """The layout of a ComfyUI diffusion model and its adapter; a layout without units is an error."""
    adapter = comfy_adapter(model)
    layout = adapter.layout(model)
    if not layout.units:
        raise DifcacheError(
            f"The ComfyUI adapter for {type(model).__name__} found no cacheable units (no blocks under the expected "
            "attribute names); nothing would be cached. Check the model class or register a matching adapter."
        )
    return layout, adapter


_FLUX_GROUPS = ["double_blocks", "single_blocks"]
_UNET_UNITS = {"attn1": "attn", "attn2": "cross_attn", "ff": "ffn"}

register_comfy_adapter(
    "Flux",
    ComfyAdapter(
        block_adapter("flux", _FLUX_GROUPS, {}, composite_groups={g: () for g in _FLUX_GROUPS}),
        scope="residual",
        streams=(("DoubleStreamBlock", ("img", "txt")), ("SingleStreamBlock", ("x",))),
    ),
)
register_comfy_adapter(
    "WanModel",
    ComfyAdapter(block_adapter("wan", ["blocks"], {"self_attn": "attn", "cross_attn": "cross_attn", "ffn": "ffn"})),
)
register_comfy_adapter(
    "UNetModel",
    ComfyAdapter(block_adapter("unet", [], _UNET_UNITS, block_classes=["BasicTransformerBlock"])),
)
