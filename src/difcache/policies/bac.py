"""BAC's schedule: per-unit update steps by dynamic programming, then the Bubbling Union.

Block-wise Adaptive Caching (Ji et al., "Block-wise Adaptive Caching for Accelerating Diffusion Policy",
arXiv 2506.13456, ICLR 2026; official code: kyji/BAC, read through the public code index). Each unit (an
attention, cross-attention or FFN branch, cached before its gate) gets its own set of *update steps*; between
two of them its last computed output is reused (or forecast). Everything here is a pure function of calibrated
numbers, so the schedule is a table known before the run (no tensor is read while sampling).

**Similarity matrices** (:func:`similarity_matrix`). ``S[a, t]`` compares a unit's output at steps ``a`` and
``t``: ``"cosine"`` (the default) of the flattened outputs, which the scheduler maximises; ``"l1"`` (mean absolute
difference) and ``"mse"`` (mean squared difference), which it minimises. The official code uses the L1 *sum*;
per unit the two differ by a constant factor, which does not change the optimal set, and the mean keeps units of
different sizes (and subsampled features) comparable.

**Adaptive Caching Scheduler** (:func:`optimal_update_steps`). Choose ``M`` update steps
``0 = c_1 < c_2 < ... < c_M <= T-1`` (step 0 is always one of them: nothing is cached before it). Step ``t``
then reuses the output of the last update ``c(t) <= t``, and the schedule's score is
``sum_t S[c(t), t] = sum_m cost[c_m, c_{m+1} - 1]`` with ``cost[a, b] = sum_{t=a}^{b} S[a, t]``. The DP of the
official ``OptimalCacheScheduler``: ``dp[1][i] = cost[0, i]``,
``dp[k][i] = best_{k-2 <= j < i} dp[k-1][j] + cost[j+1, i]``, answer ``dp[M][T-1]``, backtracked; O(M·T²).
Ties go to the smallest ``j`` (the official loop keeps the first strict improvement).

**Volatility** (:func:`volatility`). How much a unit's output moves over the run: the mean over step pairs
``t < u`` of the mean absolute difference ``|X_t − X_u|`` (official ``compute_block_l1_errors``). The paper
writes ``(1/K²) Σ_t Σ_u ‖X^t − X^u‖₁``; over ordered pairs and with the L1 sum, that is the same ranking for
units of equal size, and the per-entry mean ranks units of different sizes fairly.

**Bubbling Union** (:func:`bubbling_union`). The ``n`` most volatile units (:func:`most_volatile`) are the
ones whose stale outputs hurt most when a downstream FFN recomputes on them, so each of them also updates at
every update step of every FFN at its block index or later: ``C(u) ← C(u) ∪ ⋃_{v FFN, block(v) >= block(u)} C(v)``
(official ``_load_block_optimal_steps``, phase 1; phase 2 is commented out there). Only the FFNs' *own*
(DP) steps are merged: the union is idempotent, so the order in which units are processed does not matter.
Whole-block units (FLUX and HunyuanVideo single-stream blocks) contain an MLP and count as FFNs here; the
paper's decoder layers have no such unit (our extension).

**Last step.** The official wrapper adds step 99 (of DDPM's 100) to every unit's set after the DP and the
union, so the final denoising step is computed fresh: a unit computes up to ``M + 1`` times before the union.
:func:`difcache.methods.bac.schedule` does the same for the last step of any step count (``force_last``); the result
runs as a :class:`~difcache.policies.table.TableSchedule`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

import numpy as np
import torch

from difcache.errors import DifcacheError

METRICS = ("cosine", "l1", "mse")
MINIMISED = frozenset({"l1", "mse"})  # distances: smaller is better
FFN_KINDS = frozenset({"ffn", "block"})  # units whose update steps bubble up (a whole block contains an MLP)


# ---------------------------------------------------------------------------------------------- calibration math
def similarity_matrix(features: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """``S[a, t]`` between the rows of ``features`` ``[T, E]`` (one flattened unit output per step), float64.

    ``"cosine"``: cosine similarity (0 against an all-zero row); ``"l1"``: mean ``|x_a − x_t|``;
    ``"mse"``: mean ``(x_a − x_t)²``. Computed without the ``‖a‖² + ‖b‖² − 2ab`` shortcut, which loses the small
    differences between nearly equal steps.
    """
    if metric not in METRICS:
        raise DifcacheError(f"Unknown similarity metric {metric!r}; use one of {list(METRICS)}.")
    x = features.detach().double()
    if x.dim() != 2:
        raise DifcacheError(f"features must be [steps, entries], got shape {tuple(x.shape)}.")
    if metric == "cosine":
        norms = x.norm(dim=1)
        unit = x / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]
        return (unit @ unit.T).clamp_(-1.0, 1.0).cpu()
    entries = max(x.shape[1], 1)
    if metric == "l1":
        return (torch.cdist(x[None], x[None], p=1)[0] / entries).cpu()
    dist = torch.cdist(x[None], x[None], p=2, compute_mode="donot_use_mm_for_euclid_dist")[0]
    return (dist.square() / entries).cpu()


def volatility(features: torch.Tensor) -> float:
    """Mean over step pairs ``t < u`` of the mean ``|X_t − X_u|`` of ``features`` ``[T, E]`` (0 for one step)."""
    steps = features.shape[0]
    if steps < 2:
        return 0.0
    l1 = similarity_matrix(features, "l1")
    return float(torch.triu(l1, diagonal=1).sum()) / (steps * (steps - 1) / 2)


# ---------------------------------------------------------------------------------------------- scheduler (ACS)
def _as_matrix(similarity: Sequence[Sequence[float]] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(similarity, torch.Tensor):
        similarity = similarity.detach().cpu().double().numpy()
    matrix = np.asarray(similarity, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise DifcacheError(f"A similarity matrix must be square and non-empty, got shape {matrix.shape}.")
    if not np.isfinite(matrix).all():
        raise DifcacheError("A similarity matrix holds non-finite values; recalibrate.")
    return matrix


def segment_costs(similarity: Sequence[Sequence[float]] | np.ndarray | torch.Tensor) -> np.ndarray:
    """``cost[a, b] = Σ_{t=a}^{b} S[a, t]`` for ``b >= a`` (the score of reusing step ``a``'s output up to ``b``)."""
    matrix = _as_matrix(similarity)
    return np.cumsum(np.triu(matrix), axis=1)


def schedule_score(similarity: Sequence[Sequence[float]] | np.ndarray | torch.Tensor, steps: Iterable[int]) -> float:
    """``Σ_t S[c(t), t]`` with ``c(t)`` the last update step ``<= t``: the quantity :func:`optimal_update_steps`
    optimises. ``steps`` must contain 0."""
    matrix = _as_matrix(similarity)
    updates = set(steps)
    if 0 not in updates:
        raise DifcacheError("An update set must contain step 0 (nothing is cached before it).")
    total, cached = 0.0, 0
    for t in range(matrix.shape[0]):
        if t in updates:
            cached = t
        total += matrix[cached, t]
    return total


def optimal_update_steps(
    similarity: Sequence[Sequence[float]] | np.ndarray | torch.Tensor, budget: int, minimize: bool = False
) -> tuple[int, ...]:
    """BAC's Adaptive Caching Scheduler: the ``budget`` update steps (step 0 included) that maximise
    (``minimize=False``, similarities) or minimise (distances) :func:`schedule_score`; ascending.

    Args:
        similarity: ``S[a, t]``, ``[T, T]``; only ``t >= a`` is read.
        budget: ``M``, the number of update steps, in ``[1, T]``.
    """
    matrix = _as_matrix(similarity)
    steps = matrix.shape[0]
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or not 1 <= budget <= steps:
        raise DifcacheError(f"The update budget must be an int in [1, {steps}] (the number of steps), got {budget!r}.")
    cost = segment_costs(matrix)
    sign = -1.0 if minimize else 1.0
    score = sign * cost  # maximise score in both cases
    invalid = np.tril(np.ones((steps, steps), dtype=bool))  # cand[j, i] needs j < i
    dp = np.full((budget + 1, steps), -np.inf)
    choice = np.zeros((budget + 1, steps), dtype=np.int64)
    dp[1] = score[0]
    for k in range(2, budget + 1):
        # candidate[j, i] = dp[k-1][j] + score[j+1, i]; the segment starting at j+1 must end at i >= j+1.
        shifted = np.full((steps, steps), -np.inf)
        shifted[:-1] = score[1:]
        candidate = dp[k - 1][:, None] + shifted
        candidate[invalid] = -np.inf
        candidate[: k - 2] = -np.inf  # the first k-1 segments need at least k-1 steps
        choice[k] = np.argmax(candidate, axis=0)  # first maximum: the smallest j on ties
        dp[k] = candidate[choice[k], np.arange(steps)]
    result, k, end = [], budget, steps - 1
    while k > 1:
        j = int(choice[k, end])
        result.append(j + 1)
        end, k = j, k - 1
    result.append(0)
    return tuple(sorted(result))


# ---------------------------------------------------------------------------------------------- bubbling union
def most_volatile(volatilities: Sequence[float], count: int) -> tuple[int, ...]:
    """Indices of the ``count`` largest volatilities, largest first (ties: the earlier unit first)."""
    order = sorted(range(len(volatilities)), key=lambda i: (-volatilities[i], i))
    return tuple(order[: max(count, 0)])


def bubbling_union(
    update_steps: Sequence[Collection[int]],
    kinds: Sequence[str],
    blocks: Sequence[int],
    selected: Iterable[int],
) -> list[tuple[int, ...]]:
    """BAC's Bubbling Union: each ``selected`` unit also updates at every update step of every FFN unit (kind in
    :data:`FFN_KINDS`) at its block index or later; the other units keep their steps.

    Args:
        update_steps: per unit, its update steps (from :func:`optimal_update_steps`).
        kinds: per unit, its kind (``"attn"``, ``"cross_attn"``, ``"ffn"``, ``"block"``).
        blocks: per unit, the index of its block in execution order.
        selected: the units that absorb downstream FFN steps (:func:`most_volatile`).
    Returns:
        Per unit, its update steps after the union, ascending.
    """
    if not len(update_steps) == len(kinds) == len(blocks):
        raise DifcacheError(
            f"bubbling_union needs one entry per unit: {len(update_steps)} step sets, {len(kinds)} kinds, "
            f"{len(blocks)} block indices."
        )
    result = [set(steps) for steps in update_steps]
    ffns = [v for v, kind in enumerate(kinds) if kind in FFN_KINDS]
    for u in set(selected):
        if not 0 <= u < len(update_steps):
            raise DifcacheError(f"bubbling_union: unit {u} is out of range (0..{len(update_steps) - 1}).")
        for v in ffns:
            if blocks[v] >= blocks[u]:
                result[u] |= set(update_steps[v])
    return [tuple(sorted(steps)) for steps in result]
