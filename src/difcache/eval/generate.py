"""Seeded sample generation per cache setting, saved as PNG, resumable, split across processes.

Layout of an output folder (one per run; ``SETTING`` is the setting's label made filename-safe)::

    OUT/samples/SETTING/manifest.json      what made these samples (model, steps, batch size, setting)
    OUT/samples/SETTING/000000.png         one image, or one video as its frames side by side
    OUT/samples/SETTING/stats/000000.json  per batch: denoiser FLOPs (full and skipped), calls, seconds

Why it is built this way:

* **Same samples whatever the process count.** Items are cut into batches of ``batch_size`` first, in order;
  whole batches are then split between processes (``accelerate.PartialState().split_between_processes``). A
  batch always holds the same items, every item has its own seeded generator, and dynamic cache decisions
  see the same batch, so one process and eight give the same files.
* **Resumable.** A batch whose files all exist is skipped; a partial one is made again and only its missing
  files are written. PNGs are written to a temporary name and renamed, so a killed run leaves no half file.
  A manifest that disagrees with the run (other steps, model, batch size, setting) stops it with the fields.
* **Independent processes.** Each process samples different items (data parallelism), so dynamic cache
  policies must decide from their own batch: their cross-rank reductions (meant for context parallelism, where
  ranks hold shards of one sample) are switched off while generating (:func:`independent_ranks`). Otherwise
  decisions would mix other processes' samples, and ranks with unequal batch counts would deadlock.
* **Gathered on the main process.** Every process returns its counts (``gather_object``); the per-batch
  stats files let the main process report FLOPs for all samples, including those made by an earlier run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import difcache
from difcache.config import parse_fields
from difcache.engine.distributed import independent_ranks
from difcache.errors import DifcacheError
from difcache.eval.samplers import Item, Sampler


@dataclass(frozen=True)
class Setting:
    """A cache setting to evaluate: ``method=None`` is the uncached baseline."""

    label: str
    method: str | None = None
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def slug(self) -> str:
        """The label as a folder name."""
        return re.sub(r"[^A-Za-z0-9._=+-]+", "_", self.label.replace(":", "-").replace(",", "+"))

    def apply(self, pipe: Any) -> difcache.CacheHandle | None:
        """Apply this setting's cache to ``pipe`` (nothing for the baseline)."""
        if self.method is None:
            return None
        return difcache.apply_cache(pipe, self.method, **dict(self.overrides))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: override values that JSON cannot hold (a ``Profile`` object) appear as their ``repr``."""
        overrides = json.loads(json.dumps(dict(self.overrides), default=repr))
        return {"label": self.label, "method": self.method, "overrides": overrides}


UNCACHED = Setting("uncached")


def parse_setting(text: str) -> Setting:
    """``"taylorseer"``, ``"fora:interval=3,warmup=2"``, ``"uncached"``, or a JSON file ``{"method": ..., ...}``."""
    text = text.strip()
    if text in ("uncached", "none", ""):
        return UNCACHED
    if text.endswith(".json") and ":" not in text:  # a config file (not "ertacache:profile=x.json")
        path = Path(text)
        if not path.is_file():
            raise DifcacheError(f"Config file {text!r} does not exist; pass method:key=value,... or a JSON file.")
        fields = json.loads(path.read_text())
        if not isinstance(fields, dict) or "method" not in fields:
            raise DifcacheError(f"{text}: expected a JSON object with a 'method' key and config fields.")
        method = fields.pop("method")
        label = path.stem
    else:
        method, _, rest = text.partition(":")
        try:
            fields = parse_fields(rest)
        except ValueError as err:
            raise DifcacheError(f"Bad setting {text!r}: {err} (a setting is method:key=value,key=value).") from None
        label = text
    methods = difcache.list_methods()
    if method not in methods:
        raise DifcacheError(f"Unknown method {method!r} in {text!r}; registered: {', '.join(methods)}.")
    return Setting(label, method, tuple(sorted(fields.items())))


def settings_from_cli(methods: Sequence[str] = (), configs: Sequence[str] = ()) -> list[Setting]:
    """The uncached baseline first, then ``--method`` names (paper defaults) and ``--config`` settings, deduplicated."""
    settings = [UNCACHED]
    for text in [*methods, *configs]:
        setting = parse_setting(text)
        if setting.label not in {s.label for s in settings}:
            settings.append(setting)
    slugs = [s.slug for s in settings]
    if len(set(slugs)) != len(slugs):
        raise DifcacheError(f"Two settings map to the same folder name: {slugs}; write them differently.")
    return settings


def make_items(num_samples: int, seed: int = 0, conditions: Sequence[int | str | None] | None = None) -> list[Item]:
    """Items ``0..num_samples-1`` with seeds ``seed + index``, cycling through ``conditions`` (labels or prompts)."""
    if num_samples < 1:
        raise DifcacheError(f"`num_samples` must be >= 1, got {num_samples}.")
    conditions = list(conditions) if conditions else [None]
    return [Item(i, seed + i, conditions[i % len(conditions)]) for i in range(num_samples)]


# ------------------------------------------------------------------------------------------------ sample files
def save_sample(path: Path, sample: torch.Tensor) -> None:
    """An image ``[C, H, W]`` or a video ``[F, C, H, W]`` in [0, 1] as an 8-bit PNG.

    A video is stored as its frames side by side, with the frame count in a PNG text chunk, so it stays one
    lossless file that is written (and resumed) atomically.
    """
    x = sample if sample.dim() == 4 else sample.unsqueeze(0)
    x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    strip = torch.cat(list(x), dim=-1).permute(1, 2, 0).numpy()  # [H, F*W, C]
    image = Image.fromarray(strip[..., 0] if strip.shape[-1] == 1 else strip)
    info = PngInfo()
    if sample.dim() == 4:
        info.add_text("frames", str(len(x)))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def load_sample(path: Path) -> torch.Tensor:
    """A saved sample as ``uint8``: an image ``[C, H, W]`` or a video ``[F, C, H, W]``."""
    try:
        with Image.open(path) as image:
            frames = int(image.text.get("frames", 0))
            array = np.asarray(image)
    except (OSError, ValueError) as err:
        raise DifcacheError(f"Cannot read sample {path}: {err}. Delete it and run again to regenerate it.") from None
    x = torch.from_numpy(array.copy())
    x = (x.unsqueeze(-1) if x.dim() == 2 else x).permute(2, 0, 1)  # [C, H, F*W]
    return torch.stack(x.chunk(frames, dim=-1)) if frames else x


class SampleStore:
    """The folder of one setting's samples (see the module docstring)."""

    def __init__(self, root: str | Path, setting: Setting) -> None:
        self.setting = setting
        self.dir = Path(root) / "samples" / setting.slug

    def path(self, item: Item) -> Path:
        return self.dir / f"{item.stem}.png"

    def missing(self, items: Sequence[Item]) -> list[Item]:
        return [item for item in items if not self.path(item).exists()]

    def check_manifest(self, manifest: dict[str, Any]) -> None:
        """Raise if samples already here were made differently (every process calls this; nothing is written)."""
        path = self.dir / "manifest.json"
        if not path.exists():
            return
        old = json.loads(path.read_text())
        differ = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if differ:
            details = "; ".join(f"{k}: {old.get(k)!r} then, {manifest.get(k)!r} now" for k in differ)
            raise DifcacheError(
                f"{self.dir} holds samples made with other settings ({details}). Use another --out folder, or "
                "delete that folder to regenerate."
            )

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "stats").mkdir(exist_ok=True)
        path = self.dir / "manifest.json"
        if not path.exists():
            path.write_text(json.dumps(manifest, indent=1, sort_keys=True))

    def write_batch_stats(self, batch: Sequence[Item], stats: dict[str, Any]) -> None:
        path = self.dir / "stats" / f"{batch[0].stem}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"items": [item.stem for item in batch], **stats}))
        os.replace(tmp, path)

    def batch_stats(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted((self.dir / "stats").glob("*.json"))]


