"""The settings of sparse attention, validated when constructed."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

from difcache.kernels import BACKENDS

METHODS = ("topp", "topk", "psa")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class SparseAttentionConfig:
    """How attention blocks are chosen and computed; see :mod:`difcache.attention`.

    Attributes:
        method: ``"topp"`` (fewest key blocks reaching mass ``p``), ``"topk"`` (``density`` budget) or
            ``"psa"`` (pyramid levels: by ``density`` budget, or by ``psa_thresholds`` when ``density`` is None).
        density: fraction of key blocks (topk) or of dense attention work (psa), in (0, 1].
        p: cumulative mass for topp, in (0, 1]; 1.0 is dense.
        psa_thresholds: cumulative-mass bounds of levels 0..3 (full, pooled 2, 4, 8) for mass-mode psa;
            blocks ranked beyond the last are skipped. Non-decreasing, in (0, 1].
        psa_full_share: share of the psa budget spent on full blocks, in (0, 1].
        block_size: tokens per query/key block, a power of two in [16, 256] (64 or 128 on real models).
        min_blocks: key blocks kept per query block at least (>= 1).
        keep_diagonal: always keep each query block's own key block (after tiling, its own neighbourhood).
        first_frame_sink: always keep key blocks holding first-frame tokens (Sparse VideoGen, Radial).
        tile: (t, h, w) tile that video tokens are grouped into before blocking, or None for raster order.
        warmup_steps: dense steps first: an int count, or a float fraction of the steps in [0, 1).
        dense_layers: the first this many attention layers stay dense (>= 0).
        reuse_steps: a selected pattern serves this many steps (>= 1; 1 recomputes every step).
        backend: ``"auto"``, ``"triton"``, ``"cpp"``, ``"torch"``, ``"flex"`` or ``"reference"``.
    """

    VERSION: ClassVar[int] = 1

    method: str = "topp"
    density: float | None = None
    p: float | None = None
    psa_thresholds: tuple[float, float, float, float] = (0.5, 0.7, 0.85, 0.95)
    psa_full_share: float = 0.5
    block_size: int = 128
    min_blocks: int = 1
    keep_diagonal: bool = True
    first_frame_sink: bool = False
    tile: tuple[int, int, int] | None = (2, 8, 8)
    warmup_steps: int | float = 0
    dense_layers: int = 0
    reuse_steps: int = 1
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {self.method!r}.")
        for name in ("density", "p"):
            value = getattr(self, name)
            if value is not None and (not _is_real(value) or not 0 < value <= 1):
                raise ValueError(f"`{name}` must be a number in (0, 1], got {value!r}.")
        if self.method == "topp" and self.p is None:
            object.__setattr__(self, "p", 0.9)
        if self.method == "topp" and self.density is not None:
            raise ValueError("`density` is for method='topk' or 'psa'; topp takes `p`, e.g. p=0.9.")
        if self.method == "topk" and self.density is None:
            raise ValueError("method='topk' needs a budget: pass `density` in (0, 1], e.g. density=0.2.")
        if self.method in ("topk", "psa") and self.p is not None:
            raise ValueError(f"`p` is for method='topp'; {self.method} takes `density`.")
        th = self.psa_thresholds
        if (
            not isinstance(th, tuple)
            or len(th) != 4
            or not all(_is_real(t) and 0 < t <= 1 for t in th)
            or any(a > b for a, b in zip(th, th[1:], strict=False))
        ):
            raise ValueError(f"`psa_thresholds` must be 4 non-decreasing numbers in (0, 1], got {th!r}.")
        if not _is_real(self.psa_full_share) or not 0 < self.psa_full_share <= 1:
            raise ValueError(f"`psa_full_share` must be in (0, 1], got {self.psa_full_share!r}.")
        bs = self.block_size
        if not _is_int(bs) or bs < 16 or bs > 256 or bs & (bs - 1):
            raise ValueError(
                f"`block_size` must be a power of two in [16, 256] (64 or 128 typical), got {bs!r}."
            )
        if not _is_int(self.min_blocks) or self.min_blocks < 1:
            raise ValueError(f"`min_blocks` must be an int >= 1, got {self.min_blocks!r}.")
        for name in ("keep_diagonal", "first_frame_sink"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        if self.tile is not None and (
            not isinstance(self.tile, tuple)
            or len(self.tile) != 3
            or not all(_is_int(t) and t >= 1 for t in self.tile)
        ):
            raise ValueError(
                f"`tile` must be None or three ints >= 1 (t, h, w), e.g. (2, 8, 8); got {self.tile!r}."
            )
        w = self.warmup_steps
        if _is_int(w):
            if w < 0:
                raise ValueError(f"`warmup_steps` as a count must be >= 0, got {w}.")
        elif not (_is_real(w) and 0 <= w < 1):
            raise ValueError(f"`warmup_steps` must be an int count >= 0 or a fraction in [0, 1), got {w!r}.")
        if not _is_int(self.dense_layers) or self.dense_layers < 0:
            raise ValueError(f"`dense_layers` must be an int >= 0, got {self.dense_layers!r}.")
        if not _is_int(self.reuse_steps) or self.reuse_steps < 1:
            raise ValueError(
                f"`reuse_steps` must be an int >= 1 (1 = select every step), got {self.reuse_steps!r}."
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}, got {self.backend!r}.")

    @property
    def pyramid(self) -> bool:
        return self.method == "psa"

    def warmup_count(self, num_steps: int | None) -> int | None:
        """Dense steps for a run of ``num_steps``; ``None`` when a fraction meets an unknown step count."""
        if _is_int(self.warmup_steps):
            return self.warmup_steps
        if self.warmup_steps == 0:
            return 0
        return None if num_steps is None else math.ceil(self.warmup_steps * num_steps)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
