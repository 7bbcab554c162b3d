"""The evaluation runs behind ``scripts/eval_fid.py`` (here) and ``scripts/eval_vbench.py`` (:mod:`.vbench`).

A run: load the model, make the items (seeds and conditions), generate every setting's samples on all
processes (:func:`difcache.eval.generate.generate`), then score and report on the main process. Launch with
``python`` (one process), ``torchrun --nproc_per_node K`` (K CPU processes, gloo) or
``accelerate launch --num_processes K`` (K GPUs); the scores do not depend on K (see ``docs/evaluation.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from difcache.errors import DifcacheError
from difcache.eval.generate import digest, generate, make_items, settings_from_cli
from difcache.eval.samplers import Item, Sampler, load_sampler


def add_common_args(parser: argparse.ArgumentParser, default_model: str, default_steps: int) -> None:
    """Arguments both scripts take: model, settings, sampling, output, device."""
    parser.add_argument("--model", default=default_model,
                        help="dit | unet | video (bundled), random:<name> (random weights, smoke tests), "
                             "pipeline:PATH (a diffusers pipeline folder)")  # fmt: skip
    parser.add_argument("--method", nargs="*", default=[], help="methods, paper defaults: taylorseer fora ...")
    parser.add_argument("--config", nargs="*", default=[],
                        help="settings method:key=value,... or JSON files {'method': ..., ...}; "
                             "the uncached baseline is always included")  # fmt: skip
    parser.add_argument("--steps", type=int, default=default_steps, help="sampling steps")
    parser.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (model default if omitted)")
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed SEED + i")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per pipeline call (changes samples)")
    parser.add_argument("--call-kwargs", default="{}", help='extra pipeline arguments as JSON, e.g. {"height": 512}')
    parser.add_argument("--out", required=True, help="output folder (samples, reports); reruns resume here")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (each process takes its own GPU)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def setup(args: argparse.Namespace) -> tuple[Any, Sampler]:
    """The accelerate state (gloo on CPU, NCCL on GPUs) and the sampler, identical on every process."""
    from accelerate import PartialState

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DifcacheError("--device cuda but no CUDA device is visible; use --device cpu.")
    torch.set_num_threads(max(args.threads, 1))
    state = PartialState(cpu=device == "cpu")
    try:
        call_kwargs = json.loads(args.call_kwargs)
    except json.JSONDecodeError as err:
        raise DifcacheError(f"--call-kwargs is not JSON: {err}") from None
    sampler = load_sampler(
        args.model, args.steps, args.guidance_scale, device=str(state.device) if device != "cpu" else "cpu",
        dtype=getattr(torch, args.dtype), call_kwargs=call_kwargs,
    )  # fmt: skip
    return state, sampler


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a prompt file."""
    file = Path(path)
    if not file.is_file():
        raise DifcacheError(f"Prompt file {file} does not exist.")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise DifcacheError(f"Prompt file {file} has no prompts.")
    return prompts


def conditions_for(sampler: Sampler, prompts: str | None, class_labels: Sequence[int] | None) -> list[Any] | None:
    """The conditions samples cycle through: prompts (file), class labels, or every class of the model."""
    if sampler.conditioning == "none":
        if prompts or class_labels:
            raise DifcacheError(f"{sampler.spec} is unconditional: drop --prompts/--class-labels.")
        return None
    if prompts:
        return [sampler.condition_of(p) for p in read_prompts(prompts)]
    if sampler.conditioning == "prompt":
        raise DifcacheError(f"{sampler.spec} is text-conditioned: pass --prompts FILE (one prompt per line).")
    if class_labels:
        return list(class_labels)
    if sampler.class_names:
        return list(range(len(sampler.class_names)))
    raise DifcacheError(f"{sampler.spec} is class-conditional: pass --class-labels 0 1 2 ... .")


def fid_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eval_fid.py", description="FID, PSNR/SSIM vs uncached and CLIP score for cache settings.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    add_common_args(parser, "dit", 50)
    parser.add_argument("--num-samples", type=int, default=1000, help="samples per setting (papers: 50000)")
    parser.add_argument("--class-labels", type=int, nargs="*", help="labels to cycle through (default: all classes)")
    parser.add_argument("--prompts", help="prompt file, one per line; sample i uses prompt i mod P")
    parser.add_argument("--features", default="auto", help="FID features: auto | inception | bundled | random | none")
    parser.add_argument("--inception-weights", help="local weights-inception-2015-12-05-6726825d.pth")
    parser.add_argument("--reference", default="auto",
                        help="FID reference: auto (the bundled models' real data if any) | none | FOLDER of images")
    parser.add_argument("--reference-samples", type=int, default=None, help="real images (default: --num-samples)")
    parser.add_argument("--clip", help="folder of a local CLIP model + processor (CLIP score)")
    parser.add_argument("--clip-template", default="a photo of a {}", help="text for class labels")
    parser.add_argument("--chunk", type=int, default=64, help="samples per scoring chunk")
    return parser


