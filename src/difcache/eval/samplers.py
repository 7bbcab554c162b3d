"""One interface over the models the evaluation scripts sample: bundled, random stand-ins, or the user's own.

A :class:`Sampler` turns a batch of :class:`Item` (index, seed, class label or prompt) into float samples in
[0, 1]: images ``[B, C, H, W]`` or videos ``[B, F, C, H, W]``. Every item gets its own CPU ``torch.Generator``
seeded with its seed, so a sample depends on its seed and its batch, never on which process made it.

Specs (``--model``):

* ``dit``, ``unet``, ``video``: the bundled models (``difcache.models.load``; weights shipped in the package).
  ``dit`` and ``unet`` come with real data (the procedural shapes they were trained on) as the FID reference.
* ``random:dit``, ``random:unet``, ``random:video``: the same architectures and pipelines with seeded random
  weights: for smoke tests of the plumbing when the weights are absent; their samples are noise-like.
* ``pipeline:PATH``: any diffusers pipeline ``DiffusionPipeline.from_pretrained(PATH)`` (a local folder, or a
  hub id where the hub is reachable); class labels, prompts or neither are detected from its ``__call__``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from difcache.errors import DifcacheError

BUNDLED = ("dit", "unet", "video")


@dataclass(frozen=True)
class Item:
    """One sample to make: its global ``index``, its ``seed``, its condition, and the file stem it is saved as."""

    index: int
    seed: int
    condition: int | str | None = None
    name: str = ""

    @property
    def stem(self) -> str:
        return self.name or f"{self.index:06d}"


@dataclass
class Sampler:
    """A model and how to sample it (see the module docstring)."""

    spec: str
    description: str
    pipe: Any  # what ``difcache.apply_cache`` receives
    kind: str  # "image" | "video"
    conditioning: str  # "class" | "prompt" | "none"
    run: Callable[[Sequence[Item]], torch.Tensor]
    class_names: tuple[str, ...] | None = None
    reference: Callable[[int, int, int], Iterator[torch.Tensor]] | None = None  # (n, seed, chunk) -> real images
    settings: dict[str, Any] = field(default_factory=dict)  # what changes samples; recorded in manifests

    def condition_of(self, text: str) -> int | str:
        """The condition for a line of a prompt file: the prompt, or for class-conditional models the class it
        names (``"a circle moving right"`` -> the index of ``circle``), or an integer label."""
        if self.conditioning == "prompt":
            return text
        if self.conditioning == "none":
            raise DifcacheError(f"{self.spec} is unconditional; it takes no prompts or class labels.")
        if text.strip().isdigit():
            return int(text)
        names = self.class_names or ()
        found = [k for k, name in enumerate(names) if name.lower() in text.lower()]
        if len(found) != 1:
            raise DifcacheError(
                f"{self.spec} is class-conditional; the prompt {text!r} must name exactly one of its classes "
                f"({', '.join(names) or 'integer labels'})."
            )
        return found[0]


def to_samples(output: Any, kind: str) -> torch.Tensor:
    """A pipeline's images/frames as float in [0, 1]: ``[B, C, H, W]`` or ``[B, F, C, H, W]``.

    numpy arrays and PIL lists follow diffusers' ``"np"`` layout (channels last); tensors its ``"pt"`` layout.
    """
    if isinstance(output, list) and output and not isinstance(output[0], (torch.Tensor, np.ndarray)):
        output = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in output])
    if isinstance(output, list):
        output = np.stack(output) if isinstance(output[0], np.ndarray) else torch.stack(output)
    if isinstance(output, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(output)).float()
        x = x.permute(0, 3, 1, 2) if kind == "image" else x.permute(0, 1, 4, 2, 3)
    else:
        x = output.detach().float().cpu()
    expected = 4 if kind == "image" else 5
    if x.dim() != expected:
        raise DifcacheError(f"Expected {kind} samples with {expected} dims, got shape {tuple(x.shape)}.")
    return x.clamp(0, 1)


def _generators(items: Sequence[Item]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(item.seed) for item in items]


def _video_stand_in(model: torch.nn.Module, table: torch.Tensor) -> Any:
    """The bundled video pipeline around ``model``. ``class_embeddings`` gets a default in the signature because
    diffusers' ``components`` (used by ``maybe_free_model_hooks``) treats every required ``__init__`` argument as
    a registered module, and the table is a plain tensor."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from difcache.models.pipelines import ShapesVideoPipeline

    class _ShapesVideo(ShapesVideoPipeline):
        def __init__(self, transformer: Any, scheduler: Any, class_embeddings: torch.Tensor | None = None) -> None:
            super().__init__(transformer, scheduler, class_embeddings)

    return _ShapesVideo(model, FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000), table)


