"""The run behind ``scripts/eval_vbench.py``: videos for a VBench prompt file, in the layout VBench expects.

1. Generate ``--videos-per-prompt`` videos (VBench's standard suite uses 5) per prompt and setting, on all
   processes, saved losslessly as PNG frame strips (:mod:`difcache.eval.generate`), resumable.
2. Export them to ``OUT/vbench/<setting>/<prompt>-<i>.mp4`` (``.gif`` when PyAV is not installed): the file
   names of VBench's ``vbench_standard`` mode; ``custom_input`` mode reads the prompt from the same names.
3. Score what needs no weights (:func:`difcache.eval.quality.score_videos`): PSNR/SSIM per frame against the
   uncached video of the same seed, the temporal-flickering formula, and frame FID against the uncached
   frames when a feature extractor is available. These are labelled *not VBench* everywhere.
4. Run VBench itself when ``--run-vbench`` is given and the ``vbench`` package imports here; otherwise write
   the exact ``vbench evaluate`` commands to ``OUT/vbench/commands.sh`` for VBench's own environment, which
   needs its pinned dependencies and model weights (``docs/evaluation.md``).
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from difcache.errors import DifcacheError
from difcache.eval.generate import SampleStore, Setting, digest, generate, load_sample, settings_from_cli
from difcache.eval.runs import add_common_args, read_prompts, run_script, setup
from difcache.eval.samplers import Item, Sampler

# Dimensions VBench accepts in ``custom_input`` mode (the others need its prompt suite's extra annotations).
CUSTOM_DIMENSIONS = (
    "subject_consistency", "background_consistency", "motion_smoothness", "dynamic_degree", "aesthetic_quality",
    "imaging_quality", "temporal_flickering", "temporal_style", "overall_consistency", "human_action",
)  # fmt: skip


def vbench_items(sampler: Sampler, prompts: Sequence[str], videos_per_prompt: int, seed: int) -> list[Item]:
    """Items named ``<prompt>-<i>`` as VBench expects; video ``k`` overall uses seed ``seed + k``."""
    if videos_per_prompt < 1:
        raise DifcacheError(f"`videos_per_prompt` must be >= 1, got {videos_per_prompt}.")
    items = []
    for p, prompt in enumerate(prompts):
        name = prompt.replace("/", "_")
        for i in range(videos_per_prompt):
            index = p * videos_per_prompt + i
            items.append(Item(index, seed + index, sampler.condition_of(prompt), f"{name}-{i}"))
    if len({item.stem for item in items}) != len(items):
        raise DifcacheError("The prompt file has duplicate prompts; VBench names videos by prompt, remove them.")
    return items


def video_format() -> str:
    """``mp4`` when PyAV can encode H.264 here, else ``gif`` (VBench reads both)."""
    return "mp4" if importlib.util.find_spec("av") is not None else "gif"


def write_video(path: Path, frames: torch.Tensor, fps: int = 8) -> None:
    """``uint8`` frames ``[F, C, H, W]`` as an MP4 (H.264, PyAV) or GIF (Pillow), chosen by ``path``'s suffix."""
    array = frames.permute(0, 2, 3, 1).contiguous().numpy()
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    if path.suffix == ".mp4":
        import av

        with av.open(str(tmp), mode="w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.height, stream.width = array.shape[1] - array.shape[1] % 2, array.shape[2] - array.shape[2] % 2
            stream.pix_fmt, stream.options = "yuv420p", {"crf": "12"}
            for frame in array:
                even = np.ascontiguousarray(frame[: stream.height, : stream.width])
                container.mux(stream.encode(av.VideoFrame.from_ndarray(even, format="rgb24")))
            container.mux(stream.encode())
    else:
        images = [Image.fromarray(frame) for frame in array]
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)
    tmp.replace(path)


def export_videos(out: str | Path, setting: Setting, items: Sequence[Item], fmt: str, fps: int = 8) -> Path:
    """Write the missing ``OUT/vbench/<setting>/<prompt>-<i>.<fmt>`` files from the saved frame strips."""
    store = SampleStore(out, setting)
    folder = Path(out) / "vbench" / setting.slug
    folder.mkdir(parents=True, exist_ok=True)
    for item in items:
        target = folder / f"{item.stem}.{fmt}"
        if not target.exists():
            write_video(target, load_sample(store.path(item)), fps)
    return folder


def vbench_commands(videos: Path, output: Path, dimensions: Sequence[str], mode: str) -> list[str]:
    """``vbench evaluate`` command lines for one setting's folder, one per dimension (some VBench releases take
    a single ``--dimension`` on the command line)."""
    return [
        shlex.join(["vbench", "evaluate", "--videos_path", str(videos), "--output_path", str(output / dim),
                    "--mode", mode, "--dimension", dim])  # fmt: skip
        for dim in dimensions
    ]


def run_vbench_here(videos: Path, output: Path, name: str, dimensions: Sequence[str], mode: str) -> dict[str, float]:
    """VBench in this process (needs ``vbench`` importable and its weights cached); ``{dimension: score}``."""
    import vbench
    from vbench import VBench

    full_info = Path(vbench.__file__).parent / "VBench_full_info.json"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = VBench(device, str(full_info), str(output)).evaluate(
        videos_path=str(videos), name=name, dimension_list=list(dimensions), mode=mode
    )
    if results is None:  # older releases only write the JSON
        import json

        results = json.loads((output / f"{name}_eval_results.json").read_text())
    return {dim: float(value[0]) for dim, value in results.items()}


