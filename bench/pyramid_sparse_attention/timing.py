"""Timing of PSA against dense attention; work counts pooled pairs as 2**-level of a full pair.

python bench/pyramid_sparse_attention/timing.py     # GPU: Triton vs SDPA; CPU: torch path vs SDPA
"""

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _shapes import attention_flops, inputs, work_fraction  # noqa: E402

from difcache.attention.patterns import BlockPattern, psa_levels_by_budget  # noqa: E402
from difcache.kernels import pyramid_sparse_attention, pyramid_sparse_attention_torch  # noqa: E402


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


if torch.cuda.is_available():
    cases, device, path = [(1, 24, 32768, 128, torch.bfloat16, 128)], "cuda", pyramid_sparse_attention
else:
    cases, device, path = [(1, 8, 8192, 64, torch.float32, 128)], "cpu", pyramid_sparse_attention_torch
print("| B,H,N,D | dtype | work | coverage | ms | dense ms | speedup | 1/work | TFLOPS (work) |")
print("|---|---|---|---|---|---|---|---|---|")
for b, h, n, d, dtype, block in cases:
    q, k, v = inputs(b, h, h, n, d, dtype, device)
    dense = bench(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
    m = -(-n // block)
    for density in (0.1, 0.15, 0.25, 0.5):
        probs = torch.softmax(torch.randn(b, h, m, m, device=device) * 3, dim=-1)
        pattern = BlockPattern.from_level_map(psa_levels_by_budget(probs, density), block, n, pyramid=True)
        idx, cnt, lvl = pattern.kv_idx, pattern.kv_cnt, pattern.kv_lvl
        work = work_fraction(cnt, m, lvl)
        t = bench(lambda a=(q, k, v, idx, cnt, lvl, block): path(*a))
        print(f"| {b},{h},{n},{d} | {str(dtype)[6:]} | {work:.3f} | {pattern.coverage().item():.3f} | {t * 1e3:.1f} | "
              f"{dense * 1e3:.1f} | {dense / t:.2f}x | {1 / work:.2f}x | "
              f"{attention_flops(b, h, n, d, work) / t / 1e12:.2f} |")  # fmt: skip
