"""Shared runner for the per-family recipes in this folder.

Each recipe names the real model on the Hugging Face Hub, the pipeline call, and difcache's recommended
settings for that family. ``--tiny`` runs the same code path offline on a tiny random-weight pipeline of the same
class (what the tests run); without it the real model is downloaded, which needs network access and a GPU.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import difcache


@dataclass(frozen=True)
class Recipe:
    family: str
    hub_id: str
    pipeline: str  # diffusers class name
    call: dict[str, Any]  # call kwargs for the real model (prompt, steps, size, ...)
    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def load_real(recipe: Recipe, device: str) -> Any:
    import diffusers

    cls: Callable[..., Any] = getattr(diffusers, recipe.pipeline)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return cls.from_pretrained(recipe.hub_id, torch_dtype=dtype).to(device)


def run(recipe: Recipe, argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=f"difcache recipe for {recipe.family} ({recipe.hub_id}). {recipe.note}"
    )
    parser.add_argument("--tiny", action="store_true", help="offline: tiny random model of the same pipeline class")
    parser.add_argument("--method", default=recipe.method)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.tiny:
        from difcache.models.tiny import output_of, tiny_call_kwargs, tiny_pipeline

        pipe = tiny_pipeline(recipe.family)
        kwargs = tiny_call_kwargs(recipe.family, num_inference_steps=args.steps or 10)
    else:
        pipe, kwargs = load_real(recipe, args.device), dict(recipe.call)
        if args.steps:
            kwargs["num_inference_steps"] = args.steps
        output_of = None
    settings = recipe.settings if args.method == recipe.method else {}
    handle = difcache.apply_cache(pipe, args.method, **settings)
    start = time.perf_counter()
    result = pipe(**kwargs)
    seconds = time.perf_counter() - start
    stats = handle.stats()
    handle.remove()
    print(stats)
    print(f"{recipe.family}: {seconds:.2f}s with {args.method} {settings}, ideal speedup {stats.ideal_speedup:.2f}x")
    if not args.tiny:
        images = getattr(result, "images", None) or getattr(result, "frames", None)
        first = images[0] if isinstance(images, list) else images
        if hasattr(first, "save"):
            first.save(f"{recipe.family}_{args.method}.png")
    return {"stats": stats, "seconds": seconds, "output": output_of(result) if output_of else result}
