"""Shared helpers of the kernel workbench: random inputs and patterns, FLOP/byte counts, error metrics."""

from __future__ import annotations

import math

import torch


def inputs(b, h, hk, n, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g)
    k, v = torch.randn(b, hk, n, d, generator=g), torch.randn(b, hk, n, d, generator=g)
    return (x.to(device=device, dtype=dtype) for x in (q, k, v))


def topk_lists(b, h, n, block, density, device="cpu", seed=0, levels=False):
    """Per-row random top-k lists with the diagonal kept; with ``levels`` also random PSA levels 0..3."""
    g = torch.Generator().manual_seed(seed)
    m = math.ceil(n / block)
    scores = torch.rand(b, h, m, m, generator=g)
    scores[..., torch.arange(m), torch.arange(m)] = 2.0
    width = max(1, min(m, round(density * m)))
    idx = scores.topk(width, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
    cnt = torch.full((b, h, m), width, dtype=torch.int32)
    lvl = torch.randint(0, 4, idx.shape, generator=g).to(torch.int32) if levels else None
    return idx.to(device), cnt.to(device), None if lvl is None else lvl.to(device)


def work_fraction(cnt, m, lvl=None):
    """Fraction of dense attention work the lists ask for (pooled entries weigh 2**-level)."""
    if lvl is None:
        return cnt.float().sum().item() / (cnt.numel() * m)
    listed = torch.arange(lvl.shape[-1], device=lvl.device) < cnt[..., None]
    return (listed * torch.exp2(-lvl.float())).sum().item() / (cnt.numel() * m)


def attention_flops(b, h, n, d, work=1.0):
    """4 N^2 D per (batch, head): Q K^T and P V, two FLOPs per multiply-add; times the work fraction."""
    return 4.0 * b * h * n * n * d * work


def rel_rms(a, b):
    a, b = a.float(), b.float()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-12)).item()