def run_fid(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """The FID run; returns the report on the main process (``None`` on the others)."""
    from difcache.eval.clip import ClipScorer
    from difcache.eval.features import check_extractor, resolve_extractor
    from difcache.eval.quality import folder_images, score_images
    from difcache.eval.report import IMAGE_COLUMNS, TIMING_NOTE, build_report, environment, write_report

    settings = settings_from_cli(args.method, args.config)
    check_extractor(args.features, args.inception_weights)
    if args.reference not in ("auto", "none") and not Path(args.reference).is_dir():
        raise DifcacheError(f"--reference {args.reference}: not a folder of images (or use auto / none).")
    if args.clip and not Path(args.clip).is_dir():
        raise DifcacheError(f"--clip {args.clip}: not a folder with a saved CLIP model.")
    state, sampler = setup(args)
    if sampler.kind != "image":
        raise DifcacheError(f"{sampler.spec} makes videos; use scripts/eval_vbench.py.")
    conditions = conditions_for(sampler, args.prompts, args.class_labels)
    items: list[Item] = make_items(args.num_samples, args.seed, conditions)
    main = state.is_main_process
    say = log if main else (lambda _: None)
    say(f"model: {sampler.description}; {len(settings)} settings x {len(items)} samples on {state.num_processes} "
        f"process(es)")  # fmt: skip
    extra = {"seed": args.seed, "conditions": digest(conditions or [])}
    results = generate(sampler, settings, items, args.out, args.batch_size, state, not args.no_progress, extra)
    if not main:
        return None
    for label, result in results.items():
        say(f"  {label}: {result.generated} generated, {result.skipped} already there")
    extractor = resolve_extractor(args.features, args.inception_weights, log=say)
    if extractor is not None:
        extractor.to(state.device)
    reference, reference_name = None, "none"
    n_ref = args.reference_samples or len(items)
    if extractor is not None and args.reference == "auto" and sampler.reference is not None:
        ref_fn = sampler.reference
        reference = lambda: ref_fn(n_ref, args.seed, args.chunk)  # noqa: E731
        reference_name = f"{n_ref} real images of the bundled model's training distribution (procedural shapes)"
    elif extractor is not None and args.reference not in ("auto", "none"):
        reference = folder_images(args.reference, n_ref, args.chunk)
        reference_name = f"images in {args.reference} (first {n_ref})"
    clip = ClipScorer(args.clip, state.device) if args.clip else None
    rows = score_images(args.out, settings, items, extractor, reference, clip, sampler.class_names,
                        args.clip_template, args.chunk, progress=not args.no_progress)  # fmt: skip
    notes = [TIMING_NOTE]
    if extractor is not None:
        notes.insert(0, f"FID features: {extractor.description}.")
        notes.insert(1, f"FID reference: {reference_name}; FID vs uncached compares with the uncached samples of "
                        "the same seeds.")  # fmt: skip
    if clip is not None:
        notes.append(f"CLIP score (torchmetrics, 100·cos, clamped at 0) with the local model {clip.path}.")
    meta = {"model": sampler.description, "samples": len(items), "seed": args.seed, "batch_size": args.batch_size,
            "features": extractor.name if extractor else "none", **sampler.settings,
            **environment(state.num_processes)}  # fmt: skip
    report = build_report(f"difcache FID evaluation: {sampler.spec}", rows, IMAGE_COLUMNS, meta, notes)
    json_path, md_path = write_report(report, args.out, "fid")
    say(f"wrote {json_path} and {md_path}")
    return report


def run_script(name: str, parser: Any, run: Callable[[Any], dict | None], argv: Sequence[str] | None) -> int:
    """An evaluation script's entry point: parse, run, print the report's table; a user error is one line, exit 2."""
    from difcache.eval.report import markdown

    args = parser.parse_args(argv)
    try:
        report = run(args)
    except DifcacheError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 2
    if report is not None:
        print(markdown(report))
    return 0


def main_fid(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/eval_fid.py``."""
    return run_script("eval_fid", fid_parser(), run_fid, argv)