# ------------------------------------------------------------------------------------------------- generation
@dataclass
class GenerationResult:
    """What all processes did for one setting (gathered on the main process)."""

    label: str
    generated: int = 0  # samples written by this run
    skipped: int = 0  # samples that already existed
    seconds: float = 0.0  # wall time spent sampling, summed over processes
    per_process: list[dict[str, Any]] = field(default_factory=list)


def batches_of(items: Sequence[Item], batch_size: int) -> list[list[Item]]:
    """``items`` cut into consecutive batches; independent of the number of processes."""
    if batch_size < 1:
        raise DifcacheError(f"`batch_size` must be >= 1, got {batch_size}.")
    return [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


def manifest_for(sampler: Sampler, setting: Setting, batch_size: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Everything that changes what sample ``i`` looks like; a resumed run must match it."""
    return {"model": sampler.spec, "kind": sampler.kind, "batch_size": batch_size, "setting": setting.to_dict(),
            **sampler.settings, **extra}  # fmt: skip


def digest(values: Sequence[Any]) -> str:
    """A short stable hash of a list (prompts, labels) for manifests."""
    return hashlib.sha1(json.dumps(list(values), default=str).encode()).hexdigest()[:16]


def check_settings(pipe: Any, settings: Sequence[Setting]) -> None:
    """Apply and remove every setting once, so a bad one fails on every process before any sampling."""
    for setting in settings:
        try:
            handle = setting.apply(pipe)
        except DifcacheError as err:
            raise DifcacheError(f"Setting {setting.label!r}: {err}") from None
        if handle is not None:
            handle.remove()


def generate(
    sampler: Sampler,
    settings: Sequence[Setting],
    items: Sequence[Item],
    out: str | Path,
    batch_size: int = 8,
    state: Any = None,
    progress: bool = True,
    manifest_extra: dict[str, Any] | None = None,
) -> dict[str, GenerationResult]:
    """Make every missing sample of every setting under ``out`` (see the module docstring).

    ``state`` is an ``accelerate.PartialState`` (one is made if ``None``; on CPUs it must be made with
    ``cpu=True``, or torchrun's processes would each believe they are alone). Every process must call this with
    the same arguments; the returned results are complete on the main process. ``manifest_extra`` holds what
    else decides the samples (base seed, a digest of the prompts), checked when a run resumes.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm import tqdm

    state = state if state is not None else PartialState(cpu=not torch.cuda.is_available())
    all_batches = batches_of(items, batch_size)
    check_settings(sampler.pipe, settings)
    results: dict[str, GenerationResult] = {}
    for setting in settings:
        store = SampleStore(out, setting)
        manifest = manifest_for(sampler, setting, batch_size, manifest_extra or {})
        store.check_manifest(manifest)
        state.wait_for_everyone()
        if state.is_main_process:
            store.write_manifest(manifest)
        state.wait_for_everyone()
        todo = [b for b in all_batches if store.missing(b)]  # every process sees the same files here
        mine_done = mine_made = 0
        seconds = 0.0
        with state.split_between_processes(todo) as mine, independent_ranks():
            handle = setting.apply(sampler.pipe) if mine else None
            try:
                bar = tqdm(mine, desc=f"{setting.label} [rank {state.process_index}]", position=state.process_index,
                           disable=not progress, leave=False)  # fmt: skip
                for batch in bar:
                    if handle is not None:
                        handle.reset_stats()
                    start = time.perf_counter()
                    samples = sampler.run(batch)
                    elapsed = time.perf_counter() - start
                    seconds += elapsed
                    for item, sample in zip(batch, samples, strict=True):
                        if not store.path(item).exists():
                            save_sample(store.path(item), sample)
                            mine_made += 1
                    store.write_batch_stats(batch, _batch_stats(handle, elapsed))
                    mine_done += 1
            finally:
                if handle is not None:
                    handle.remove()
        gathered = gather_object([{"rank": state.process_index, "batches": mine_done, "written": mine_made,
                                   "seconds": seconds}])  # fmt: skip
        written = sum(g["written"] for g in gathered)
        results[setting.label] = GenerationResult(
            setting.label, written, len(items) - written, sum(g["seconds"] for g in gathered), list(gathered)
        )
        state.wait_for_everyone()
    return results


def _batch_stats(handle: difcache.CacheHandle | None, seconds: float) -> dict[str, Any]:
    if handle is None:
        return {"seconds": seconds}
    stats = handle.stats()
    return {"seconds": seconds, "calls": stats.calls, "full_flops": stats.full_flops,
            "skipped_flops": stats.skipped_flops, **stats.totals()}  # fmt: skip


def setting_summary(store: SampleStore, items: Sequence[Item]) -> dict[str, Any]:
    """Ideal (FLOPs) speedup and sampling seconds per sample over the batches that made ``items``' files."""
    wanted = {item.stem for item in items}
    records = [r for r in store.batch_stats() if wanted & set(r["items"])]
    full = sum(r.get("full_flops", 0.0) for r in records)
    skipped = sum(r.get("skipped_flops", 0.0) for r in records)
    samples = sum(len(r["items"]) for r in records)
    summary: dict[str, Any] = {
        "ideal_speedup": (full / (full - skipped) if full > skipped else None) if full else 1.0,
        "seconds_per_sample": sum(r["seconds"] for r in records) / samples if samples else None,
    }
    if store.setting.method is not None:
        summary["decisions"] = {k: sum(r.get(k, 0) for r in records) for k in ("compute", "reuse", "forecast")}
    return summary
