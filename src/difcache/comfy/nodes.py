"""The difcache nodes: what each shows in ComfyUI and which function it calls.

* **difcache Apply Cache** (MODEL -> MODEL): :func:`difcache.comfy.patching.patch_cache`.
* **difcache Sparse Attention** (MODEL -> MODEL): :func:`difcache.comfy.patching.patch_sparse_attention`.
* **difcache Load / Apply / Sample** (``DIFCACHE_PIPE``): :mod:`difcache.comfy.pipeline`.

Method settings are INT/FLOAT widgets where ``-1`` means "the method's default for this model family" (the
paper's, e.g. TaylorSeer N=6, O=1, 3 warm-up on FLUX; N=5, O=1, 1 warm-up on Wan); a setting the chosen method
does not have is ignored with a warning in the log.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from difcache.comfy.patching import CacheSpec, comfy_methods, patch_cache, patch_sparse_attention
from difcache.comfy.pipeline import DTYPES, apply_to_pipe, load_pipeline, sample_pipe
from difcache.comfy.registration import Field, NodeDef
from difcache.methods import list_methods, method_spec

log = logging.getLogger("difcache.comfy")

CATEGORY = "difcache"
PIPE = "DIFCACHE_PIPE"
SPARSE_METHODS = ("psa", "topk", "topp", "svg2", "adaspa")
_USES_P = ("topp", "svg2")

_INTERVAL = Field(
    "interval",
    "INT",
    "Steps between full computations (N); 1 computes every step. -1: the method's default for this model "
    "(TaylorSeer: 6 on FLUX, 5 on Wan and SD; FORA: 3).",
    -1, -1, 100, 1,
)  # fmt: skip
_ORDER = Field("order", "INT", "TaylorSeer's Taylor order (0 = plain reuse). -1: default (1).", -1, -1, 4, 1)
_WARMUP = Field(
    "warmup",
    "INT",
    "TaylorSeer: steps always computed at the start. -1: default (3 on FLUX and SD, 1 on Wan).",
    -1, -1, 100, 1,
)  # fmt: skip


def method_overrides(method: str, values: dict[str, Any]) -> dict[str, Any]:
    """The settings the user set (not -1) that ``method``'s config has; others are ignored with a warning."""
    fields = {f.name for f in dataclasses.fields(method_spec(method).config_cls)}
    chosen = {k: v for k, v in values.items() if v is not None and v != -1}
    ignored = sorted(set(chosen) - fields)
    if ignored:
        log.warning("difcache: %s has no setting(s) %s; they are ignored.", method, ignored)
    return {k: v for k, v in chosen.items() if k in fields}


# ---------------------------------------------------------------------------------------------- MODEL nodes
def _apply_cache(model: Any, method: str, interval: int = -1, order: int = -1, warmup: int = -1,
                 start_percent: float = 0.0, end_percent: float = 1.0) -> tuple:  # fmt: skip
    overrides = method_overrides(method, {"interval": interval, "order": order, "warmup": warmup})
    spec = CacheSpec(method, tuple(sorted(overrides.items())), start_percent, end_percent)
    return (patch_cache(model, spec),)


def _sparse_attention(model: Any, method: str, density: float = 0.2, p: float = 0.9, start_percent: float = 0.25,
                      end_percent: float = 1.0, dense_blocks: str = "0", min_tokens: int = 12288) -> tuple:  # fmt: skip
    budget = {"p": p} if method in _USES_P else {"density": density}
    # the sigma window and the listed blocks replace the config's step-based warm-up and dense layers
    schedule = {} if method == "adaspa" else {"warmup_steps": 0}
    settings = {**budget, **schedule, "dense_layers": 0, "min_tokens": min_tokens}
    return (patch_sparse_attention(model, method, start_percent, end_percent, dense_blocks, **settings),)


