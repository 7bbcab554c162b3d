"""Choosing which (query block, key block) pairs to compute, and the one format every kernel reads.

Scoring (as in SpargeAttn, Zhang et al., arXiv:2502.18137, and diffusers' NABLA): mean-pool the queries and
keys of every block, take the softmax over key blocks of the pooled scores; ``probs[b, h, i, j]`` estimates
how much attention mass query block ``i`` puts on key block ``j``. Then, per batch and head:

* **top-p** (XAttention, arXiv:2503.16428; Sparse VideoGen 2, arXiv:2505.18875): the fewest blocks whose
  estimated mass reaches ``p``, at least ``min_blocks``;
* **top-k** (a fixed budget, steadier at extreme sparsity): ``round(density * M)`` blocks;
* **pyramid levels** (PSA, arXiv:2512.04025): blocks ranked by mass get level 0 (full), 1, 2 or 3 (keys and
  values pooled by 2, 4, 8) or are skipped, either by cumulative-mass thresholds or by a compute budget.

Forced blocks (the diagonal, first-frame sinks) rank first and are always kept at full detail.

:class:`BlockPattern` is the internal format: per (batch, head) query-block -> key-block index lists with
counts, plus a level per entry for PSA (see :mod:`difcache.kernels.block_sparse_attention`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from difcache.kernels._common import expand_kv_heads, listed_slots, pad_blocks

SKIP = -1  # level-map value of a skipped pair
LEVELS = 4


@dataclass(frozen=True)
class BlockPattern:
    """``kv_idx [B, H, M, K]`` (int32), ``kv_cnt [B, H, M]`` (int32), ``kv_lvl [B, H, M, K]`` or ``None``.

    ``kv_idx[b, h, i, :kv_cnt[b, h, i]]`` are the key blocks of query block ``i`` in ascending order; the rest
    of each row is padding (index 0, never read). ``kv_lvl`` (PSA only) gives each entry's pooling level.
    ``dense`` says that every pair is listed at full detail (a budget of 1.0, or top-p taking everything).
    """

    kv_idx: torch.Tensor
    kv_cnt: torch.Tensor
    kv_lvl: torch.Tensor | None
    block_size: int
    seq_len: int
    dense: bool = False  # every pair listed at full detail: plain attention computes the same

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.seq_len / self.block_size)

    @classmethod
    def from_level_map(
        cls, levels: torch.Tensor, block_size: int, seq_len: int, pyramid: bool
    ) -> BlockPattern:
        """From a ``[B, H, M, M]`` level map (``SKIP`` = not computed); ``pyramid=False`` keeps no levels."""
        m = levels.shape[-1]
        kept = levels != SKIP
        ar = torch.arange(m, device=levels.device)
        order = torch.where(kept, ar, m + ar).argsort(dim=-1)  # kept blocks first, ascending
        cnt = kept.sum(dim=-1, dtype=torch.int32)
        full = (levels == 0).all()
        width, dense = torch.stack(
            [cnt.max(), full.int()]
        ).tolist()  # one host sync per pattern, not per call
        width = max(1, width)
        order = order[..., :width]
        idx = torch.where(ar[:width] < cnt[..., None], order, 0).to(torch.int32)
        lvl = levels.gather(-1, order).clamp_min(0).to(torch.int32) if pyramid else None
        lvl = None if lvl is None else lvl.contiguous()
        return cls(idx.contiguous(), cnt.contiguous(), lvl, block_size, seq_len, bool(dense))

    @classmethod
    def from_mask(cls, mask: torch.Tensor, block_size: int, seq_len: int) -> BlockPattern:
        """From a ``[B, H, M, M]`` bool block mask."""
        levels = torch.where(mask, 0, SKIP).to(torch.int8)
        return cls.from_level_map(levels, block_size, seq_len, pyramid=False)

    def level_map(self) -> torch.Tensor:
        """``[B, H, M, M]`` int8: the level of every pair, ``SKIP`` where skipped."""
        b, h, m, width = self.kv_idx.shape
        listed = listed_slots(self.kv_cnt, width)
        lvl = torch.zeros_like(self.kv_idx) if self.kv_lvl is None else self.kv_lvl
        out = torch.full((b, h, m, m + 1), SKIP, dtype=torch.int8, device=self.kv_idx.device)
        out.scatter_(3, torch.where(listed, self.kv_idx.long(), m), lvl.to(torch.int8))
        return out[..., :m]

    def work(self) -> torch.Tensor:
        """Fraction of dense attention work done (a 0-d fp32 tensor; pooled pairs count ``2**-level``)."""
        levels = self.level_map()
        weight = torch.where(levels == SKIP, 0.0, torch.exp2(-levels.float().clamp_min(0)))
        return weight.mean()

    def coverage(self) -> torch.Tensor:
        """Fraction of pairs computed at any level (0-d tensor)."""
        return (self.level_map() != SKIP).float().mean()


def pooled_block_scores(
    q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float | None = None
) -> torch.Tensor:
    """``probs [B, H, M, M]`` (fp32): softmax over key blocks of mean-pooled query . mean-pooled key.

    The last partial block is averaged over its real tokens only.
    """
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    m = math.ceil(n / block_size)
    counts = torch.full((m,), float(block_size), device=q.device)
    counts[-1] = n - (m - 1) * block_size
    qp = pad_blocks(q.float(), block_size).sum(dim=3) / counts[:, None]
    kp = pad_blocks(expand_kv_heads(k, h).float(), block_size).sum(dim=3) / counts[:, None]
    return torch.softmax((qp @ kp.transpose(-1, -2)) * scale, dim=-1)


def _ranked(probs: torch.Tensor, forced: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, mass_before)``: blocks by descending priority (forced first) and the mass ranked above each."""
    priority = probs if forced is None else probs + 2.0 * forced.float()
    order = priority.argsort(dim=-1, descending=True)
    sorted_mass = probs.gather(-1, order)
    return order, sorted_mass.cumsum(dim=-1) - sorted_mass


