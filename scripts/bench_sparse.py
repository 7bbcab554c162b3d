"""Sparse attention benchmarks: CPU kernel speed against dense SDPA, selector quality at 8k-32k tokens, and
quality on the bundled video model.

    python scripts/bench_sparse.py kernel            # fp32, B=1, H=8, N=8192, D=64, block 128, density 0.15
    python scripts/bench_sparse.py quality           # every selector at matched work, 8k-32k tokens (see below)
    python scripts/bench_sparse.py video             # PSNR vs dense on the bundled video model (needs weights)
    python scripts/bench_sparse.py all

Kernel part: dense ``F.scaled_dot_product_attention`` and each sparse CPU path are run interleaved (dense,
sparse, dense, sparse, ...) after warm-up (which includes FlexAttention's compilation), and the median of
``--repeats`` runs of each is compared. The pattern is a top-k pattern of ``round(density * M)`` key blocks per
query block (diagonal kept), selected per head from random queries and keys. Printed: times, the speedup
dense / sparse, the bound 1 / density, and the speedup as a fraction of the bound; the target for the
selected CPU path is >= 0.7 of the bound.

Quality part: q, k, v with the structure of video attention (``sparse_fields.py``: a synthetic video token field
with local and semantic correlation, and the bundled video model's captured q, k, v upsampled in time and space)
at each ``--sizes`` grid. Every selector is run at matched work (``--works``: the fraction of dense attention
computed; top-p's ``p`` and SVG2's budget are bisected to it) and its attention output and log-sum-exp are compared
with dense attention: relative L2 error of the output, mean |LSE error|. On the synthetic field (head dim 64) the
kernels are also timed against dense SDPA, interleaved, with the search time of each selector apart. On the
captured field the pattern searched at one step is also applied 4 steps later (search-then-reuse).

Video part: the bundled Wan video model (``difcache.models.load("video")``), same seeds, dense vs sparse at
top-k density 0.25, PSA density 0.25 and top-p 0.9; PSNR per frame (data range 1), averaged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
import warnings
from functools import partial

import torch
import torch.nn.functional as F

from difcache.attention import (
    AdaSpaSparseConfig,
    PSASparseConfig,
    SVG2SparseConfig,
    TopKSparseConfig,
    TopPSparseConfig,
    apply_sparse_attention,
)
from difcache.attention.reorder import tile_layout
from difcache.attention.selectors import select_pattern
from difcache.attention.svg2 import ClusterPattern
from difcache.bench.timing import interleaved_medians
from difcache.kernels import (
    attention_with_lse,
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
    config = TopKSparseConfig(density=args.density, block_size=bs, tile=None)
    pattern = select_pattern(config, q, k).pattern
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
    schedule = dict(warmup_steps=args.warmup, dense_layers=0)
    blocks = dict(block_size=args.video_block, tile=tuple(args.video_tile), **schedule)
    clusters = dict(q_cluster_size=args.video_block, k_cluster_size=args.video_block // 2, **schedule)

    def run():
        g = torch.Generator().manual_seed(0)
        return pipe(labels, num_inference_steps=args.steps, generator=g).images

    dense = run()
    settings = {
        "topk density 0.25": dict(method="topk", density=0.25, **blocks),
        "topk density 0.25, PSA-sampled estimate": dict(method="topk", density=0.25, estimator="sampled", **blocks),
        "psa density 0.25 (sampled estimate, default)": dict(method="psa", density=0.25, **blocks),
        "psa density 0.25, pooled estimate": dict(method="psa", density=0.25, estimator="pooled", **blocks),
        "topp p 0.9": dict(method="topp", p=0.9, **blocks),
        "adaspa density 0.25 (searched at 20 % and 60 %)": dict(method="adaspa", density=0.25, **blocks),
        "svg2 density 0.25": dict(method="svg2", density=0.25, **clusters),
    }
    rows = {}
    for name, s in settings.items():
        with apply_sparse_attention(pipe, **s) as handle:
            out = run()
            stats = handle.stats()
        rows[name] = {"psnr_db": psnr(out, dense), "sparse_work": stats.sparse_work,
                      "attention_work": stats.attention_work}  # fmt: skip
    grid = dense.shape
    common = {"block": args.video_block, "tile": args.video_tile, **schedule}
    common["svg2_clusters"] = (args.video_block, args.video_block // 2)
    print(f"\nVideo: bundled model, clips {tuple(grid)}, {args.steps} steps, block {args.video_block}, "
          f"tile {tuple(args.video_tile)}, dense warm-up {args.warmup}")  # fmt: skip
    print(
        "| setting | PSNR vs dense (dB) | work of sparse calls | attention work overall |\n|---|---|---|---|"
    )
    for name, r in rows.items():
        print(f"| {name} | {r['psnr_db']:.2f} | {r['sparse_work']:.3f} | {r['attention_work']:.3f} |")
    return {"settings": common, "steps": args.steps, "rows": rows}


# ---------------------------------------------------------------------------------------------- quality
TILE = (2, 8, 8)
GRIDS = {8192: (8, 32, 32), 16384: (16, 32, 32), 32768: (16, 32, 64)}


def selectors(block: int) -> dict[str, tuple]:
    """Name -> (config from the matched-work knob, how the knob is set, backend). ``exact``: the knob is the work;
    ``bisect``: a knob in (0, 1] that work grows with (top-p's ``p = 1 - 10**(-8 x)``: pooled estimates are so
    peaked that matched work needs ``p`` within 1e-6 of 1)."""
    blocks = dict(block_size=block, tile=TILE)
    return {
        "top-k (pooled)": (lambda x: TopKSparseConfig(density=x, **blocks), "exact", "cpp"),
        "top-k (PSA-sampled)": (lambda x: TopKSparseConfig(density=x, estimator="sampled", **blocks), "exact", "cpp"),
        "top-p (pooled)": (lambda x: TopPSparseConfig(p=1 - 10 ** (-8 * x), **blocks), "bisect", "cpp"),
        "PSA (sampled, default)": (lambda x: PSASparseConfig(density=x, **blocks), "exact", "torch"),
        "PSA (pooled)": (lambda x: PSASparseConfig(density=x, estimator="pooled", **blocks), "exact", "torch"),
        "AdaSpa (exact, head-adaptive)": (lambda x: AdaSpaSparseConfig(density=x, **blocks), "exact", "cpp"),
        "top-k (exact, oracle)": (
            lambda x: TopKSparseConfig(density=x, estimator="exact", reuse_steps=2, **blocks), "exact", "cpp"),
        "SVG2 (k-means)": (lambda x: SVG2SparseConfig(density=x), "bisect", "cpp"),
    }  # fmt: skip


def matched(make, how: str, work: float, select, tol: float = 0.01):
    """The selection whose work is ``work`` (bisecting the knob in (0, 1] where it is not the work itself)."""
    if how == "exact":
        return select(make(work))
    lo, hi, best = 1e-3, 1.0, None
    for _ in range(14):
        mid = (lo + hi) / 2
        sel = select(make(mid))
        w = float(sel.pattern.work())
        if best is None or abs(w - work) < abs(float(best.pattern.work()) - work):
            best = sel
        if abs(w - work) < tol * work:
            break
        lo, hi = (mid, hi) if w < work else (lo, mid)
    return best


def errors(out: torch.Tensor, lse: torch.Tensor, ref: torch.Tensor, ref_lse: torch.Tensor) -> dict:
    return {
        "rel_l2": ((out.float() - ref).norm() / ref.norm()).item(),
        "lse_mae": (lse - ref_lse).abs().mean().item(),
    }


def split_clusters(pattern: ClusterPattern, block: int) -> ClusterPattern:
    """The same SVG2 pattern with every cluster cut into pieces of at most ``block`` tokens, listed so that the
    kernel merges nothing: the fixed-block alternative to a variable-block kernel (as a padded GPU layout has it)."""

    def pieces(start, length):
        b, h, c = start.shape
        counts = (length + block - 1) // block  # pieces per cluster
        width = int(counts.max())
        offs = torch.arange(width) * block
        ok = offs < length[..., None]
        st = (start[..., None] + offs).where(ok, 0)
        ln = (length[..., None] - offs).clamp(0, block).where(ok, 0)
        return st.flatten(2), ln.flatten(2), width

    qs, ql, wq = pieces(pattern.q_start, pattern.q_len)
    ks, kl, wk = pieces(pattern.k_start, pattern.k_len)
    listed = torch.arange(pattern.kv_idx.shape[-1]) < pattern.kv_cnt[..., None]
    sub = (pattern.kv_idx[..., None] * wk + torch.arange(wk)).flatten(-2)  # [B, H, Cq, K * wk]
    ok = (listed[..., None].expand(*listed.shape, wk).flatten(-2)) & (kl.gather(-1, sub.flatten(2)).view_as(sub) > 0)
    order = torch.where(ok, sub, -1).sort(dim=-1, descending=True)  # descending: adjacent pieces never merge
    idx, cnt = order.values.clamp(min=0), ok.sum(-1)
    idx = idx.repeat_interleave(wq, dim=2)
    cnt = cnt.repeat_interleave(wq, dim=2)
    return ClusterPattern(pattern.q_perm, pattern.k_perm, qs, ql, ks, kl, idx, cnt, pattern.seq_len)


def padded_fraction(lengths: torch.Tensor, block: int) -> float:
    """Extra share of positions when every cluster is padded to whole blocks."""
    return (((lengths + block - 1) // block * block).sum() / lengths.sum() - 1).mean().item()


def selector_of(inputs: tuple, layout, state: dict):
    """``select(config)`` on fixed inputs; SVG2 clusters once and re-selects on the same clusters afterwards."""

    def select(config):
        if isinstance(config, SVG2SparseConfig) and state:
            config = dataclasses.replace(config, kmeans_iters=0)  # warm start from the final centroids: same labels
        return select_pattern(config, *inputs, layout=layout, state=state)

    return select


def quality_bench(args: argparse.Namespace) -> dict:
    from sparse_fields import capture_bundled, captured_field, synthetic_field

    block = args.block_size
    results = {"block": block, "tile": TILE, "works": args.works, "sizes": {}}
    captures = None
    if "captured" in args.sources:
        captures = capture_bundled(at=(12, 16))
    for n in args.sizes:
        grid = GRIDS[n]
        layout = tile_layout(grid, TILE, block)
        per_size = results["sizes"][str(n)] = {"grid": grid}
        for source in args.sources:
            if source == "synthetic":
                q, k, v = synthetic_field(grid, heads=args.heads, head_dim=args.head_dim)
                later = None
            else:
                q, k, v = captured_field(captures, 12, grid)
                later = captured_field(captures, 16, grid)
            ref, ref_lse = attention_with_lse(q, k, v)
            ref_later = None if later is None else attention_with_lse(*later)
            rows = per_size[source] = {"shape": list(q.shape), "rows": {}}
            for name, (make, how, backend) in selectors(block).items():
                tiled = not name.startswith("SVG2")
                inputs = tuple(layout.gather(x) for x in (q, k, v)) if tiled else (q, k, v)
                state: dict = {}
                select = selector_of(inputs, layout if tiled else None, state)

                for work in args.works:
                    state.clear()
                    sel = matched(make, how, work, select)
                    out, lse = sel.pattern.attend(*inputs, backend, None)
                    if tiled:
                        out, lse = layout.scatter(out), layout.scatter(lse[..., None])[..., 0]
                    row = {"work": float(sel.pattern.work()), "search_cost": sel.cost, **errors(out, lse, ref, ref_lse)}
                    if later is not None:
                        later_in = tuple(layout.gather(x) for x in later) if tiled else later
                        out2, lse2 = sel.pattern.attend(*later_in, backend, None)
                        if tiled:
                            out2, lse2 = layout.scatter(out2), layout.scatter(lse2[..., None])[..., 0]
                        row["reused_4_steps_later"] = errors(out2, lse2, *ref_later)
                        fresh = matched(make, how, work, selector_of(later_in, layout if tiled else None, {}))
                        out3, lse3 = fresh.pattern.attend(*later_in, backend, None)
                        if tiled:
                            out3, lse3 = layout.scatter(out3), layout.scatter(lse3[..., None])[..., 0]
                        row["searched_4_steps_later"] = errors(out3, lse3, *ref_later)
                    rows["rows"].setdefault(name, {})[str(work)] = row
                    print(f"{n} {source} {name} work {row['work']:.3f}: rel L2 {row['rel_l2']:.4f}, "
                          f"LSE {row['lse_mae']:.4f}", flush=True)  # fmt: skip
            if source == "synthetic" and not args.no_timing:
                per_size["timing"] = time_kernels(q, k, v, layout, block, args)
    print_quality(results)
    return results


def time_kernels(q, k, v, layout, block: int, args) -> dict:
    """Dense SDPA against each kernel at every work, interleaved; search times apart (median of 3)."""
    tiled = tuple(layout.gather(x) for x in (q, k, v))
    timing = {}
    for work in args.works:
        topk = select_pattern(TopKSparseConfig(density=work, block_size=block, tile=TILE), *tiled, layout=layout)
        psa = select_pattern(PSASparseConfig(density=work, block_size=block, tile=TILE), *tiled, layout=layout)
        state: dict = {}
        svg2 = matched(lambda x: SVG2SparseConfig(density=x), "bisect", work, selector_of((q, k, v), None, state))
        patterns = {
            "block kernel (top-k pattern)": (topk.pattern, tiled, "cpp"),
            "PSA kernel (torch path)": (psa.pattern, tiled, "torch"),
            "SVG2 permute + variable-block kernel": (svg2.pattern, (q, k, v), "cpp"),
            "SVG2 clusters split into 128-token blocks": (split_clusters(svg2.pattern, block), (q, k, v), "cpp"),
        }
        variants = {"dense SDPA": partial(F.scaled_dot_product_attention, q, k, v)}
        variants |= {name: partial(p.attend, *inputs, backend, None) for name, (p, inputs, backend) in patterns.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seconds = interleaved_medians(variants, repeats=args.repeats, warmup=1)
        works = {name: float(p.work()) for name, (p, _, _) in patterns.items()}
        search = {}
        for name, config, inputs, lay in (
            ("top-k (pooled)", TopKSparseConfig(density=work, block_size=block, tile=TILE), tiled, layout),
            ("PSA (sampled)", PSASparseConfig(density=work, block_size=block, tile=TILE), tiled, layout),
            ("AdaSpa (exact)", AdaSpaSparseConfig(density=work, block_size=block, tile=TILE), tiled, layout),
            ("SVG2 (first search, 10 iterations)", SVG2SparseConfig(density=work), (q, k, v), None),
            ("SVG2 (warm-started, 2 iterations)", SVG2SparseConfig(density=work), (q, k, v), None),
        ):
            warm = {"centroids": state["centroids"]} if "warm" in name else None
            runs = []
            while len(runs) < 3 and sum(runs) < 5.0:  # median of 3, or one run of a search that takes seconds
                st = None if warm is None else dict(warm)
                start = time.perf_counter()
                select_pattern(config, *inputs, layout=lay, state=st)
                runs.append(time.perf_counter() - start)
            search[name] = sorted(runs)[len(runs) // 2]
        pad = {"q": padded_fraction(svg2.pattern.q_len, block), "k": padded_fraction(svg2.pattern.k_len, block)}
        timing[str(work)] = {"seconds": seconds, "work": works, "search_seconds": search, "svg2_padded_fraction": pad}
    return timing


def print_quality(results: dict) -> None:
    works = results["works"]
    for n, per_size in results["sizes"].items():
        for source in ("synthetic", "captured"):
            if source not in per_size:
                continue
            data = per_size[source]
            print(f"\n{source}, N = {n} (grid {tuple(per_size['grid'])}), q/k/v {tuple(data['shape'])}, block "
                  f"{results['block']}, tiles {results['tile']}: relative L2 error of the output / mean |LSE error|")
            head = " | ".join(f"work {w}: rel L2 / LSE" for w in works)
            reuse = source == "captured"
            extra_head = f" 4 steps later, work {works[0]}: pattern reused / searched there |" if reuse else ""
            print(f"| selector | {head} |{extra_head}")
            print("|---|" + "---|" * len(works) + ("---|" if reuse else ""))
            for name, by_work in data["rows"].items():
                cells = " | ".join(f"{r['rel_l2']:.4f} / {r['lse_mae']:.4f} ({r['work']:.3f})"
                                   for r in (by_work[str(w)] for w in works))  # fmt: skip
                extra = ""
                if reuse:
                    first = by_work[str(works[0])]
                    old, new = first["reused_4_steps_later"], first["searched_4_steps_later"]
                    extra = f" {old['rel_l2']:.4f} / {new['rel_l2']:.4f} |"
                print(f"| {name} | {cells} |{extra}")
        for work, timing in per_size.get("timing", {}).items():
            seconds, dense = timing["seconds"], timing["seconds"]["dense SDPA"]
            print(f"\nKernel time, synthetic field, N = {n}, target work {work} (median of interleaved runs, "
                  f"{torch.get_num_threads()} threads)")
            print("| kernel | work | seconds | speedup vs dense | 1/work | fraction of 1/work |")
            print("|---|---|---|---|---|---|")
            print(f"| dense SDPA | 1 | {dense:.3f} | 1.00x | | |")
            for name, w in timing["work"].items():
                speed = dense / seconds[name]
                print(f"| {name} | {w:.3f} | {seconds[name]:.3f} | {speed:.2f}x | {1 / w:.2f}x | {speed * w:.2f} |")
            print("search seconds: " + ", ".join(f"{k} {v:.3f}" for k, v in timing["search_seconds"].items()))
            pad = timing["svg2_padded_fraction"]
            print(f"SVG2 clusters padded to whole {results['block']}-token blocks would add {pad['q']:.0%} query and "
                  f"{pad['k']:.0%} key positions")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("part", choices=["kernel", "quality", "video", "all"], nargs="?", default="all")
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
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768], choices=sorted(GRIDS))
    parser.add_argument("--works", type=float, nargs="+", default=[0.1, 0.2], help="quality: matched work")
    parser.add_argument("--sources", nargs="+", default=["synthetic", "captured"], choices=["synthetic", "captured"])
    parser.add_argument("--no-timing", action="store_true", help="quality: errors only, no kernel timing")
    parser.add_argument("--json", type=str, default="", help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    if args.part in ("kernel", "all"):
        results["kernel"] = kernel_bench(args)
    if args.part in ("quality", "all"):
        results["quality"] = quality_bench(args)
    if args.part in ("video", "all"):
        results["video"] = video_bench(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