APPLY_CACHE = NodeDef(
    "DifcacheApplyCache",
    "difcache Apply Cache",
    CATEGORY,
    "Training-free feature caching (TaylorSeer, FORA) for FLUX, Wan and SD/SDXL: units of the diffusion model are "
    "computed on some steps and reused or forecast on the others. Returns a patched copy; the input is unchanged.",
    (
        Field("model", "MODEL", "The diffusion model to cache (FLUX, Wan 2.x, SD 1.x/2.x, SDXL)."),
        Field(
            "method",
            "COMBO",
            "TaylorSeer forecasts skipped steps with a Taylor series; FORA reuses the last "
            "computed features; always_compute is a control that caches nothing.",
            "taylorseer",
            options=comfy_methods(),
        ),  # fmt: skip
        _INTERVAL,
        _ORDER,
        _WARMUP,
        Field(
            "start_percent",
            "FLOAT",
            "Caching starts at this point of the schedule (0 = first step).",
            0.0,
            0.0,
            1.0,
            0.01,
        ),  # fmt: skip
        Field(
            "end_percent", "FLOAT", "Caching stops at this point of the schedule (1 = last step).", 1.0, 0.0, 1.0, 0.01
        ),  # fmt: skip
    ),
    (Field("MODEL", "MODEL", "The model with difcache's cache applied while it samples."),),
    _apply_cache,
)

SPARSE_ATTENTION = NodeDef(
    "DifcacheSparseAttention",
    "difcache Sparse Attention",
    CATEGORY,
    "Sparse self-attention for ComfyUI's Wan video models (difcache.attention): each query block attends only to "
    "the key blocks (or SVG2 clusters) that carry its attention mass. Chains any other attention override "
    "(ComfyUI's Model Sparse Attention, SageAttention patches) and is re-installed every step, like ComfyUI's "
    "own node. Returns a patched copy; the input is unchanged. Combines with difcache Apply Cache.",
    (
        Field("model", "MODEL", "A Wan 2.x video model."),
        Field(
            "method",
            "COMBO",
            "psa: pyramid sparse attention (budget by density); topk: a density budget of key blocks; topp: the "
            "fewest key blocks reaching attention mass p; svg2: Sparse VideoGen 2's k-means clusters, top-p; "
            "adaspa: exact search at 20 % and 60 % of the steps, reused in between (density budget).",
            "psa",
            options=SPARSE_METHODS,
        ),  # fmt: skip
        Field("density", "FLOAT", "psa/topk/adaspa: fraction of attention work kept.", 0.2, 0.01, 1.0, 0.01),
        Field("p", "FLOAT", "topp/svg2: attention mass to keep (1 = dense).", 0.9, 0.01, 1.0, 0.01),
        Field(
            "start_percent", "FLOAT", "Sparse from this point of the schedule (sigma); dense before it. 0.25: the "
            "first quarter dense, as Sparse VideoGen and PSA do.", 0.25, 0.0, 1.0, 0.01,
        ),  # fmt: skip
        Field("end_percent", "FLOAT", "Dense again after this point of the schedule.", 1.0, 0.0, 1.0, 0.01),
        Field("dense_blocks", "STRING", "Blocks that always run dense, e.g. '0, 1, 28-29' (Sparse VideoGen: the "
              "first).", "0"),  # fmt: skip
        Field("min_tokens", "INT", "Sequences shorter than this stay dense.", 12288, 0, 1 << 20, 512),
    ),
    (Field("MODEL", "MODEL", "The model with sparse attention applied while it samples."),),
    _sparse_attention,
)


# ---------------------------------------------------------------------------------------------- pipeline nodes
def _load(path: str, dtype: str = "auto", device: str = "auto") -> tuple:
    return (load_pipeline(path, dtype, device),)


def _apply_pipe(pipe: Any, method: str, interval: int = -1, order: int = -1, warmup: int = -1,
                threshold: float = -1.0) -> tuple:  # fmt: skip
    if method == "none":
        return (apply_to_pipe(pipe, "none", {}),)
    values = {"interval": interval, "order": order, "warmup": warmup, "threshold": None if threshold < 0 else threshold}
    return (apply_to_pipe(pipe, method, method_overrides(method, values)),)


