"""Choosing which (query block, key block) pairs to compute, and the one format every kernel reads.

Estimating how much attention mass query block ``i`` puts on key block ``j`` (``probs[b, h, i, j]``, rows sum
to 1), three ways:

* **pooled** (SpargeAttn, Zhang et al., arXiv:2502.18137, and diffusers' NABLA): the softmax over key blocks of
  mean-pooled query . mean-pooled key; optionally guarded by SpargeAttn's self-similarity check;
* **sampled** (PSA's own): exact attention among a quarter of each block's tokens, max-pooled per block pair;
* **exact** (AdaSpa): the true block mass from a dense pass and its log-sum-exp.

Then, per batch and head:

* **top-p** (XAttention, arXiv:2503.16428; Sparse VideoGen 2, arXiv:2505.18875): the fewest blocks whose
  estimated mass reaches ``p``, at least ``min_blocks``;
* **top-k** (a fixed budget, steadier at extreme sparsity): ``round(density * M)`` blocks, or a budget spread
  over the heads by their concentration (AdaSpa's head-adaptive top-k);
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

from difcache.kernels import sparse_attention
from difcache.kernels._common import block_lengths, expand_kv_heads, listed_slots, pad_blocks, token_valid

SKIP = -1  # level-map value of a skipped pair
LEVELS = 4


@dataclass(frozen=True)
class BlockPattern:
    """``kv_idx [B, H, M, K]`` (int32), ``kv_cnt [B, H, M]`` (int32), ``kv_lvl [B, H, M, K]`` or ``None``.

    ``kv_idx[b, h, i, :kv_cnt[b, h, i]]`` are the key blocks of query block ``i`` in ascending order; the rest
    of each row is padding (index 0, never read). ``kv_lvl`` (PSA only) gives each entry's pooling level.
    ``dense`` says that every pair is listed at full detail (a budget of 1.0, or top-p taking everything).
    ``block_len [M]``: the blocks of a padded layout hold this many real tokens each (``None``: all full but a
    partial last one); see :func:`difcache.kernels._common.block_lengths`.
    """

    kv_idx: torch.Tensor
    kv_cnt: torch.Tensor
    kv_lvl: torch.Tensor | None
    block_size: int
    seq_len: int
    dense: bool = False  # every pair listed at full detail: plain attention computes the same
    block_len: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.seq_len / self.block_size)

    @classmethod
    def from_level_map(
        cls,
        levels: torch.Tensor,
        block_size: int,
        seq_len: int,
        pyramid: bool,
        block_len: torch.Tensor | None = None,
    ) -> BlockPattern:
        """From a ``[B, H, M, M]`` level map (``SKIP`` = not computed); ``pyramid=False`` keeps no levels."""
        m = levels.shape[-1]
        kept = levels != SKIP
        ar = torch.arange(m, device=levels.device)
        order = torch.where(kept, ar, m + ar).argsort(dim=-1)  # kept blocks first, ascending
        cnt = kept.sum(dim=-1, dtype=torch.int32)
        full = (levels == 0).all()
        width, dense = torch.stack([cnt.max(), full.int()]).tolist()  # one host sync per pattern, not per call
        width = max(1, width)
        order = order[..., :width]
        idx = torch.where(ar[:width] < cnt[..., None], order, 0).to(torch.int32)
        lvl = levels.gather(-1, order).clamp_min(0).to(torch.int32).contiguous() if pyramid else None
        return cls(idx.contiguous(), cnt.contiguous(), lvl, block_size, seq_len, bool(dense), block_len)

    @classmethod
    def from_mask(
        cls, mask: torch.Tensor, block_size: int, seq_len: int, block_len: torch.Tensor | None = None
    ) -> BlockPattern:
        """From a ``[B, H, M, M]`` bool block mask."""
        levels = torch.where(mask, 0, SKIP).to(torch.int8)
        return cls.from_level_map(levels, block_size, seq_len, pyramid=False, block_len=block_len)

    def level_map(self) -> torch.Tensor:
        """``[B, H, M, M]`` int8: the level of every pair, ``SKIP`` where skipped."""
        b, h, m, width = self.kv_idx.shape
        listed = listed_slots(self.kv_cnt, width)
        lvl = torch.zeros_like(self.kv_idx) if self.kv_lvl is None else self.kv_lvl
        out = torch.full((b, h, m, m + 1), SKIP, dtype=torch.int8, device=self.kv_idx.device)
        out.scatter_(3, torch.where(listed, self.kv_idx.long(), m), lvl.to(torch.int8))
        return out[..., :m]

    def _pair_weights(self) -> torch.Tensor:
        """``[M, M]``: each block pair's share of dense work (real query rows x real keys / real tokens^2)."""
        lengths = block_lengths(self.seq_len, self.block_size, self.block_len, self.kv_idx.device).float()
        return torch.outer(lengths, lengths) / lengths.sum().square()

    def work(self) -> torch.Tensor:
        """Fraction of dense attention work done (a 0-d fp32 tensor; pooled pairs count ``2**-level``)."""
        levels = self.level_map()
        weight = torch.where(levels == SKIP, 0.0, torch.exp2(-levels.float().clamp_min(0)))
        return (weight * self._pair_weights()).sum(dim=(-1, -2)).mean()

    def coverage(self) -> torch.Tensor:
        """Fraction of the work covered at any level (0-d tensor)."""
        return ((self.level_map() != SKIP).float() * self._pair_weights()).sum(dim=(-1, -2)).mean()

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, scale: float | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of ``q, k, v [B, H, N, D]`` (in this pattern's block order) with ``backend``: ``(out, lse)``."""
        return sparse_attention(
            q, k, v, self.kv_idx, self.kv_cnt, self.kv_lvl, self.block_size, backend, scale, self.block_len
        )


def pooled_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    block_len: torch.Tensor | None = None,
    sim_threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(probs [B, H, M, M] fp32, forced)``: softmax over key blocks of mean-pooled query . mean-pooled key.

    Blocks are averaged over their real tokens (a partial last block, or ``block_len`` of a padded layout).
    With ``sim_threshold`` (SpargeAttn, arXiv:2502.18137) a block whose tokens' mean cosine similarity is below it
    is not summarised by its mean: such key blocks get no estimated mass and are always kept, and such query
    blocks keep every key block; ``forced [B, H, M, M]`` (bool) says which pairs that adds (``None`` without it).
    """
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    counts = block_lengths(n, block_size, block_len, q.device).float()
    real = token_valid(n, block_size, block_len, q.device)[:, None].float()
    qb = pad_blocks(q.float() * real, block_size)
    kb = pad_blocks(expand_kv_heads(k, h).float() * real, block_size)
    qp, kp = qb.sum(dim=3) / counts[:, None], kb.sum(dim=3) / counts[:, None]
    scores = (qp @ kp.transpose(-1, -2)) * scale
    if sim_threshold is None:
        return torch.softmax(scores, dim=-1), None
    q_odd = block_similarity(qb, counts) < sim_threshold  # [B, H, M]
    k_odd = block_similarity(kb, counts) < sim_threshold
    scores = scores.masked_fill(k_odd[:, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row of only odd keys has no estimate
    return probs, q_odd[..., None] | k_odd[:, :, None, :]


def block_similarity(blocks: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``[B, H, M]``: mean pairwise cosine similarity of each block's tokens (``||mean of unit vectors||^2``).

    ``blocks [B, H, M, S, D]`` with padding rows zero (they add nothing to the sum), ``counts [M]`` real tokens.
    """
    unit = torch.nn.functional.normalize(blocks, dim=-1)
    return (unit.sum(dim=3) / counts[:, None]).pow(2).sum(dim=-1)


def sampled_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    block_len: torch.Tensor | None = None,
    seed: int = 0,
    row_chunk: int = 2048,
) -> torch.Tensor:
    """``probs [B, H, M, M]``: PSA's block importance (Li et al., arXiv:2512.04025, its ``attn_with_pooling``).

    A quarter of each query block's and key block's tokens are sampled (the same random offsets in every block
    of a head, within each block's real tokens); exact softmax attention runs among the sampled tokens; the
    importance of a block pair is the largest probability any sampled query of the query block gives any sampled
    key of the key block (max pooling, which keeps a block that a few tokens attend to strongly), normalised over
    key blocks. Sampling is seeded (``seed``), so a pattern is reproducible. Cost: ``1/16`` of the dense QK^T.
    """
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    m = math.ceil(n / block_size)
    lengths = block_lengths(n, block_size, block_len, q.device)
    per_block = max(1, block_size // 4)
    g = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.rand(b, h, 1, per_block, generator=g).to(q.device)
    offsets = (u * lengths[:, None]).long()  # [B, H, M, S]: sample i of block j, inside its real tokens
    pos = (torch.arange(m, device=q.device)[:, None] * block_size + offsets).flatten(2)  # [B, H, M * S]
    kh = expand_kv_heads(k, h)
    qs = q.float().gather(2, pos[..., None].expand(-1, -1, -1, d))
    ks = kh.float().gather(2, pos[..., None].expand(-1, -1, -1, d))
    out = torch.empty(b, h, m, m, device=q.device)
    rows = m * per_block
    for r0 in range(0, rows, row_chunk):
        r1 = min(rows, r0 + row_chunk)
        p = torch.softmax((qs[:, :, r0:r1] @ ks.transpose(-1, -2)) * scale, dim=-1)  # [B, H, r, M * S]
        p = p.unflatten(-1, (m, per_block)).amax(dim=-1)  # [B, H, r, M]: max over each key block's samples
        out_rows = p.unflatten(2, (-1, per_block)).amax(dim=3)  # rows r0..r1 hold whole query blocks
        out[:, :, r0 // per_block : r1 // per_block] = out_rows
    return out / out.sum(dim=-1, keepdim=True).clamp_min(1e-30)


def exact_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    block_len: torch.Tensor | None = None,
    chunk_bytes: int = 16 << 20,
) -> torch.Tensor:
    """``probs [B, H, M, M]``: the exact attention mass each query block puts on each key block (AdaSpa).

    ``lse [B, H, N]`` is the log-sum-exp of the full attention rows (from a dense pass), so one more pass over the
    scores gives every probability ``exp(q.k * scale - lse)`` without normalising again: AdaSpa's LSE-cached
    search (Xia et al., arXiv:2502.21079). Mass per pair is the mean over the query block's real rows of the summed
    probabilities of the key block's keys; rows sum to 1. Padding keys and rows count nothing. Scores are formed
    per (batch, head) in row chunks of about ``chunk_bytes``.
    """
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    m = math.ceil(n / block_size)
    real = token_valid(n, block_size, block_len, q.device)
    counts = block_lengths(n, block_size, block_len, q.device).float()
    kh = expand_kv_heads(k, h).float()
    safe_lse = lse.float().masked_fill(~torch.isfinite(lse), float("inf"))  # rows without keys contribute 0
    key_weight = None if block_len is None else real.float()
    rows = max(block_size, chunk_bytes // (4 * n) // block_size * block_size)
    whole = n // block_size * block_size
    mass = torch.zeros(b, h, m, m, device=q.device)
    buffer = torch.empty(min(rows, n) * n, device=q.device)  # reused: fresh score tensors page-fault on CPU
    for bi in range(b):
        for hi in range(h):
            keys_t = kh[bi, hi].T
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                p = torch.mm(q[bi, hi, r0:r1].float(), keys_t, out=buffer[: (r1 - r0) * n].view(r1 - r0, n))
                p.mul_(scale)
                p.sub_(safe_lse[bi, hi, r0:r1, None]).clamp_(min=-80.0).exp_()  # no denormals (slow), < 2e-35
                if key_weight is not None:
                    p.mul_(key_weight)
                per_key_block = p[:, :whole].view(r1 - r0, -1, block_size).sum(-1)
                if whole < n:
                    per_key_block = torch.cat([per_key_block, p[:, whole:].sum(-1, keepdim=True)], dim=-1)
                blocks = per_key_block.split(block_size)  # r0 is a multiple of block_size: whole query blocks
                first = r0 // block_size
                mass[bi, hi, first : first + len(blocks)] = torch.stack([x.sum(0) for x in blocks])
    return mass / counts[:, None]


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


def topk_mask(probs: torch.Tensor, k: int | torch.Tensor, forced: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, H, M, M]`` bool: per row the ``k`` highest-mass blocks (forced ones first, and always kept).

    ``k`` is one count, or a ``[B, H]`` tensor of counts per head (:func:`head_adaptive_counts`).
    """
    m = probs.shape[-1]
    order, _ = _ranked(probs, forced)
    limit = min(k, m) if isinstance(k, int) else k.clamp(max=m)[..., None, None]
    keep_sorted = torch.arange(m, device=probs.device).expand_as(probs) < limit
    if forced is not None:
        keep_sorted = keep_sorted | forced.gather(-1, order)
    return _scatter_sorted(order, keep_sorted)


def head_adaptive_counts(probs: torch.Tensor, density: float, min_blocks: int = 1) -> torch.Tensor:
    """``[B, H]`` key blocks per query block for each head: the mean budget ``density`` spread over the heads so
    that the kept mass, summed over heads, is largest (AdaSpa's head-adaptive top-k, arXiv:2502.21079).

    A head's mean recall curve ``R_h(k)`` (mean over query blocks of the mass of its ``k`` best key blocks) is
    concave, so the greedy choice is optimal: take the ``H * round(density * M)`` largest increments
    ``R_h(k) - R_h(k - 1)`` over all heads; a head gets as many blocks as it has increments among them (at least
    ``min_blocks``). Concentrated heads get few blocks, diffuse ones many.
    """
    b, h, _, m = probs.shape
    gains = probs.sort(dim=-1, descending=True).values.mean(dim=2)  # [B, H, M]: mean mass at each rank
    total = h * budget_blocks(density, m, min_blocks)
    flat = gains.flatten(1)
    threshold = flat.topk(min(total, flat.shape[1]), dim=-1).values[:, -1:]  # [B, 1]
    above = flat > threshold
    at = flat == threshold  # ties at the threshold: the first ones until the budget is spent
    chosen = (above | (at & (at.cumsum(-1) <= total - above.sum(-1, keepdim=True)))).view(b, h, m)
    return chosen.sum(-1).clamp(min=min(min_blocks, m))


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
