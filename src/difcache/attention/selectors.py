"""The registered pattern selectors: one ``select(config, context) -> Selection`` per sparse attention method.

A selector sees the video part of one attention call (queries, keys and values in its layout's order) and
returns the pattern the kernels run, what the search cost, and, when the search itself computed the attention
(AdaSpa's exact search runs dense), that output. Registering a new method is a config class and one function
here (:func:`difcache.attention.config.register_sparse_method`).

Search cost is reported in units of the dense attention call it serves (its FLOPs ``4 N^2 D`` per head):
pooled scores cost ``~(M / N)^2``, PSA's sampled scores ``1/32`` (a quarter of the tokens on each side, scores
only), AdaSpa's exact search ``1.5`` (the dense pass plus one pass over the scores), SVG2's k-means
``iterations * (Cq + Ck) / (2 N)`` plus the centroid scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from difcache.attention.config import (
    AdaSpaSparseConfig,
    BlockSparseConfig,
    PSASparseConfig,
    SVG2SparseConfig,
    TopKSparseConfig,
    TopPSparseConfig,
    register_sparse_method,
    sparse_method,
)
from difcache.attention.patterns import (
    BlockPattern,
    budget_blocks,
    exact_block_mass,
    head_adaptive_counts,
    pooled_block_scores,
    psa_levels_by_budget,
    psa_levels_by_mass,
    sampled_block_scores,
    topk_mask,
    topp_mask,
)
from difcache.attention.reorder import TileLayout
from difcache.attention.svg2 import ClusterPattern, kmeans, select_clusters
from difcache.kernels import attention_with_lse
from difcache.kernels._common import mask_padding_rows, token_valid


@dataclass
class SelectContext:
    """One attention call's video part, in the selector's token order, and where to keep state between searches.

    ``q, k, v [B, H, N, D]``; ``layout``: the tiled (maybe padded) layout they are in (block methods);
    ``sink [M]``: key blocks always kept (first-frame sinks); ``state``: a dict kept per (layer, CFG branch)
    for the run (SVG2's centroids).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float | None = None
    layout: TileLayout | None = None
    sink: torch.Tensor | None = None
    state: dict = field(default_factory=dict)


@dataclass
class Selection:
    """A pattern, its search cost (dense-attention-call units) and, when the search computed it, the output."""

    pattern: Any
    cost: float
    output: tuple[torch.Tensor, torch.Tensor] | None = None


# ---------------------------------------------------------------------------------------------- block selectors
def block_scores(
    config: BlockSparseConfig, ctx: SelectContext
) -> tuple[torch.Tensor, torch.Tensor | None, tuple | None, float]:
    """``(probs, forced, output, cost)`` of ``config.estimator``; ``forced`` includes the diagonal and sinks."""
    q, k = ctx.q, ctx.k
    b, h, n, d = q.shape
    bs = config.block_size
    block_len = None if ctx.layout is None else ctx.layout.block_len
    m = math.ceil(n / bs)
    output, forced = None, None
    if config.estimator == "pooled":
        probs, forced = pooled_block_scores(q, k, bs, ctx.scale, block_len, config.sim_threshold)
        cost = (m / n) ** 2 / 2 + 1 / (2 * n)
    elif config.estimator == "sampled":
        probs = sampled_block_scores(q, k, bs, ctx.scale, block_len)
        cost = 1 / 32
    else:
        real = token_valid(n, bs, block_len, q.device)
        out, lse = attention_with_lse(q, k, ctx.v, real.expand(b, -1), ctx.scale)
        out, lse = mask_padding_rows(out, lse, bs, block_len)
        probs = exact_block_mass(q, k, lse, bs, ctx.scale, block_len)
        output, cost = (out.to(q.dtype), lse), 1.5
    extra = []
    if config.keep_diagonal:
        extra.append(torch.eye(m, dtype=torch.bool, device=q.device))
    if ctx.sink is not None:
        extra.append(ctx.sink.expand(m, m))
    for mask in extra:
        forced = mask.expand_as(probs) if forced is None else forced | mask
    return probs, forced, output, cost


def _block_selection(config: BlockSparseConfig, ctx: SelectContext, mask_of) -> Selection:
    probs, forced, output, cost = block_scores(config, ctx)
    block_len = None if ctx.layout is None else ctx.layout.block_len
    pattern = BlockPattern.from_mask(mask_of(probs, forced), config.block_size, ctx.q.shape[2], block_len)
    return Selection(pattern, cost, output)


@register_sparse_method(TopKSparseConfig, "top-k key blocks per query block (a fixed budget)")
def select_topk(config: TopKSparseConfig, ctx: SelectContext) -> Selection:
    def mask_of(probs, forced):
        return topk_mask(probs, budget_blocks(config.density, probs.shape[-1], config.min_blocks), forced)

    return _block_selection(config, ctx, mask_of)


@register_sparse_method(TopPSparseConfig, "fewest key blocks reaching attention mass p (XAttention, SVG2)")
def select_topp(config: TopPSparseConfig, ctx: SelectContext) -> Selection:
    return _block_selection(config, ctx, lambda probs, forced: topp_mask(probs, config.p, config.min_blocks, forced))


@register_sparse_method(AdaSpaSparseConfig, "AdaSpa: exact search at a few steps, head-adaptive top-k, reuse")
def select_adaspa(config: AdaSpaSparseConfig, ctx: SelectContext) -> Selection:
    def mask_of(probs, forced):
        return topk_mask(probs, head_adaptive_counts(probs, config.density, config.min_blocks), forced)

    return _block_selection(config, ctx, mask_of)


@register_sparse_method(PSASparseConfig, "pyramid sparse attention: key blocks at pooled levels of detail (PSA)")
def select_psa(config: PSASparseConfig, ctx: SelectContext) -> Selection:
    probs, forced, output, cost = block_scores(config, ctx)
    if config.density is not None:
        levels = psa_levels_by_budget(probs, config.density, config.full_share, config.min_blocks, forced)
    else:
        levels = psa_levels_by_mass(probs, config.thresholds, config.min_blocks, forced)
    block_len = None if ctx.layout is None else ctx.layout.block_len
    pattern = BlockPattern.from_level_map(levels, config.block_size, ctx.q.shape[2], True, block_len)
    return Selection(pattern, cost, output)


# ---------------------------------------------------------------------------------------------- SVG2
@register_sparse_method(SVG2SparseConfig, "Sparse VideoGen 2: k-means clusters of q and k, top-p cluster pairs")
def select_svg2(config: SVG2SparseConfig, ctx: SelectContext) -> Selection:
    q, k = ctx.q, ctx.k
    b, h, n, d = q.shape
    scale = d**-0.5 if ctx.scale is None else ctx.scale
    kh = k if k.shape[1] == h else k.repeat_interleave(h // k.shape[1], dim=1)
    cq, ck = (max(1, min(n, math.ceil(n / size))) for size in (config.q_cluster_size, config.k_cluster_size))
    xq, xk = q.float().flatten(0, 1), kh.float().flatten(0, 1)  # [B * H, N, D]
    warm = ctx.state.get("centroids")
    if warm is not None and warm[0].shape == (b * h, cq, d) and warm[1].shape == (b * h, ck, d):
        iters, q_init, k_init = config.kmeans_iters, warm[0], warm[1]
    else:
        iters, q_init, k_init = config.kmeans_init_iters, None, None
    q_labels, q_centroids, q_sizes = kmeans(xq, cq, iters, q_init)
    k_labels, k_centroids, k_sizes = kmeans(xk, ck, iters, k_init)
    ctx.state["centroids"] = (q_centroids, k_centroids)
    keep = select_clusters(q_centroids, k_centroids, k_sizes, scale, config.p, config.density, config.min_kc_ratio)
    pattern = ClusterPattern.build(q_labels, k_labels, q_sizes, k_sizes, keep, (b, h))
    cost = (iters + 1) * (cq + ck) / (2 * n) + cq * ck / (2 * n * n)
    return Selection(pattern, cost)


def select_pattern(
    config: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None = None,
    scale: float | None = None,
    layout: TileLayout | None = None,
    state: dict | None = None,
) -> Selection:
    """Run ``config``'s registered selector on ``q, k (, v) [B, H, N, D]`` outside a model (benchmarks, tests).

    ``v`` is needed by the exact estimator only; ``state`` carries SVG2's centroids from one call to the next.
    """
    ctx = SelectContext(q, k, k if v is None else v, scale, layout, None, {} if state is None else state)
    return sparse_method(config).select(config, ctx)