def _sample(pipe: Any, prompt: str = "", negative_prompt: str = "", steps: int = 28, cfg: float = 3.5, seed: int = 0,
            width: int = 0, height: int = 0, num_frames: int = 0, extra_kwargs: str = "") -> tuple:  # fmt: skip
    widgets = {"prompt": prompt, "negative_prompt": negative_prompt, "num_inference_steps": steps,
               "guidance_scale": cfg, "width": width, "height": height, "num_frames": num_frames}  # fmt: skip
    return sample_pipe(pipe, widgets, seed, extra_kwargs)


LOAD_PIPELINE = NodeDef(
    "DifcacheLoadPipeline",
    "difcache Load Pipeline (diffusers)",
    CATEGORY,
    "Loads a diffusers pipeline (DiffusionPipeline.from_pretrained) for the difcache pipeline nodes.",
    (
        Field("path", "STRING", "A local diffusers folder, or a Hugging Face repository id.", ""),
        Field("dtype", "COMBO", "auto: bfloat16 on CUDA, float32 otherwise.", "auto", options=("auto", *DTYPES)),
        Field("device", "COMBO", "auto: CUDA if available.", "auto", options=("auto", "cuda", "cpu", "mps")),
    ),
    (Field("pipe", PIPE, "The diffusers pipeline."),),
    _load,
)

APPLY_PIPELINE = NodeDef(
    "DifcacheApplyPipeline",
    "difcache Apply (diffusers pipeline)",
    CATEGORY,
    "Chooses the difcache method the Sample node applies to the pipeline (and removes afterwards). Applying again "
    "replaces the method; 'none' samples uncached. The pipeline itself is not changed by this node.",
    (
        Field("pipe", PIPE, "From difcache Load Pipeline."),
        Field(
            "method",
            "COMBO",
            "Any difcache method; the Sample node reports what it skipped.",
            "taylorseer",
            options=("none", *list_methods()),
        ),  # fmt: skip
        _INTERVAL,
        _ORDER,
        _WARMUP,
        Field("threshold", "FLOAT", "TeaCache: accumulated-change threshold. -1: default.", -1.0, -1.0, 10.0, 0.01),
    ),
    (Field("pipe", PIPE, "The pipeline with the cache to apply when sampling."),),
    _apply_pipe,
)

SAMPLE_PIPELINE = NodeDef(
    "DifcacheSamplePipeline",
    "difcache Sample (diffusers pipeline)",
    CATEGORY,
    "Calls the pipeline with difcache's cache applied for this call only. 0 or empty means the pipeline's default.",
    (
        Field("pipe", PIPE, "From difcache Apply (or Load)."),
        Field("prompt", "STRING", "Prompt.", "", multiline=True),
        Field("negative_prompt", "STRING", "Negative prompt (pipelines that take one).", "", multiline=True),
        Field("steps", "INT", "Denoising steps.", 28, 1, 1000, 1),
        Field("cfg", "FLOAT", "guidance_scale.", 3.5, 0.0, 100.0, 0.1),
        Field("seed", "INT", "Seed of the initial noise.", 0, 0, 0xFFFFFFFFFFFFFFFF, control_after_generate=True),
        Field("width", "INT", "0: the pipeline's default.", 0, 0, 16384, 8),
        Field("height", "INT", "0: the pipeline's default.", 0, 0, 16384, 8),
        Field("num_frames", "INT", "Video pipelines; 0: the default.", 0, 0, 10000, 1),
        Field(
            "extra_kwargs", "STRING", 'More pipeline arguments as JSON, e.g. {"true_cfg_scale": 4}.', "", optional=True
        ),  # fmt: skip
    ),
    (
        Field("IMAGE", "IMAGE", "Images, or the frames of the videos, as one batch."),
        Field("stats", "STRING", "What difcache computed, reused and forecast."),
    ),
    _sample,
)

NODES = (APPLY_CACHE, SPARSE_ATTENTION, LOAD_PIPELINE, APPLY_PIPELINE, SAMPLE_PIPELINE)
