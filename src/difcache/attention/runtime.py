"""The state shared by every sparse attention processor of one denoiser, and the sparse attention call itself.

Per call, :meth:`SparseRuntime.attend` takes ``q, k, v [B, H, N, D]`` of a joint sequence in which the video
tokens are one contiguous range and everything else is text:

1. block methods put the video tokens into tiles, padded so that no block straddles two tiles (:mod:`.reorder`);
   SVG2 permutes them by cluster itself;
2. a pattern is searched by the method's selector (:mod:`.selectors`), or reused from an earlier step (every
   ``reuse_steps`` steps, or at the config's ``search_steps`` with reuse in between: AdaSpa's schedule);
3. video queries attend to their selected video keys (a kernel from :mod:`difcache.kernels`) and to every text
   key through a fused dense kernel, merged exactly through the log-sum-exp, with the attention's own scale;
   text queries attend densely to everything;
4. video rows go back to raster order.

Which step a call belongs to comes from difcache's shared :class:`~difcache.engine.steps.StepTracker` (only its
``info``, ``on_new_run`` and attach/detach are used).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from difcache.attention.config import BlockSparseConfig, SparseAttentionConfig, sparse_method
from difcache.attention.reorder import tile_layout
from difcache.attention.selectors import SelectContext, Selection
from difcache.attention.svg2 import svg2_backend
from difcache.errors import DifcacheError
from difcache.kernels import attention_with_lse, block_sparse_attention_flex, resolve_backend


def merge_partials(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """Exact softmax over the union of two disjoint key sets from their normalised outputs and log-sum-exps."""
    total = torch.logaddexp(l1, l2)
    total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    w1, w2 = torch.exp(l1 - total)[..., None], torch.exp(l2 - total)[..., None]
    return o1.float() * w1 + o2.float() * w2


def cached_measure(pattern: object, name: str) -> torch.Tensor:
    """``pattern.work()`` / ``.coverage()``, computed once per pattern (patterns are reused across steps)."""
    key = f"_{name}"
    if key not in pattern.__dict__:
        object.__setattr__(pattern, key, getattr(pattern, name)())
    return pattern.__dict__[key]


@dataclass
class SparseAttentionStats:
    """What sparse attention did since it was applied (or since ``reset_stats``).

    ``attention_work`` is the fraction of dense attention work over all attention calls seen (dense calls,
    including AdaSpa's exact searches, count 1); ``ideal_attention_speedup`` is its inverse, the bound on attention
    time alone. The search is reported apart: ``search_cost`` sums each search's estimated FLOPs in units of the
    dense attention call it served, and on CPU ``search_seconds`` / ``attention_seconds`` are the host times spent
    selecting patterns and computing attention in sparse calls (``None`` on other devices, where they would time
    kernel launches, not kernels).
    """

    sparse_calls: int = 0
    dense_calls: dict[str, int] = field(default_factory=dict)
    patterns_selected: int = 0
    patterns_reused: int = 0
    sparse_work: float = 0.0  # mean work fraction of the sparse calls
    sparse_coverage: float = 0.0  # mean fraction of the work covered at any level
    backends: dict[str, int] = field(default_factory=dict)
    search_cost: float = 0.0
    search_seconds: float | None = None
    attention_seconds: float | None = None

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
        times = ""
        if self.search_seconds is not None:
            times = f"; host time: search {self.search_seconds:.3f} s, sparse attention {self.attention_seconds:.3f} s"
        return (
            f"sparse attention: {self.sparse_calls} sparse calls (work {self.sparse_work:.3f}, coverage "
            f"{self.sparse_coverage:.3f}), dense calls: {dense}; patterns selected {self.patterns_selected}, "
            f"reused {self.patterns_reused}; attention work {self.attention_work:.3f} -> ideal attention "
            f"speedup {self.ideal_attention_speedup:.2f}x; search cost {self.search_cost:.3f} dense calls{times}; "
            f"backends {self.backends}"
        )


@dataclass
class _Cached:
    step: int
    run: int
    shape: tuple
    selection: Selection


class SparseRuntime:
    """Config, step tracker, the current video grid, reusable patterns and counters for one denoiser.

    ``num_layers`` (the sparse-capable attention layers) resolves a fractional ``dense_layers``. A pattern that
    lists every pair at full detail runs as plain dense attention (``DENSE_SHORTCUT``): the same result, computed
    by the faster fused kernel.
    """

    DENSE_SHORTCUT = True

    def __init__(self, config: SparseAttentionConfig, tracker, num_layers: int | None = None) -> None:
        self.config = config
        self.select = sparse_method(config).select
        self.tracker = tracker
        self.num_layers = num_layers
        self.grid: tuple[int, int, int] | None = None  # post-patch (frames, height, width), set per forward
        self._patterns: dict[tuple[int, str], _Cached] = {}
        self._state: dict[tuple[int, str], dict] = {}
        self._remove_listener = tracker.on_new_run(self._new_run)
        self.reset_stats()

    def _new_run(self) -> None:
        self._patterns.clear()
        self._state.clear()

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
        self._search_cost = 0.0
        self._seconds = {"search": 0.0, "attention": 0.0}
        self._timed = False

    def close(self) -> None:
        self._remove_listener()
        self._new_run()

    # ------------------------------------------------------------------ decisions
    def dense_reason(self, layer: int) -> str | None:
        """Why this call runs dense (``"outside"``, ``"dense_layer"``, ``"short"``, ``"warmup"``,
        ``"before_search"``), or ``None`` for sparse."""
        info, config = self.tracker.info, self.config
        reason = None
        if info is None or self.grid is None:
            reason = "outside"
        elif layer < self._dense_layers():
            reason = "dense_layer"
        elif self.n_video < config.min_tokens:
            reason = "short"
        else:
            warmup = config.warmup_count(info.num_steps)
            if warmup is None:
                raise DifcacheError(
                    f"warmup_steps={config.warmup_steps} is a fraction but the number of steps is unknown; "
                    "apply sparse attention to the pipeline (not the bare denoiser) or pass an int count."
                )
            schedule = config.search_schedule(info.num_steps)
            if info.step < warmup:
                reason = "warmup"
            elif schedule is not None and info.step < schedule[0]:
                reason = "before_search"
        if reason is not None:
            self.note_dense(reason)
        return reason

    def note_dense(self, reason: str) -> None:
        """Count a dense call decided outside (e.g. ComfyUI's sigma window or listed dense blocks)."""
        self._dense[reason] = self._dense.get(reason, 0) + 1

    def _dense_layers(self) -> int:
        value = self.config.dense_layers
        if isinstance(value, float) and value > 0 and self.num_layers is None:
            raise DifcacheError(
                f"dense_layers={value} is a fraction but the number of attention layers is unknown; pass an int count."
            )
        return self.config.dense_layer_count(self.num_layers or 0)

    def _search_due(self, cached: _Cached | None, shape: tuple) -> bool:
        info = self.tracker.info
        if cached is None or cached.run != info.run or cached.shape != shape:
            return True
        schedule = self.config.search_schedule(info.num_steps)
        if schedule is None:
            return not 0 <= info.step - cached.step < self.config.reuse_steps
        last = max(s for s in schedule if s <= info.step)  # dense_reason ran the steps before the first search
        return cached.step < last

    def _selection(self, layer: int, ctx: SelectContext) -> Selection:
        info = self.tracker.info
        key = (layer, info.branch)
        cached = self._patterns.get(key)
        shape = tuple(ctx.q.shape)
        if not self._search_due(cached, shape):
            self._reused += 1
            reused = cached.selection
            return Selection(reused.pattern, 0.0)  # a reused pattern computes; its search output is history
        ctx.state = self._state.setdefault(key, {})
        with self._clock(ctx.q, "search"):
            selection = self.select(self.config, ctx)
        self._selected += 1
        self._search_cost += selection.cost
        if self.config.reuse_steps > 1 or self.config.search_steps is not None:
            self._patterns[key] = _Cached(info.step, info.run, shape, selection)
        return selection

    @contextmanager
    def _clock(self, x: torch.Tensor, what: str):
        if x.device.type != "cpu":
            yield
            return
        self._timed = True
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[what] += time.perf_counter() - start

    # ------------------------------------------------------------------ the call
    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        video_start: int,
        text_valid: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Attention output ``[B, H, N, D]`` for ``q, k, v [B, H, N, D]`` with video at ``video_start``.

        ``text_valid [B, N - n_video]`` (bool) marks which text keys are real (padding is masked out); ``scale`` is
        the attention's own softmax scale (``None``: ``D**-0.5``).
        """
        config = self.config
        n = q.shape[2]
        grid = self.grid
        n_video = math.prod(grid)
        video_end = video_start + n_video
        if video_end > n or video_start < 0:
            raise DifcacheError(
                f"The video grid {grid} ({n_video} tokens) does not fit an attention sequence of {n} tokens "
                f"starting at {video_start}; this model's token layout is not supported by sparse attention."
            )
        blocks = isinstance(config, BlockSparseConfig)
        layout = tile_layout(grid, config.tile, config.block_size, q.device) if blocks else None
        qv, kv, vv = (x[:, :, video_start:video_end] for x in (q, k, v))
        if layout is not None:
            qv, kv, vv = (layout.gather(x) for x in (qv, kv, vv))
        sink = None
        if blocks and config.first_frame_sink:
            sink = layout.first_frame_blocks(grid[1] * grid[2])
        selection = self._selection(layer, SelectContext(qv, kv, vv, scale, layout, sink))
        pattern = selection.pattern
        has_text = n_video < n
        mask = self._key_mask(text_valid, video_start, n_video)
        if selection.output is not None:  # the search computed this call's attention itself (dense)
            self._dense["search"] = self._dense.get("search", 0) + 1
            ov, lse = selection.output
            backend = None
        elif pattern.dense and self.DENSE_SHORTCUT:  # nothing to skip: the fused dense kernel, original order
            self._count("dense", pattern)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        elif blocks:
            backend = resolve_backend(config.backend, q.device, config.pyramid, n_video)
        else:
            backend = svg2_backend(config.backend, q.device)
        kt = vt = None
        if has_text:
            kt = torch.cat([k[:, :, :video_start], k[:, :, video_end:]], dim=2)
            vt = torch.cat([v[:, :, :video_start], v[:, :, video_end:]], dim=2)
        with self._clock(q, "attention"):
            if backend is not None:
                self._count(backend, pattern)
                if backend == "flex" and has_text:  # compiled CPU flex gives no LSE: text keys in the same call
                    ov, lse = block_sparse_attention_flex(
                        qv, kv, vv, pattern.kv_idx, pattern.kv_cnt, config.block_size, scale, extra_k=kt, extra_v=vt,
                        extra_valid=text_valid, block_len=pattern.block_len,
                    )  # fmt: skip
                    has_text_merged = True
                else:
                    ov, lse = pattern.attend(qv, kv, vv, backend, scale)
                    has_text_merged = False
            else:
                has_text_merged = False
            if has_text and not has_text_merged:
                ot, lt = attention_with_lse(qv, kt, vt, text_valid, scale)
                ov = merge_partials(ov, lse, ot, lt)
            ov = ov.to(q.dtype)
            if layout is not None:
                ov = layout.scatter(ov)
        if not has_text:
            return ov
        # Text queries: dense over every key (text padding masked), exactly as the original processor.
        qt = torch.cat([q[:, :, :video_start], q[:, :, video_end:]], dim=2)
        ot = F.scaled_dot_product_attention(qt, k, v, attn_mask=mask, scale=scale)
        return torch.cat([ot[:, :, :video_start], ov, ot[:, :, video_start:]], dim=2)

    def _count(self, backend: str, pattern: object) -> None:
        self._sparse_calls += 1
        self._backends[backend] = self._backends.get(backend, 0) + 1
        work, coverage = cached_measure(pattern, "work"), cached_measure(pattern, "coverage")
        self._work = self._work.to(work.device) + work
        self._coverage = self._coverage.to(coverage.device) + coverage

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
        return SparseAttentionStats(
            sparse_calls=self._sparse_calls,
            dense_calls=dict(self._dense),
            patterns_selected=self._selected,
            patterns_reused=self._reused,
            sparse_work=float(self._work) / calls,
            sparse_coverage=float(self._coverage) / calls,
            backends=dict(self._backends),
            search_cost=self._search_cost,
            search_seconds=self._seconds["search"] if self._timed else None,
            attention_seconds=self._seconds["attention"] if self._timed else None,
        )
