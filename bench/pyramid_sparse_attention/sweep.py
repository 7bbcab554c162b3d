"""Correctness sweep of the PSA kernels (random levels 0..3) against the dense fp32 reference.

TRITON_INTERPRET=1 python bench/pyramid_sparse_attention/sweep.py   # CPU: Triton in the interpreter
python bench/pyramid_sparse_attention/sweep.py                      # GPU: compiled Triton
"""

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _shapes import inputs, rel_rms, topk_lists  # noqa: E402

from difcache.kernels import (  # noqa: E402
    interpreting,
    pyramid_sparse_attention,
    pyramid_sparse_attention_reference,
    pyramid_sparse_attention_torch,
)

device = "cuda" if torch.cuda.is_available() else "cpu"
triton_ok = device == "cuda" or interpreting()
worst = 0.0
print(
    f"device {device}, triton {'compiled' if device == 'cuda' else 'interpreted' if triton_ok else 'skipped'}"
)
print("| N | D | block | H/Hk | dtype | density | torch rel-RMS | triton rel-RMS | triton max abs |")
print("|---|---|---|---|---|---|---|---|---|")
for n, d, block, (h, hk), dtype, density in itertools.product(
    [63, 333, 1000],
    [64, 128],
    [64, 128],
    [(2, 2), (4, 1)],
    [torch.float32, torch.float16, torch.bfloat16],
    [0.15, 0.5, 1.0],
):
    if device == "cpu" and (n > 400 or dtype == torch.bfloat16 and density != 0.5):
        continue
    q, k, v = inputs(1, h, hk, n, d, dtype, device)
    idx, cnt, lvl = topk_lists(1, h, n, block, density, device, levels=True)
    ref, _ = pyramid_sparse_attention_reference(q.float(), k.float(), v.float(), idx, cnt, lvl, block)
    row = [rel_rms(pyramid_sparse_attention_torch(q, k, v, idx, cnt, lvl, block)[0], ref)]
    if triton_ok:
        out, _ = pyramid_sparse_attention(q, k, v, idx, cnt, lvl, block)
        row += [rel_rms(out, ref), (out.float() - ref).abs().max().item()]
        worst = max(worst, row[1] if dtype == torch.float32 else 0.0)
    cells = " | ".join(f"{x:.1e}" for x in row) + (" | - | -" if not triton_ok else "")
    print(f"| {n} | {d} | {block} | {h}/{hk} | {str(dtype)[6:]} | {density} | {cells} |")
print(f"worst fp32 triton rel-RMS: {worst:.1e}")
