"""Correctness sweep of the block-sparse kernels against the dense fp32 reference.

    TRITON_INTERPRET=1 python bench/block_sparse_attention/sweep.py   # CPU: Triton in the interpreter
    python bench/block_sparse_attention/sweep.py                      # GPU: compiled Triton

Sweeps awkward sequence lengths (not multiples of the block), head dims 64/128, blocks 64/128, GQA, dtypes
and densities 0, 0.15, 0.5, 1; prints the relative RMS error and max abs error of every backend per case.
"""

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _shapes import inputs, rel_rms, topk_lists  # noqa: E402

from difcache.kernels import (  # noqa: E402
    block_sparse_attention,
    block_sparse_attention_reference,
    block_sparse_attention_torch,
    interpreting,
)

device = "cuda" if torch.cuda.is_available() else "cpu"
triton_ok = device == "cuda" or interpreting()
dtypes = [torch.float32, torch.float16, torch.bfloat16]
worst = 0.0
print(
    f"device {device}, triton {'compiled' if device == 'cuda' else 'interpreted' if triton_ok else 'skipped'}"
)
print("| N | D | block | H/Hk | dtype | density | torch rel-RMS | triton rel-RMS | triton max abs |")
print("|---|---|---|---|---|---|---|---|---|")
for n, d, block, (h, hk), dtype, density in itertools.product(
    [63, 333, 1000], [64, 128], [64, 128], [(2, 2), (4, 1)], dtypes, [0.0, 0.15, 0.5, 1.0]
):
    if device == "cpu" and (n > 400 or dtype == torch.bfloat16 and density not in (0.5,)):
        continue  # keep the interpreter run short
    q, k, v = inputs(1, h, hk, n, d, dtype, device)
    idx, cnt, _ = topk_lists(1, h, n, block, density, device)
    if density == 0.0:
        cnt.zero_()
    ref, _ = block_sparse_attention_reference(q.float(), k.float(), v.float(), idx, cnt, block)
    out_t, _ = block_sparse_attention_torch(q, k, v, idx, cnt, block)
    row = [rel_rms(out_t, ref)]
    if triton_ok:
        out, _ = block_sparse_attention(q, k, v, idx, cnt, block)
        row += [rel_rms(out, ref), (out.float() - ref).abs().max().item()]
        worst = max(worst, row[1] if dtype == torch.float32 else 0.0)
    cells = " | ".join(f"{x:.1e}" for x in row) + (" | - | -" if not triton_ok else "")
    print(f"| {n} | {d} | {block} | {h}/{hk} | {str(dtype)[6:]} | {density} | {cells} |")
print(f"worst fp32 triton rel-RMS: {worst:.1e}")
