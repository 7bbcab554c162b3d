"""Timing of block-sparse attention against dense attention, with TFLOPS from an explicit FLOP count.

    python bench/block_sparse_attention/timing.py            # GPU: Triton vs SDPA; CPU: flex/torch/cpp vs SDPA

On CUDA it times the Triton kernel with ``triton.testing.do_bench`` at video shapes; on CPU the compiled
FlexAttention, gathered-torch and C++ paths at N=8192, H=8, D=64 fp32 (see scripts/bench_sparse.py for the
interleaved benchmark recorded in BENCHMARKS.md). FLOPs = 4 * D * kept (query, key) token pairs.
"""

import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _shapes import attention_flops, inputs, topk_lists, work_fraction  # noqa: E402

from difcache.kernels import (  # noqa: E402
    block_sparse_attention,
    block_sparse_attention_cpp,
    block_sparse_attention_flex,
    block_sparse_attention_torch,
    cpu_extension,
)


def bench(fn, reps=5):
    if torch.cuda.is_available():
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=100) / 1e3
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


warnings.simplefilter("ignore")
if torch.cuda.is_available():
    cases = [(1, 24, 32768, 128, torch.bfloat16, 128), (1, 40, 32760, 128, torch.bfloat16, 128),
             (1, 24, 16384, 64, torch.float16, 64)]  # fmt: skip
    paths = {"triton": block_sparse_attention}
    device = "cuda"
else:
    cases = [(1, 8, 8192, 64, torch.float32, 128)]
    paths = {"flex": block_sparse_attention_flex, "torch": block_sparse_attention_torch}
    if cpu_extension.load() is not None:
        paths["cpp"] = block_sparse_attention_cpp
    device = "cpu"
print("| B,H,N,D | dtype | density | path | ms | dense ms | speedup | 1/density | TFLOPS |")
print("|---|---|---|---|---|---|---|---|---|")
for b, h, n, d, dtype, block in cases:
    q, k, v = inputs(b, h, h, n, d, dtype, device)
    dense = bench(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
    for density in (0.1, 0.15, 0.25, 0.5):
        idx, cnt, _ = topk_lists(b, h, n, block, density, device)
        work = work_fraction(cnt, idx.shape[2])
        for name, fn in paths.items():
            t = bench(lambda fn=fn, q=q, k=k, v=v, idx=idx, cnt=cnt, block=block: fn(q, k, v, idx, cnt, block))
            tflops = attention_flops(b, h, n, d, work) / t / 1e12
            print(f"| {b},{h},{n},{d} | {str(dtype)[6:]} | {work:.3f} | {name} | {t * 1e3:.1f} | {dense * 1e3:.1f} | "
                  f"{dense / t:.2f}x | {1 / work:.2f}x | {tflops:.2f} |")  # fmt: skip
