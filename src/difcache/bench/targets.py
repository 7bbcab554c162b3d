"""What ``difcache bench`` and ``difcache calibrate`` run on: the bundled models or a tiny family pipeline,
and the default sweep of settings, chosen so that difcache's methods and the alternatives cover the same range
of ideal speedups (the Pareto plot compares them at matched speedup).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from difcache.bench.run import BenchTarget, Variant, alternative_variant, difcache_variant
from difcache.errors import DifcacheError

Maker = Callable[[BenchTarget], Variant]


def build_target(name: str, steps: int = 50, seeds: tuple[int, ...] | list[int] = (0, 1)) -> BenchTarget:
    """``"dit"``, ``"unet"``, ``"video"`` (bundled, trained) or ``"tiny:<family>"`` (random weights)."""
    from difcache.models import CLASSES, load
    from difcache.models.shapes import clip_frames

    seeds = tuple(seeds)
    if name == "dit":
        pipe = load("dit")
        pipe.set_progress_bar_config(disable=True)
        size = pipe.transformer.config.sample_size

        def dit_images(labels: list[int], seed: int) -> torch.Tensor:
            return pipe(labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)).images

        def call(seed: int) -> torch.Tensor:
            return dit_images([(seed + k) % len(CLASSES) for k in range(4)], seed)

        def sample(n: int) -> torch.Tensor:
            return dit_images([k % len(CLASSES) for k in range(n)], _FID_SEED)

        return BenchTarget(
            f"bundled DiT ({size}x{size} pixels, 6 blocks, batched CFG 3.0)", pipe, call, steps, seeds,
            sample, lambda n: _real_images(n, size), calibration_calls=partial(calibration_calls, name),
        )  # fmt: skip
    if name == "unet":
        pipe = load("unet")
        pipe.set_progress_bar_config(disable=True)

        def unet_images(n: int, seed: int) -> torch.Tensor:
            out = pipe(batch_size=n, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                       output_type="np")  # fmt: skip
            return torch.from_numpy(out.images).permute(0, 3, 1, 2)

        size = pipe.unet.config.sample_size
        return BenchTarget(
            f"bundled UNet2DModel ({size}x{size}, DDIM)", pipe, lambda seed: unet_images(4, seed), steps, seeds,
            lambda n: unet_images(n, _FID_SEED), lambda n: _real_images(n, size),
            calibration_calls=partial(calibration_calls, name),
        )  # fmt: skip
    if name == "video":
        pipe = load("video")
        pipe.set_progress_bar_config(disable=True)

        def call(seed: int) -> torch.Tensor:
            clips = pipe([seed % len(CLASSES), (seed + 1) % len(CLASSES)], num_inference_steps=steps,
                         generator=torch.Generator().manual_seed(seed)).images  # fmt: skip
            return clip_frames(clips)

        return BenchTarget("bundled Wan video DiT (8x16x16 pixels, sequential CFG)", pipe, call, steps, seeds,
                           calibration_calls=partial(calibration_calls, name))  # fmt: skip
    if name.startswith("tiny:"):
        from difcache.models.tiny import output_of, tiny_call_kwargs, tiny_pipeline

        family = name.split(":", 1)[1]
        pipe = tiny_pipeline(family)
        pipe.set_progress_bar_config(disable=True)

        def call(seed: int) -> torch.Tensor:
            out = output_of(pipe(**tiny_call_kwargs(family, num_inference_steps=steps, seed=seed)))
            return out.reshape(-1, *out.shape[-3:]).permute(0, 3, 1, 2)

        def calls(n: int) -> list[dict[str, Any]]:
            return [tiny_call_kwargs(family, num_inference_steps=steps, seed=_CALIBRATION_SEED + i) for i in range(n)]

        return BenchTarget(f"tiny random {family} pipeline", pipe, call, steps, seeds, calibration_calls=calls)
    raise DifcacheError(f"Unknown bench model {name!r}; use dit, unet, video or tiny:<family>.")


_CALIBRATION_SEED = 1000  # calibration calls (autotune, calibrate, MagCache) use seeds from here on
_FID_SEED = 10_000  # FID samples use seeds and real images disjoint from the bench calls and the training data


def _real_images(n: int, size: int) -> torch.Tensor:
    from difcache.models import make_images

    return (make_images(n, size=size, seed=_FID_SEED)[0] + 1) / 2


def calibration_calls(name: str, n: int) -> list[dict[str, Any]]:
    """Inputs for ``n`` calibration calls of a bundled model (seeds disjoint from the bench's)."""
    from difcache.models import CLASSES

    if name == "unet":
        return [{"batch_size": 2, "generator": torch.Generator().manual_seed(_CALIBRATION_SEED + i)} for i in range(n)]
    return [
        {
            "class_labels": [i % len(CLASSES), (i + 1) % len(CLASSES)],
            "generator": torch.Generator().manual_seed(_CALIBRATION_SEED + i),
        }
        for i in range(n)
    ]


def default_variants(name: str) -> list[Maker]:
    """Every method at a few settings, and every alternative at settings spanning similar speedups."""
    if name == "unet":
        return [
            difcache_variant("deepcache", cache_interval=2),
            difcache_variant("deepcache", cache_interval=3),
            difcache_variant("deepcache", cache_interval=5),
            difcache_variant("deepcache", cache_interval=3, cache_branch_id=1),
            alternative_variant("deepcache-package", interval=2),
            alternative_variant("deepcache-package", interval=3),
            alternative_variant("deepcache-package", interval=5),
            alternative_variant("diffusers-pab", skip_range=2),
        ]
    return [
        difcache_variant("fora", interval=2),
        difcache_variant("fora", interval=3),
        difcache_variant("taylorseer", interval=3, order=1, warmup=3),
        difcache_variant("taylorseer", interval=4, order=2, warmup=3),
        difcache_variant("taylorseer", interval=5, order=2, warmup=3),
        difcache_variant("taylorseer", interval=6, order=2, warmup=3),
        difcache_variant("teacache", threshold=0.1, indicator="modulated_input"),
        difcache_variant("teacache", threshold=0.3, indicator="modulated_input"),
        difcache_variant("teacache", threshold=0.2, indicator="first_block_residual"),
        difcache_variant("delta_dit", interval=2),
        difcache_variant("delta_dit", interval=3),
        alternative_variant("diffusers-taylorseer", interval=3),
        alternative_variant("diffusers-taylorseer", interval=5),
        alternative_variant("diffusers-fbc", threshold=0.05),
        alternative_variant("diffusers-fbc", threshold=0.15),
        alternative_variant("diffusers-magcache", threshold=0.06),
        alternative_variant("diffusers-magcache", threshold=0.15),
        alternative_variant("diffusers-pab", skip_range=2),
        alternative_variant("diffusers-pab", skip_range=3),
        alternative_variant("cache-dit-dbcache", threshold=0.08),
        alternative_variant("cache-dit-dbcache", threshold=0.2),
        alternative_variant("cache-dit-dbcache-taylorseer", threshold=0.08),
        alternative_variant("cache-dit-dbcache-taylorseer", threshold=0.2),
    ]
