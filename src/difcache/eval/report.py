"""Evaluation reports: one JSON file with everything, and a Markdown table a person reads.

A report is a dict: ``title``, ``command``, ``meta`` (model, steps, samples, extractor, reference, processes,
versions, machine, date), ``notes`` (what the numbers can and cannot be compared with), ``rows`` (one per
setting, from :mod:`difcache.eval.quality`) and ``columns`` (which row keys the table shows, in order).
Columns whose values are all missing are left out of the table; missing cells print as ``—`` and ``inf`` as ``∞``.
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# key, header, format
Column = tuple[str, str, str]
IMAGE_COLUMNS: list[Column] = [
    ("label", "setting", "s"),
    ("ideal_speedup", "ideal speedup", ".2f"),
    ("fid", "FID vs reference", ".3f"),
    ("fid_vs_uncached", "FID vs uncached", ".3f"),
    ("psnr", "PSNR dB", ".2f"),
    ("ssim", "SSIM", ".4f"),
    ("clip", "CLIP score", ".2f"),
    ("seconds_per_sample", "s/sample*", ".3f"),
]
VIDEO_COLUMNS: list[Column] = [
    ("label", "setting", "s"),
    ("ideal_speedup", "ideal speedup", ".2f"),
    ("psnr", "PSNR dB (per frame)", ".2f"),
    ("ssim", "SSIM (per frame)", ".4f"),
    ("temporal_flickering", "flickering formula (not VBench)", ".4f"),
    ("frame_fid_vs_uncached", "frame FID vs uncached", ".3f"),
    ("seconds_per_sample", "s/video*", ".3f"),
]
TIMING_NOTE = (
    "*Sampling seconds per sample, summed over processes: a rough cost, not a benchmark (processes share the "
    "machine). Measured speedups come from `difcache bench` (interleaved medians)."
)


def environment(num_processes: int = 1) -> dict[str, Any]:
    """Versions, machine and date for the report's ``meta``."""
    import diffusers

    import difcache

    return {
        "processes": num_processes,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "difcache": difcache.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def build_report(
    title: str,
    rows: Sequence[dict[str, Any]],
    columns: Sequence[Column],
    meta: dict[str, Any],
    notes: Sequence[str] = (),
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The report dict (see the module docstring); ``command`` defaults to this process's command line."""
    argv = list(command) if command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]]
    return {
        "title": title,
        "command": shlex.join(argv),
        "meta": dict(meta),
        "notes": list(notes),
        "columns": [list(c) for c in columns],
        "rows": [dict(r) for r in rows],
    }


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    if fmt == "s":
        return str(value).replace("|", "\\|")
    return format(value, fmt)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: title, settings line, table, notes, command."""
    columns = [c for c in report["columns"] if any(r.get(c[0]) is not None for r in report["rows"])]
    meta = report["meta"]
    lines = [f"## {report['title']}", ""]
    lines.append(", ".join(f"{k}: {v}" for k, v in meta.items() if not isinstance(v, (dict, list))))
    lines += ["", "| " + " | ".join(c[1] for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in report["rows"]:
        lines.append("| " + " | ".join(_cell(row.get(key), fmt) for key, _, fmt in columns) + " |")
    lines.append("")
    lines += [f"- {note}" for note in report["notes"]]
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` under ``out_dir``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=1, default=str))
    md_path.write_text(markdown(report))
    return json_path, md_path
