"""Sparse attention benchmarks: CPU kernel speed against dense SDPA, and quality on the bundled video model.

    python scripts/bench_sparse.py kernel            # fp32, B=1, H=8, N=8192, D=64, block 128, density 0.15
    python scripts/bench_sparse.py video             # PSNR vs dense on the bundled video model (needs weights)
    python scripts/bench_sparse.py all

Kernel part: dense ``F.scaled_dot_product_attention`` and each sparse CPU path are run interleaved (dense,
sparse, dense, sparse, ...) after warm-up (which includes FlexAttention's compilation), and the median of
``--repeats`` runs of each is compared. The pattern is a top-k pattern of ``round(density * M)`` key blocks per
query block (diagonal kept), selected per head from random queries and keys. Printed: times, the speedup
dense / sparse, the bound 1 / density, and the speedup as a fraction of the bound; the target for the
selected CPU path is >= 0.7 of the bound.

Video part: the bundled Wan video model (``difcache.models.load("video")``), same seeds, dense vs sparse at
top-k density 0.25, PSA density 0.25 and top-p 0.9; PSNR per frame (data range 1), averaged.
"""

from __future__ import annotations

import argparse
import json
import platform
import warnings

import torch
import torch.nn.functional as F

from difcache.attention import SparseAttentionConfig, apply_sparse_attention
from difcache.attention.runtime import select_pattern
from difcache.bench.timing import interleaved_medians
from difcache.kernels import (
    block_sparse_attention_cpp,
    block_sparse_attention_flex,
    block_sparse_attention_torch,
    cpu_extension,
    resolve_backend,
)
from difcache.models.shapes import clip_frames


def kernel_bench(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    b, h, n, d, bs = 1, args.heads, args.seq, args.head_dim, args.block_size
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    config = SparseAttentionConfig(method="topk", density=args.density, block_size=bs, tile=None)
    pattern = select_pattern(config, q, k)
    density = pattern.work().item()
    idx, cnt = pattern.kv_idx, pattern.kv_cnt
    selected = resolve_backend("auto", q.device, pyramid=False, n_tokens=n)
    variants = {
        "dense_sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "flex": lambda: block_sparse_attention_flex(q, k, v, idx, cnt, bs),
        "torch": lambda: block_sparse_attention_torch(q, k, v, idx, cnt, bs),
    }
    if cpu_extension.load() is not None:
        variants["cpp"] = lambda: block_sparse_attention_cpp(q, k, v, idx, cnt, bs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # correctness of the timed paths on this very pattern, against the torch path
        ref = block_sparse_attention_torch(q, k, v, idx, cnt, bs)[0]
        err = (block_sparse_attention_flex(q, k, v, idx, cnt, bs)[0] - ref).abs().max().item()
        if "cpp" in variants:
            err = max(err, (variants["cpp"]()[0] - ref).abs().max().item())
        times = interleaved_medians(variants, repeats=args.repeats, warmup=1)
    bound = 1.0 / density
    result = {
        "shape": {"B": b, "H": h, "N": n, "D": d, "block": bs, "dtype": "float32"},
        "density": density,
        "bound": bound,
        "selected_cpu_path": selected,
        "threads": torch.get_num_threads(),
        "max_abs_err_vs_torch": err,
        "seconds": times,
        "speedup": {name: times["dense_sdpa"] / t for name, t in times.items() if name != "dense_sdpa"},
    }
    print(f"\nKernel: fp32 B={b} H={h} N={n} D={d} block {bs}; density {density:.4f} (bound {bound:.2f}x); "
          f"{torch.get_num_threads()} threads; median of {args.repeats} interleaved runs")  # fmt: skip
    print("| path | median s | speedup vs dense | fraction of 1/density |\n|---|---|---|---|")
    print(f"| dense SDPA | {times['dense_sdpa']:.3f} | 1.00x | |")
    for name in [n for n in ("cpp", "torch", "flex") if n in variants]:
        s = result["speedup"][name]
        mark = " (selected CPU path)" if name == selected else ""
        print(f"| {name}{mark} | {times[name]:.3f} | {s:.2f}x | {s / bound:.2f} |")
    return result


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over frames of 10 log10(1 / MSE), clips ``[N, C, F, H, W]`` in [0, 1]."""
    frames_a, frames_b = clip_frames(a.float()), clip_frames(b.float())
    mse = (frames_a - frames_b).pow(2).flatten(1).mean(dim=1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-12))).mean().item()


def video_bench(args: argparse.Namespace) -> dict:
    import difcache.models as models

    if "video" not in models.available():
        print("\nVideo: the bundled video weights are missing (train them with "
              "`python scripts/train_bundled.py video`); skipped.")  # fmt: skip
        return {"skipped": "bundled video weights missing"}
    pipe = models.load("video")
    pipe.set_progress_bar_config(disable=True)
    labels = list(range(args.clips))
    common = dict(block_size=args.video_block, tile=tuple(args.video_tile), warmup_steps=args.warmup)

    def run():
        g = torch.Generator().manual_seed(0)
        return pipe(labels, num_inference_steps=args.steps, generator=g).images

    dense = run()
    settings = {
        "topk density 0.25": dict(method="topk", density=0.25),
        "psa density 0.25": dict(method="psa", density=0.25),
        "topp p 0.9": dict(method="topp", p=0.9),
    }
    rows = {}
    for name, s in settings.items():
        with apply_sparse_attention(pipe, **s, **common) as handle:
            out = run()
            stats = handle.stats()
        rows[name] = {"psnr_db": psnr(out, dense), "sparse_work": stats.sparse_work,
                      "attention_work": stats.attention_work}  # fmt: skip
    grid = dense.shape
    print(f"\nVideo: bundled model, clips {tuple(grid)}, {args.steps} steps, block {args.video_block}, "
          f"tile {tuple(args.video_tile)}, dense warm-up {args.warmup}")  # fmt: skip
    print(
        "| setting | PSNR vs dense (dB) | work of sparse calls | attention work overall |\n|---|---|---|---|"
    )
    for name, r in rows.items():
        print(f"| {name} | {r['psnr_db']:.2f} | {r['sparse_work']:.3f} | {r['attention_work']:.3f} |")
    return {"settings": common, "steps": args.steps, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("part", choices=["kernel", "video", "all"], nargs="?", default="all")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--density", type=float, default=0.15)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=float, default=0.2, help="dense warm-up fraction for the video part")
    parser.add_argument("--video-block", type=int, default=32)
    parser.add_argument("--video-tile", type=int, nargs=3, default=[2, 4, 4])
    parser.add_argument("--json", type=str, default="", help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    if args.part in ("kernel", "all"):
        results["kernel"] = kernel_bench(args)
    if args.part in ("video", "all"):
        results["video"] = video_bench(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