def _bundled(
    name: str, random_weights: bool, steps: int, guidance_scale: float | None, device: str, dtype: torch.dtype
) -> Sampler:
    from difcache.models import CLASSES, bundled, load
    from difcache.models.shapes import make_images

    if random_weights:
        torch.manual_seed(0)  # identical stand-ins in every process
        model = bundled.build(name).eval().to(device=device, dtype=dtype)
        if name == "dit":
            pipe = bundled.dit_pipeline(model)
        elif name == "unet":
            pipe = bundled.unet_pipeline(model)
        else:
            table = torch.randn(len(CLASSES) + 1, 4, model.config.text_dim) * 0.5
            pipe = _video_stand_in(model, table)
        description = f"random:{name} (bundled architecture, RANDOM weights: a smoke test, samples are noise-like)"
    else:
        pipe = load(name, device=device, dtype=dtype)
        description = f"{name} (bundled, trained on procedural shapes)"
    pipe.set_progress_bar_config(disable=True)
    settings: dict[str, Any] = {"steps": steps, "dtype": str(dtype).removeprefix("torch.")}

    def reference(n: int, seed: int, chunk: int) -> Iterator[torch.Tensor]:
        for k, start in enumerate(range(0, n, chunk)):
            images, _ = make_images(min(chunk, n - start), size=32, seed=seed * 100_003 + k)
            yield (images + 1) / 2

    if name == "unet":

        def run(items: Sequence[Item]) -> torch.Tensor:
            out = pipe(
                batch_size=len(items), generator=_generators(items), num_inference_steps=steps, output_type="np"
            )
            return to_samples(out.images, "image")

        return Sampler(f"{'random:' * random_weights}{name}", description, pipe, "image", "none", run,
                       reference=reference, settings=settings)  # fmt: skip

    guidance = 3.0 if guidance_scale is None else guidance_scale
    settings["guidance_scale"] = guidance
    if name == "dit":

        def run(items: Sequence[Item]) -> torch.Tensor:
            labels = [int(item.condition) for item in items]
            out = pipe(labels, num_inference_steps=steps, guidance_scale=guidance, generator=_generators(items))
            return to_samples(out.images, "image")

        return Sampler(f"{'random:' * random_weights}dit", description, pipe, "image", "class", run,
                       class_names=tuple(CLASSES), reference=reference, settings=settings)  # fmt: skip

    def run_video(items: Sequence[Item]) -> torch.Tensor:
        labels = [int(item.condition) for item in items]
        out = pipe(labels, num_inference_steps=steps, guidance_scale=guidance, generator=_generators(items))
        return out.images.float().permute(0, 2, 1, 3, 4).clamp(0, 1)  # [B, C, F, H, W] -> [B, F, C, H, W]

    return Sampler(f"{'random:' * random_weights}video", description, pipe, "video", "class", run_video,
                   class_names=tuple(CLASSES), settings=settings)  # fmt: skip


def _pretrained(path: str, steps: int, guidance_scale: float | None, device: str, dtype: torch.dtype,
                call_kwargs: dict[str, Any]) -> Sampler:  # fmt: skip
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype).to(device)
    except (OSError, ValueError) as err:
        raise DifcacheError(
            f"Cannot load a diffusers pipeline from {path!r}: {str(err).splitlines()[0]} "
            "Pass a local folder saved with pipe.save_pretrained(...) (or a hub id on a machine with access)."
        ) from None
    pipe.set_progress_bar_config(disable=True)
    params = inspect.signature(pipe.__call__).parameters
    conditioning = "class" if "class_labels" in params else "prompt" if "prompt" in params else "none"
    kind = "video" if "num_frames" in params else "image"
    fixed = {"num_inference_steps": steps, **call_kwargs}
    if guidance_scale is not None:
        fixed["guidance_scale"] = guidance_scale
    if "output_type" in params:
        fixed["output_type"] = "np"

    def run(items: Sequence[Item]) -> torch.Tensor:
        kwargs = dict(fixed, generator=_generators(items))
        if conditioning == "class":
            kwargs["class_labels"] = [int(item.condition) for item in items]
        elif conditioning == "prompt":
            kwargs["prompt"] = [str(item.condition) for item in items]
        else:
            kwargs["batch_size"] = len(items)
        out = pipe(**kwargs)
        frames = getattr(out, "frames", None)
        return to_samples(frames if frames is not None else out.images, kind)

    labels = getattr(pipe, "labels", None)  # DiTPipeline: name -> id
    names = tuple(sorted(labels, key=labels.get)) if isinstance(labels, dict) else None
    settings = {**{k: v for k, v in fixed.items() if k != "output_type"}, "dtype": str(dtype).removeprefix("torch.")}
    return Sampler(f"pipeline:{path}", f"{type(pipe).__name__} from {path}", pipe, kind, conditioning, run,
                   class_names=names, settings=settings)  # fmt: skip


def load_sampler(
    spec: str,
    steps: int,
    guidance_scale: float | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    call_kwargs: dict[str, Any] | None = None,
) -> Sampler:
    """The sampler for ``--model SPEC`` (see the module docstring), sampling with ``steps`` steps."""
    if steps < 1:
        raise DifcacheError(f"`steps` must be >= 1, got {steps}.")
    if spec in BUNDLED:
        return _bundled(spec, False, steps, guidance_scale, device, dtype)
    if spec.startswith("random:") and spec.removeprefix("random:") in BUNDLED:
        return _bundled(spec.removeprefix("random:"), True, steps, guidance_scale, device, dtype)
    if spec.startswith("pipeline:"):
        return _pretrained(spec.removeprefix("pipeline:"), steps, guidance_scale, device, dtype, call_kwargs or {})
    raise DifcacheError(
        f"Unknown --model {spec!r}: use one of {', '.join(BUNDLED)} (bundled), random:<name> (random-weight "
        "stand-in for smoke tests) or pipeline:PATH (a diffusers pipeline folder)."
    )