def _scatter_sorted(order: torch.Tensor, sorted_values: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(sorted_values).scatter_(-1, order, sorted_values)


def topp_mask(
    probs: torch.Tensor, p: float, min_blocks: int = 1, forced: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, H, M, M]`` bool: per row the fewest top blocks whose mass reaches ``p`` (forced ones first)."""
    m = probs.shape[-1]
    if p >= 1.0:
        return torch.ones_like(probs, dtype=torch.bool)
    order, before = _ranked(probs, forced)
    rank = torch.arange(m, device=probs.device)
    keep_sorted = (before < p) | (rank < min(min_blocks, m))
    if forced is not None:
        keep_sorted |= forced.gather(-1, order)
    return _scatter_sorted(order, keep_sorted)


def topk_mask(probs: torch.Tensor, k: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, H, M, M]`` bool: per row the ``k`` highest-mass blocks (forced ones first, and always kept)."""
    m = probs.shape[-1]
    order, _ = _ranked(probs, forced)
    keep_sorted = torch.arange(m, device=probs.device).expand_as(probs) < min(k, m)
    if forced is not None:
        keep_sorted = keep_sorted | forced.gather(-1, order)
    return _scatter_sorted(order, keep_sorted)


def budget_blocks(density: float, m: int, min_blocks: int = 1) -> int:
    """Key blocks per row for a ``density`` budget: ``round(density * m)``, within ``[min_blocks, m]``."""
    return max(min(min_blocks, m), min(m, round(density * m)))


def psa_levels_by_mass(
    probs: torch.Tensor,
    thresholds: tuple[float, float, float, float],
    min_blocks: int = 1,
    forced: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, H, M, M]`` int8 levels: a block whose ranked-before mass is below ``thresholds[l]`` (first such
    ``l``) gets level ``l``; beyond the last threshold it is skipped. The top ``min_blocks`` and forced
    blocks are full. A bound of 1 takes every remaining block (``thresholds[0] == 1`` is dense)."""
    m = probs.shape[-1]
    order, before = _ranked(probs, forced)
    level = torch.full_like(before, SKIP, dtype=torch.int8)
    for lv in reversed(range(LEVELS)):
        within = (
            before < thresholds[lv] if thresholds[lv] < 1.0 else torch.ones_like(before, dtype=torch.bool)
        )
        level = torch.where(within, lv, level).to(
            torch.int8
        )  # a bound of 1 takes all (cumsum may round past 1)
    rank = torch.arange(m, device=probs.device)
    level = torch.where(rank < min(min_blocks, m), 0, level).to(torch.int8)
    if forced is not None:
        level = torch.where(forced.gather(-1, order), 0, level).to(torch.int8)
    return _scatter_sorted(order, level)


def psa_level_counts(density: float, m: int, full_share: float = 0.5, min_blocks: int = 1) -> list[int]:
    """Blocks per row at levels 0..3 for a compute budget ``density`` (fraction of dense work).

    A share ``r`` of the budget goes to full blocks and the rest is split evenly over the three pooled
    levels, so level ``l`` covers ``2**l`` times as many blocks as its compute. When that would cover more
    than all ``m`` blocks, ``r`` grows until coverage is exactly ``m``; ``density >= 1`` is all full.
    """
    if density >= 1.0:
        return [m, 0, 0, 0]
    pooled_cover = (2 + 4 + 8) / 3  # coverage per unit of compute, averaged over the pooled levels
    r_fit = (pooled_cover - 1.0 / density) / (pooled_cover - 1.0)  # coverage == m exactly
    r = max(full_share, r_fit)
    budget = density * m
    counts = [max(min(min_blocks, m), round(r * budget))]
    for lv in (1, 2, 3):
        counts.append(round((1 - r) * budget / 3 * 2**lv))
    left = m
    for i, c in enumerate(counts):  # never more than m blocks in all
        counts[i] = min(c, left)
        left -= counts[i]
    return counts


def psa_levels_by_budget(
    probs: torch.Tensor,
    density: float,
    full_share: float = 0.5,
    min_blocks: int = 1,
    forced: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, H, M, M]`` int8 levels from a fixed per-row quota (:func:`psa_level_counts`), ranked by mass."""
    m = probs.shape[-1]
    counts = psa_level_counts(density, m, full_share, min_blocks)
    order, _ = _ranked(probs, forced)
    rank = torch.arange(m, device=probs.device)
    level = torch.full((m,), SKIP, dtype=torch.int8, device=probs.device)
    start = 0
    for lv, c in enumerate(counts):
        level[(rank >= start) & (rank < start + c)] = lv
        start += c
    level = level.expand_as(probs)
    if forced is not None:
        level = torch.where(forced.gather(-1, order), 0, level).to(torch.int8)
    return _scatter_sorted(order, level.contiguous())
