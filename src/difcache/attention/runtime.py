"""The state shared by every sparse attention processor of one denoiser, and the sparse attention call itself.

Per call, :meth:`SparseRuntime.attend` takes ``q, k, v [B, H, N, D]`` of a joint sequence in which the video
tokens are one contiguous range and everything else is text:

1. video tokens are reordered into tiles (:mod:`.reorder`);
2. a block pattern is selected from pooled scores (:mod:`.patterns`), or reused from an earlier step;
3. video queries attend to their selected video key blocks (a kernel from :mod:`difcache.kernels`) and to
   every text key, merged exactly through the log-sum-exp; text queries attend densely to everything;
4. video rows go back to raster order.

Which step a call belongs to comes from difcache's shared :class:`~difcache.engine.steps.StepTracker`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from difcache.attention.config import SparseAttentionConfig
from difcache.attention.patterns import (
    BlockPattern,
    budget_blocks,
    pooled_block_scores,
    psa_levels_by_budget,
    psa_levels_by_mass,
    topk_mask,
    topp_mask,
)
from difcache.attention.reorder import first_frame_blocks, from_tiles, tile_permutation, to_tiles
from difcache.engine.steps import StepTracker
from difcache.errors import DifcacheError
from difcache.kernels import block_sparse_attention_flex, resolve_backend, sparse_attention
from difcache.kernels.block_sparse_attention import masked_softmax_av


def select_pattern(
    config: SparseAttentionConfig, q: torch.Tensor, k: torch.Tensor, sink: torch.Tensor | None = None
) -> BlockPattern:
    """The block pattern of ``config`` for video ``q, k [B, H, N, D]`` (already tiled); ``sink [M]`` forced columns."""
    bs = config.block_size
    n = q.shape[2]
    probs = pooled_block_scores(q, k, bs)
    m = probs.shape[-1]
    forced = None
    if config.keep_diagonal:
        forced = torch.eye(m, dtype=torch.bool, device=q.device)
    if sink is not None:
        forced = sink.expand(m, m) if forced is None else forced | sink
    if forced is not None:
        forced = forced.expand_as(probs)
    if config.method == "topp":
        return BlockPattern.from_mask(topp_mask(probs, config.p, config.min_blocks, forced), bs, n)
    if config.method == "topk":
        k_blocks = budget_blocks(config.density, m, config.min_blocks)
        return BlockPattern.from_mask(topk_mask(probs, k_blocks, forced), bs, n)
    if config.density is not None:
        levels = psa_levels_by_budget(probs, config.density, config.psa_full_share, config.min_blocks, forced)
    else:
        levels = psa_levels_by_mass(probs, config.psa_thresholds, config.min_blocks, forced)
    return BlockPattern.from_level_map(levels, bs, n, pyramid=True)


def merge_partials(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """Exact softmax over the union of two disjoint key sets from their normalised outputs and log-sum-exps."""
    total = torch.logaddexp(l1, l2)
    total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    w1, w2 = torch.exp(l1 - total)[..., None], torch.exp(l2 - total)[..., None]
    return o1.float() * w1 + o2.float() * w2


def cached_work(pattern: BlockPattern) -> torch.Tensor:
    """``pattern.work()``, computed once per pattern (patterns are reused across steps)."""
    if "_work" not in pattern.__dict__:
        object.__setattr__(pattern, "_work", pattern.work())
    return pattern.__dict__["_work"]


def cached_coverage(pattern: BlockPattern) -> torch.Tensor:
    if "_coverage" not in pattern.__dict__:
        object.__setattr__(pattern, "_coverage", pattern.coverage())
    return pattern.__dict__["_coverage"]


@dataclass
class SparseAttentionStats:
    """What sparse attention did since it was applied (or since ``reset_stats``).

    ``attention_work`` is the fraction of dense attention work over all attention calls seen (dense calls
    count 1); ``ideal_attention_speedup`` is its inverse, the bound on attention time alone.
    """

    sparse_calls: int = 0
    dense_calls: dict[str, int] = field(default_factory=dict)
    patterns_selected: int = 0
    patterns_reused: int = 0
    sparse_work: float = 0.0  # mean work fraction of the sparse calls
    sparse_coverage: float = 0.0  # mean fraction of block pairs computed at any level
    backends: dict[str, int] = field(default_factory=dict)

    @property
    def calls(self) -> int:
        return self.sparse_calls + sum(self.dense_calls.values())

    @property
    def attention_work(self) -> float:
        if self.calls == 0:
            return 1.0
        return (self.sparse_work * self.sparse_calls + sum(self.dense_calls.values())) / self.calls

    @property
    def ideal_attention_speedup(self) -> float:
        return 1.0 / max(self.attention_work, 1e-12)

    def __str__(self) -> str:
        dense = ", ".join(f"{k} {v}" for k, v in sorted(self.dense_calls.items())) or "none"
        return (
            f"sparse attention: {self.sparse_calls} sparse calls (work {self.sparse_work:.3f}, coverage "
            f"{self.sparse_coverage:.3f}), dense calls: {dense}; patterns selected {self.patterns_selected}, "
            f"reused {self.patterns_reused}; attention work {self.attention_work:.3f} -> ideal attention "
            f"speedup {self.ideal_attention_speedup:.2f}x; backends {self.backends}"
        )


@dataclass
class _Cached:
    step: int
    run: int
    shape: tuple
    pattern: BlockPattern


class SparseRuntime:
    """Config, step tracker, the current video grid, reusable patterns and counters for one denoiser.

    A pattern that lists every pair at full detail runs as plain dense attention (``DENSE_SHORTCUT``): the
    same result, computed by the faster fused kernel.
    """

    DENSE_SHORTCUT = True

    def __init__(self, config: SparseAttentionConfig, tracker: StepTracker) -> None:
        self.config = config
        self.tracker = tracker
        self.grid: tuple[int, int, int] | None = None  # post-patch (frames, height, width), set per forward
        self._patterns: dict[tuple[int, str], _Cached] = {}
        self._remove_listener = tracker.on_new_run(self._patterns.clear)
        self.reset_stats()

    @property
    def n_video(self) -> int:
        return math.prod(self.grid)

    def reset_stats(self) -> None:
        self._sparse_calls = 0
        self._dense: dict[str, int] = {}
        self._selected = 0
        self._reused = 0
        self._work = torch.zeros(())
        self._coverage = torch.zeros(())
        self._backends: dict[str, int] = {}

    def close(self) -> None:
        self._remove_listener()
        self._patterns.clear()

    # ------------------------------------------------------------------ decisions
    def dense_reason(self, layer: int) -> str | None:
        """Why this call runs dense (``"outside"``, ``"dense_layer"``, ``"warmup"``), or ``None`` for sparse."""
        info = self.tracker.info
        reason = None
        if info is None or self.grid is None:
            reason = "outside"
        elif layer < self.config.dense_layers:
            reason = "dense_layer"
        else:
            warmup = self.config.warmup_count(info.num_steps)
            if warmup is None:
                raise DifcacheError(
                    f"warmup_steps={self.config.warmup_steps} is a fraction but the number of steps is unknown; "
                    "apply sparse attention to the pipeline (not the bare denoiser) or pass an int count."
                )
            if info.step < warmup:
                reason = "warmup"
        if reason is not None:
            self._dense[reason] = self._dense.get(reason, 0) + 1
        return reason

    def _pattern(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, sink: torch.Tensor | None
    ) -> BlockPattern:
        info = self.tracker.info
        key = (layer, info.branch)
        cached = self._patterns.get(key)
        shape = tuple(q.shape)
        if (
            cached is not None
            and cached.run == info.run
            and cached.shape == shape
            and 0 <= info.step - cached.step < self.config.reuse_steps
        ):
            self._reused += 1
            return cached.pattern
        pattern = select_pattern(self.config, q, k, sink)
        self._selected += 1
        if self.config.reuse_steps > 1:
            self._patterns[key] = _Cached(info.step, info.run, shape, pattern)
        return pattern

    # ------------------------------------------------------------------ the call
    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        video_start: int,
        text_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention output ``[B, H, N, D]`` for ``q, k, v [B, H, N, D]`` with video at ``video_start``.

        ``text_valid [B, N - n_video]`` (bool) marks which text keys are real (padding is masked out).
        """
        config = self.config
        b, h, n, d = q.shape
        grid = self.grid
        n_video = math.prod(grid)
        video_end = video_start + n_video
        if video_end > n or video_start < 0:
            raise DifcacheError(
                f"The video grid {grid} ({n_video} tokens) does not fit an attention sequence of {n} tokens "
                f"starting at {video_start}; this model's token layout is not supported by sparse attention."
            )
        perm = inverse = None
        if config.tile is not None:
            perm, inverse = tile_permutation(grid, config.tile, q.device)
        qv, kv, vv = (x[:, :, video_start:video_end] for x in (q, k, v))
        if perm is not None:
            qv, kv, vv = (to_tiles(x, perm) for x in (qv, kv, vv))
        sink = None
        if config.first_frame_sink:
            sink = first_frame_blocks(grid, perm, config.block_size, -(-n_video // config.block_size))
        pattern = self._pattern(layer, qv, kv, sink)
        backend = "dense" if pattern.dense and self.DENSE_SHORTCUT else None
        backend = backend or resolve_backend(config.backend, q.device, config.pyramid, n_video)
        self._sparse_calls += 1
        self._backends[backend] = self._backends.get(backend, 0) + 1
        self._work = self._work.to(q.device) + cached_work(pattern)
        self._coverage = self._coverage.to(q.device) + cached_coverage(pattern)
        has_text = n_video < n
        if backend == "dense":  # nothing to skip: the fused dense kernel, in the original token order
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=self._key_mask(text_valid, video_start, n_video)
            )
        kt = vt = None
        if has_text:
            kt = torch.cat([k[:, :, :video_start], k[:, :, video_end:]], dim=2)
            vt = torch.cat([v[:, :, :video_start], v[:, :, video_end:]], dim=2)
        idx, cnt, lvl = pattern.kv_idx, pattern.kv_cnt, pattern.kv_lvl
        if backend == "flex" and has_text:
            ov, _ = block_sparse_attention_flex(
                qv, kv, vv, idx, cnt, config.block_size, extra_k=kt, extra_v=vt, extra_valid=text_valid
            )
        else:
            ov, lse = sparse_attention(qv, kv, vv, idx, cnt, lvl, config.block_size, backend)
            if has_text:
                s = (qv.float() @ kt.float().transpose(-1, -2)) * d**-0.5
                valid = None if text_valid is None else text_valid[:, None, None, :].to(torch.bool)
                ot, lt = masked_softmax_av(s, vt.float(), valid)
                ov = merge_partials(ov, lse, ot, lt).to(q.dtype)
        if inverse is not None:
            ov = from_tiles(ov, inverse)
        if not has_text:
            return ov
        # Text queries: dense over every key (text padding masked), exactly as the original processor.
        qt = torch.cat([q[:, :, :video_start], q[:, :, video_end:]], dim=2)
        mask = self._key_mask(text_valid, video_start, n_video)
        ot = F.scaled_dot_product_attention(qt, k, v, attn_mask=mask)
        return torch.cat([ot[:, :, :video_start], ov, ot[:, :, video_start:]], dim=2)

    @staticmethod
    def _key_mask(text_valid: torch.Tensor | None, video_start: int, n_video: int) -> torch.Tensor | None:
        """``[B, 1, 1, N]`` bool key mask of the joint sequence (video keys always valid), or ``None``."""
        if text_valid is None:
            return None
        tv = text_valid.to(torch.bool)
        ones = torch.ones(tv.shape[0], n_video, dtype=torch.bool, device=tv.device)
        return torch.cat([tv[:, :video_start], ones, tv[:, video_start:]], dim=1)[:, None, None, :]

    # ------------------------------------------------------------------ stats
    def stats(self) -> SparseAttentionStats:
        calls = max(self._sparse_calls, 1)
        work = float(self._work) / calls
        coverage = float(self._coverage) / calls
        return SparseAttentionStats(
            sparse_calls=self._sparse_calls,
            dense_calls=dict(self._dense),
            patterns_selected=self._selected,
            patterns_reused=self._reused,
            sparse_work=work,
            sparse_coverage=coverage,
            backends=dict(self._backends),
        )