def vbench_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eval_vbench.py", description="Videos for VBench prompts per cache setting, offline fidelity metrics, "
        "and VBench itself where it is installed.", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    add_common_args(parser, "video", 30)
    parser.add_argument("--prompts", help="prompt file, one per line (VBench: prompts/all_dimension.txt); "
                        "default for the bundled video model: one prompt per shape class")  # fmt: skip
    parser.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--videos-per-prompt", type=int, default=5, help="VBench's standard suite uses 5")
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--format", default="auto", choices=["auto", "mp4", "gif"], help="VBench video files")
    parser.add_argument("--features", default="auto", help="frame-FID features: auto | bundled | random | none")
    parser.add_argument("--mode", default="custom_input", choices=["custom_input", "vbench_standard"])
    parser.add_argument("--dimensions", nargs="*", default=list(CUSTOM_DIMENSIONS), help="VBench dimensions")
    parser.add_argument("--run-vbench", action="store_true", help="run VBench here (it must import here)")
    return parser


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """The VBench run; returns the report on the main process (``None`` on the others)."""
    from difcache.eval.features import check_extractor, resolve_extractor
    from difcache.eval.quality import score_videos
    from difcache.eval.report import TIMING_NOTE, VIDEO_COLUMNS, build_report, environment, write_report

    settings = settings_from_cli(args.method, args.config)
    check_extractor(args.features)
    if args.run_vbench and importlib.util.find_spec("vbench") is None:
        raise DifcacheError(
            "--run-vbench: the vbench package is not importable here. Install it in its own environment (it pins "
            "transformers==4.33.2 and numpy<2) and run the commands this script writes without --run-vbench."
        )
    fmt = video_format() if args.format == "auto" else args.format
    if fmt == "mp4" and importlib.util.find_spec("av") is None:
        raise DifcacheError("--format mp4 needs PyAV (pip install av); or use --format gif.")
    prompts = read_prompts(args.prompts) if args.prompts else None
    state, sampler = setup(args)
    if sampler.kind != "video":
        raise DifcacheError(f"{sampler.spec} makes images; use scripts/eval_fid.py.")
    if prompts:
        pass
    elif sampler.class_names:
        prompts = [f"a {name} moving" for name in sampler.class_names]
    else:
        raise DifcacheError(f"{sampler.spec} needs --prompts FILE (e.g. VBench's prompts/all_dimension.txt).")
    prompts = prompts[: args.num_prompts] if args.num_prompts else prompts
    items = vbench_items(sampler, prompts, args.videos_per_prompt, args.seed)
    say = log if state.is_main_process else (lambda _: None)
    say(f"model: {sampler.description}; {len(settings)} settings x {len(items)} videos ({len(prompts)} prompts) on "
        f"{state.num_processes} process(es)")  # fmt: skip
    extra = {"seed": args.seed, "prompts": digest(prompts), "videos_per_prompt": args.videos_per_prompt}
    generate(sampler, settings, items, args.out, args.batch_size, state, not args.no_progress, extra)
    if not state.is_main_process:
        return None
    extractor = resolve_extractor(args.features, log=say)
    if extractor is not None:
        extractor.to(state.device)
    rows = score_videos(args.out, settings, items, extractor, progress=not args.no_progress)
    commands, vbench_scores = [], {}
    for setting, row in zip(settings, rows, strict=True):
        folder = export_videos(args.out, setting, items, fmt, args.fps)
        output = Path(args.out) / "vbench" / "results" / setting.slug
        commands += vbench_commands(folder, output, args.dimensions, args.mode)
        if args.run_vbench:
            vbench_scores[setting.label] = run_vbench_here(folder, output, setting.slug, args.dimensions, args.mode)
            row.update({f"vbench_{dim}": score for dim, score in vbench_scores[setting.label].items()})
    script = Path(args.out) / "vbench" / "commands.sh"
    script.write_text("#!/usr/bin/env bash\n# Run in VBench's own environment (see docs/evaluation.md).\nset -e\n"
                      + "\n".join(commands) + "\n")  # fmt: skip
    columns = list(VIDEO_COLUMNS)
    columns += [(f"vbench_{dim}", f"VBench {dim}", ".4f") for dim in args.dimensions if args.run_vbench]
    notes = [
        "PSNR/SSIM are per frame against the uncached video of the same prompt and seed; not VBench.",
        "Flickering formula: VBench's temporal-flickering score without its RAFT static-video filter; not VBench.",
        TIMING_NOTE,
    ]
    if extractor is not None:
        notes.insert(2, f"Frame FID vs uncached frames, features: {extractor.description}; not VBench.")
    notes.append(
        f"VBench scores: {'computed here' if args.run_vbench else 'not computed here; run ' + str(script)} "
        f"({args.mode} mode, videos in {Path(args.out) / 'vbench'} as .{fmt})."
    )
    meta = {"model": sampler.description, "prompts": len(prompts), "videos_per_prompt": args.videos_per_prompt,
            "seed": args.seed, "batch_size": args.batch_size, **sampler.settings,
            **environment(state.num_processes)}  # fmt: skip
    report = build_report(f"difcache video evaluation: {sampler.spec}", rows, columns, meta, notes)
    report["vbench_commands"] = commands
    json_path, md_path = write_report(report, args.out, "vbench")
    say(f"wrote {json_path}, {md_path} and {script}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/eval_vbench.py``."""
    return run_script("eval_vbench", vbench_parser(), run, argv)
