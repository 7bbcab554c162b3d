"""Sparse attention settings: one frozen config class per method, a registry of methods, and JSON round trips.

Every config is a frozen dataclass with its paper's defaults, validated when constructed (errors name the field,
its range and the value). :class:`SparseAttentionConfig` holds what every method shares: *when* attention is
sparse (dense warm-up steps, dense first layers, short sequences) and *when the pattern is searched* (every
step, every ``reuse_steps`` steps, or at the listed ``search_steps`` with the pattern reused in between, as
AdaSpa does). Each method's config adds how its pattern is chosen:

| method | config | selection | paper |
|---|---|---|---|
| ``topk`` | :class:`TopKSparseConfig` | a fixed budget of key blocks per query block | SpargeAttn, NABLA |
| ``topp`` | :class:`TopPSparseConfig` | fewest key blocks reaching attention mass ``p`` | XAttention, SVG2 |
| ``psa`` | :class:`PSASparseConfig` | key blocks at pooled levels of detail | PSA, arXiv:2512.04025 |
| ``adaspa`` | :class:`AdaSpaSparseConfig` | head-adaptive top-k, exact mass searched at few steps | AdaSpa |
| ``svg2`` | :class:`SVG2SparseConfig` | k-means clusters of q and k, cluster pairs by top-p | SVG2, arXiv:2505.18875 |

Defaults for the dense parts follow the papers: the first quarter of the steps dense (Sparse VideoGen keeps the
first ~25 % of steps dense; PSA 12-15 of 50 steps; Radial 12 of 50) and the first 2.5 % of the layers (Sparse
VideoGen's ``first_layers_fp = 0.025``: 1 of Wan's 40 layers); AdaSpa's own schedule is dense until its first
search at 20 % of the steps. :func:`resolve_sparse_config` turns a method name (its config's defaults) or a config
instance plus keyword overrides into a validated config, as :func:`difcache.apply_cache` does for caches.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from difcache.config import check_bool, check_choice, check_float, check_int
from difcache.errors import DifcacheError
from difcache.kernels import BACKENDS
from difcache.registry import Registry

ESTIMATORS = ("pooled", "sampled", "exact")


# ---------------------------------------------------------------------------------------------- validation
def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _where(owner: object, name: str) -> str:
    return f"{type(owner).__name__}.{name}"


def _fraction(owner: object, name: str, *, allow_none: bool = False, zero: bool = False) -> None:
    """A number in (0, 1] (``[0, 1]`` with ``zero``), or ``None`` with ``allow_none``."""
    check_float(owner, name, 0, 1, lo_open=not zero, allow_none=allow_none)


def _count_or_fraction(owner: object, name: str) -> None:
    """An int count >= 0, or a float fraction in [0, 1)."""
    value = getattr(owner, name)
    if _is_int(value):
        if value < 0:
            raise ValueError(f"{_where(owner, name)} as a count must be >= 0, got {value}.")
    elif not (_is_real(value) and 0 <= value < 1):
        raise ValueError(
            f"{_where(owner, name)} must be an int count >= 0 or a fraction in [0, 1), got {value!r}."
        )


def _resolve(value: int | float, total: int, round_up: bool) -> int:
    """A count (int) as is, a fraction (float) of ``total``: rounded up (dense parts) or down (search steps)."""
    if _is_int(value):
        return int(value)
    exact = value * total
    return math.ceil(exact - 1e-9) if round_up else math.floor(exact + 1e-9)


# ---------------------------------------------------------------------------------------------- base
@dataclass(frozen=True)
class SparseAttentionConfig:
    """What every sparse attention method shares: when attention is sparse and when its pattern is searched.

    Attributes:
        warmup_steps: dense steps first, an int count or a fraction of the steps in [0, 1) (rounded up).
            Default 0.25: Sparse VideoGen keeps the first ~25 % of the steps dense, PSA 12-15 of 50, Radial 12.
        dense_layers: the first attention layers kept dense, an int count or a fraction of the layers in [0, 1)
            (rounded up). Default 0.025: Sparse VideoGen's ``first_layers_fp`` (layer 0 of Wan's 40).
        min_tokens: sequences with fewer video tokens than this stay dense (ComfyUI's block-sparse node keeps
            short sequences dense; its default is 12288 on GPUs). Default 0: on CPU the kernels pay off early.
        reuse_steps: a searched pattern serves this many steps (1: searched every step).
        search_steps: the steps at which the pattern is searched, ints or fractions of the steps in [0, 1)
            (rounded down), e.g. AdaSpa's steps 10 and 30 of 50 as ``(0.2, 0.6)``; the pattern is reused on the
            steps in between, and steps before the first search run dense. ``None``: every ``reuse_steps``.
        backend: ``"auto"``, ``"triton"``, ``"cpp"``, ``"torch"``, ``"flex"`` or ``"reference"``.
    """

    VERSION: ClassVar[int] = 2  # 1: the single config that branched on `method` (difcache <= 0.1)
    method: ClassVar[str] = ""
    pyramid: ClassVar[bool] = False  # patterns carry PSA levels

    warmup_steps: int | float = 0.25
    dense_layers: int | float = 0.025
    min_tokens: int = 0
    reuse_steps: int = 1
    search_steps: tuple[int | float, ...] | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        if type(self) is SparseAttentionConfig:
            raise DifcacheError(
                "SparseAttentionConfig is the base of the method configs; use one of "
                f"{sorted(n for n in _METHODS)} (e.g. difcache.attention.TopPSparseConfig()) or a method name."
            )
        _count_or_fraction(self, "warmup_steps")
        _count_or_fraction(self, "dense_layers")
        check_int(self, "min_tokens", 0)
        check_int(self, "reuse_steps", 1)
        steps = self.search_steps
        if steps is not None:
            if isinstance(steps, list):
                steps = tuple(steps)
            if not isinstance(steps, tuple) or not steps or not all(
                (_is_int(s) and s >= 0) or (_is_real(s) and not _is_int(s) and 0 <= s < 1) for s in steps
            ):
                raise ValueError(
                    f"{_where(self, 'search_steps')} must be None or a non-empty tuple of step indices >= 0 or "
                    f"fractions of the steps in [0, 1), e.g. (0.2, 0.6); got {self.search_steps!r}."
                )
            if self.reuse_steps != 1:
                raise ValueError(
                    f"{type(self).__name__}: set either reuse_steps (search every N steps) or search_steps (search at "
                    "the listed steps), not both; drop reuse_steps."
                )
            object.__setattr__(self, "search_steps", steps)
        check_choice(self, "backend", BACKENDS)
        self._validate()

    def _validate(self) -> None:
        """The method's own fields (overridden by each method config)."""

    # ------------------------------------------------------------------ resolution at run time
    def warmup_count(self, num_steps: int | None) -> int | None:
        """Dense steps for a run of ``num_steps``; ``None`` when a fraction meets an unknown step count."""
        if _is_int(self.warmup_steps) or self.warmup_steps == 0:
            return int(self.warmup_steps)
        return None if num_steps is None else _resolve(self.warmup_steps, num_steps, round_up=True)

    def dense_layer_count(self, num_layers: int) -> int:
        """Dense attention layers of a model with ``num_layers`` sparse-capable layers."""
        return _resolve(self.dense_layers, num_layers, round_up=True)

    def search_schedule(self, num_steps: int | None) -> tuple[int, ...] | None:
        """The steps at which patterns are searched (``None``: by ``reuse_steps``); raises on unknown step counts."""
        if self.search_steps is None:
            return None
        if num_steps is None and not all(_is_int(s) for s in self.search_steps):
            raise DifcacheError(
                f"search_steps={self.search_steps} holds fractions but the number of steps is unknown; apply sparse "
                "attention to the pipeline (not the bare denoiser) or give step indices."
            )
        return tuple(sorted({_resolve(s, num_steps or 0, round_up=False) for s in self.search_steps}))

    # ------------------------------------------------------------------ copies and round trips
    def replace(self, **overrides: Any) -> SparseAttentionConfig:
        """A validated copy with ``overrides``; an unknown name raises listing the valid fields."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise DifcacheError(
                f"{type(self).__name__} ({self.method!r}) has no field(s) {unknown}; its fields are {sorted(names)}."
            )
        try:
            return dataclasses.replace(self, **overrides)
        except (TypeError, ValueError) as err:
            raise DifcacheError(str(err)) from None

    def to_dict(self) -> dict[str, Any]:
        """``{"method", "version", fields...}`` as plain JSON (tuples as lists), read by :meth:`from_dict`."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
        return {"method": self.method, "version": self.VERSION, **fields}

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> SparseAttentionConfig:
        """The config that :meth:`to_dict` wrote; refuses a newer version and unknown fields, naming the fix."""
        if not isinstance(data, dict):
            raise DifcacheError(f"{source}: a sparse attention config is a JSON object, got {type(data).__name__}.")
        target = cls if cls.method else method_config(data.get("method", "?"))
        method, version = data.get("method"), data.get("version")
        if method != target.method:
            raise DifcacheError(f"{source}: this is a {method!r} config, not {target.method!r}.")
        if not _is_int(version):
            raise DifcacheError(f"{source}: missing or bad `version` ({version!r}); write configs with to_dict().")
        if version > target.VERSION:
            raise DifcacheError(
                f"{source}: {target.__name__} version {version} was written by a newer difcache (this one reads up "
                f"to {target.VERSION}); upgrade difcache (pip install -U difcache) or re-create the config here."
            )
        if version < target.VERSION:
            raise DifcacheError(
                f"{source}: {target.__name__} version {version} predates one config class per method; re-create it "
                f"with difcache.attention.{target.__name__}(...) and save it again with to_dict()."
            )
        fields = {k: v for k, v in data.items() if k not in ("method", "version")}
        names = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise DifcacheError(f"{source}: {target.__name__} has no field(s) {unknown}; valid: {sorted(names)}.")
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        try:
            return target(**fields)
        except (TypeError, ValueError) as err:
            raise DifcacheError(f"{source}: {err}") from None


# ---------------------------------------------------------------------------------------------- block selectors
@dataclass(frozen=True)
class BlockSparseConfig(SparseAttentionConfig):
    """Methods that select (query block, key block) pairs of fixed-size blocks over 3D tiles.

    Attributes:
        block_size: tokens per query/key block, a power of two in [16, 256] (64 or 128 on real models).
        tile: the (t, h, w) tile video tokens are grouped into before blocking, or ``None`` for raster order.
            A tile the grid does not divide is padded, so that a block never straddles two tiles
            (:func:`difcache.attention.reorder.tile_layout`).
        min_blocks: key blocks kept per query block at least (>= 1).
        keep_diagonal: always keep each query block's own key block (after tiling, its own neighbourhood).
        first_frame_sink: always keep key blocks holding first-frame tokens (Sparse VideoGen, Radial).
        estimator: how block-pair attention mass is estimated: ``"pooled"`` (softmax of mean-pooled q . k;
            SpargeAttn, NABLA), ``"sampled"`` (PSA's: exact attention among a quarter of each block's tokens,
            max-pooled per block pair), ``"exact"`` (AdaSpa's: the exact mass from a dense pass with its
            log-sum-exp; the search call runs dense, so use it with ``search_steps``).
        sim_threshold: SpargeAttn's self-similarity guard for the pooled estimator: a key block whose tokens'
            mean cosine similarity is below this is always kept (its mean is no summary of it), a query block
            below it keeps every key block. ``None``: off.
    """

    block_size: int = 128
    tile: tuple[int, int, int] | None = (2, 8, 8)
    min_blocks: int = 1
    keep_diagonal: bool = True
    first_frame_sink: bool = False
    estimator: str = "pooled"
    sim_threshold: float | None = None

    def _validate(self) -> None:
        bs = self.block_size
        if not _is_int(bs) or bs < 16 or bs > 256 or bs & (bs - 1):
            raise ValueError(
                f"{_where(self, 'block_size')} must be a power of two in [16, 256] (64 or 128 typical), got {bs!r}."
            )
        tile = tuple(self.tile) if isinstance(self.tile, list) else self.tile
        if tile is not None and (
            not isinstance(tile, tuple) or len(tile) != 3 or not all(_is_int(t) and t >= 1 for t in tile)
        ):
            raise ValueError(
                f"{_where(self, 'tile')} must be None or three ints >= 1 (t, h, w), e.g. (2, 8, 8); got {self.tile!r}."
            )
        object.__setattr__(self, "tile", tile)
        check_int(self, "min_blocks", 1)
        check_bool(self, "keep_diagonal")
        check_bool(self, "first_frame_sink")
        check_choice(self, "estimator", ESTIMATORS)
        if self.sim_threshold is not None:
            if not _is_real(self.sim_threshold) or not -1 <= self.sim_threshold <= 1:
                raise ValueError(
                    f"{_where(self, 'sim_threshold')} must be None or a cosine similarity in [-1, 1], "
                    f"got {self.sim_threshold!r}."
                )
            if self.estimator != "pooled":
                raise ValueError(
                    f"{_where(self, 'sim_threshold')} guards the pooled estimator; set estimator='pooled' or drop it."
                )
        if self.estimator == "exact" and self.search_steps is None and self.reuse_steps == 1:
            raise ValueError(
                f"{type(self).__name__}: estimator='exact' computes dense attention to search, so searching every step "
                "saves nothing; give search_steps (e.g. (0.2, 0.6), AdaSpa's) or reuse_steps > 1."
            )


@dataclass(frozen=True)
class TopKSparseConfig(BlockSparseConfig):
    """Top-k: each query block keeps its ``round(density * M)`` highest-mass key blocks (steady at high sparsity).

    Attributes:
        density: the fraction of key blocks kept per query block, in (0, 1]; 1 is dense.
    """

    method: ClassVar[str] = "topk"
    density: float = 0.2

    def _validate(self) -> None:
        super()._validate()
        _fraction(self, "density")


@dataclass(frozen=True)
class TopPSparseConfig(BlockSparseConfig):
    """Top-p: each query block keeps the fewest key blocks whose estimated mass reaches ``p`` (XAttention's
    threshold, arXiv:2503.16428; SVG2's top-p over blocks).

    Attributes:
        p: the attention mass kept, in (0, 1]; 1 is dense.
    """

    method: ClassVar[str] = "topp"
    p: float = 0.9

    def _validate(self) -> None:
        super()._validate()
        _fraction(self, "p")


@dataclass(frozen=True)
class PSASparseConfig(BlockSparseConfig):
    """Pyramid sparse attention (PSA, Li et al., arXiv:2512.04025): key blocks ranked by mass are read at level 0
    (full), 1, 2 or 3 (keys and values mean-pooled by 2, 4, 8) or skipped.

    Attributes:
        density: the compute budget as a fraction of dense attention work, in (0, 1]; ``None`` assigns levels by
            cumulative mass instead (``thresholds``).
        thresholds: cumulative-mass bounds of levels 0..3 in mass mode; blocks ranked beyond the last are
            skipped. Non-decreasing, in (0, 1].
        full_share: share of the budget spent on full blocks, in (0, 1].
        estimator: default ``"sampled"``, PSA's own (see :class:`BlockSparseConfig`).
    """

    method: ClassVar[str] = "psa"
    pyramid: ClassVar[bool] = True
    density: float | None = 0.2
    thresholds: tuple[float, float, float, float] = (0.5, 0.7, 0.85, 0.95)
    full_share: float = 0.5
    estimator: str = "sampled"

    def _validate(self) -> None:
        super()._validate()
        _fraction(self, "density", allow_none=True)
        th = tuple(self.thresholds) if isinstance(self.thresholds, list) else self.thresholds
        if (
            not isinstance(th, tuple)
            or len(th) != 4
            or not all(_is_real(t) and 0 < t <= 1 for t in th)
            or any(a > b for a, b in zip(th, th[1:], strict=False))
        ):
            raise ValueError(
                f"{_where(self, 'thresholds')} must be 4 non-decreasing numbers in (0, 1], got {self.thresholds!r}."
            )
        object.__setattr__(self, "thresholds", th)
        _fraction(self, "full_share")


@dataclass(frozen=True)
class AdaSpaSparseConfig(BlockSparseConfig):
    """AdaSpa (Xia et al., ICCV 2025, arXiv:2502.21079): the pattern is searched with exact statistics at a few
    steps and reused on the steps in between; the budget is spread over heads by their attention concentration.

    At a search step the call runs dense attention and keeps its log-sum-exp, computes the exact attention mass of
    every block pair from it (the paper's "LSE-cached" search, online: the search step's own output is exact), and
    gives each head the number of key blocks per query block that maximises the total kept mass under the mean
    budget ``density`` (greedy over the heads' mean recall curves: the paper's head-adaptive top-k). Deviations:
    the paper fuses the search into the sparse kernel with an LSE cached from an earlier step; here the search step
    computes its own dense pass (same statistics, one extra pass over the scores), and the text/video hierarchy is
    difcache's text handling (text rows and columns dense).

    Attributes:
        density: the mean fraction of key blocks kept per query block over all heads, in (0, 1].
        search_steps: default (0.2, 0.6), the paper's steps 10 and 30 of 50.
        warmup_steps: default 0.2: dense until the first search.
        estimator: default ``"exact"``.
    """

    method: ClassVar[str] = "adaspa"
    density: float = 0.2
    estimator: str = "exact"
    search_steps: tuple[int | float, ...] | None = (0.2, 0.6)
    warmup_steps: int | float = 0.2

    def _validate(self) -> None:
        super()._validate()
        _fraction(self, "density")


# ---------------------------------------------------------------------------------------------- SVG2
@dataclass(frozen=True)
class SVG2SparseConfig(SparseAttentionConfig):
    """Sparse VideoGen 2's semantic-aware permutation (Yang et al., arXiv:2505.18875).

    Per (batch, head), queries and keys are clustered separately by k-means (warm-started from the previous
    step's centroids), tokens are permuted so each cluster is contiguous, and each query cluster keeps the key
    clusters whose estimated mass reaches ``p``: centroid scores ``q_c . k_c * scale`` in a softmax weighted by the
    key clusters' sizes. Attention then runs over variable-size clusters (the C++ range kernel on CPU) and the
    output is permuted back.

    Attributes:
        p: the estimated mass kept per query cluster, in (0, 1]; 1 is dense. Default 0.9 (SVG2's) unless
            ``density`` is given.
        density: instead of ``p``, a budget: each query cluster keeps its top key clusters until they hold this
            fraction of the keys (for comparisons at matched work).
        q_cluster_size: mean tokens per query cluster (clusters = ceil(N / size)). SVG2 uses 300 query centroids
            for Wan's 75.6k tokens at 720p, ~252 tokens each.
        k_cluster_size: mean tokens per key cluster. SVG2 uses 1000 key centroids there, ~76 tokens each; the
            default 128 is larger because CPU GEMMs narrower than ~128 keys run well below their peak rate
            (``k_cluster_size=76`` is the paper's setting).
        kmeans_iters: Lloyd iterations per search when warm-started (SVG2: 2).
        kmeans_init_iters: iterations of the first search of a run, from an initialisation spread over the
            sequence (SVG2: 50 from random points; fewer suffice from a spread start on smooth video tokens).
        min_kc_ratio: at least this fraction of the key clusters kept per query cluster (SVG2's ``min_kc_ratio``).
    """

    method: ClassVar[str] = "svg2"
    p: float | None = None
    density: float | None = None
    q_cluster_size: int = 256
    k_cluster_size: int = 128
    kmeans_iters: int = 2
    kmeans_init_iters: int = 10
    min_kc_ratio: float = 0.0

    def _validate(self) -> None:
        if self.p is None and self.density is None:
            object.__setattr__(self, "p", 0.9)  # SVG2's top-p
        if self.p is not None and self.density is not None:
            raise ValueError(
                f"{type(self).__name__} takes either `p` (mass, e.g. p=0.9) or `density` (a budget), not both; "
                "pass p=None with density."
            )
        _fraction(self, "p", allow_none=True)
        _fraction(self, "density", allow_none=True)
        check_int(self, "q_cluster_size", 1)
        check_int(self, "k_cluster_size", 1)
        check_int(self, "kmeans_iters", 0)
        check_int(self, "kmeans_init_iters", 0)
        _fraction(self, "min_kc_ratio", zero=True)


# ---------------------------------------------------------------------------------------------- registry
SelectFn = Callable[..., Any]


@dataclass(frozen=True)
class SparseMethod:
    name: str
    config_cls: type[SparseAttentionConfig]
    select: SelectFn
    description: str


_METHODS: Registry[SparseMethod] = Registry("sparse attention method")


def register_sparse_method(config_cls: type[SparseAttentionConfig], description: str) -> Callable[[SelectFn], SelectFn]:
    """Decorator registering ``select(config, context) -> Selection`` for ``config_cls`` under its ``method``."""
    return _METHODS.decorator(
        config_cls.method, lambda select: SparseMethod(config_cls.method, config_cls, select, description)
    )


def list_sparse_methods() -> dict[str, str]:
    """Registered sparse attention methods and one-line descriptions."""
    return _METHODS.descriptions()


def sparse_method(name_or_config: str | SparseAttentionConfig) -> SparseMethod:
    name = name_or_config if isinstance(name_or_config, str) else type(name_or_config).method
    spec = _METHODS.get(name)
    if spec is None or (not isinstance(name_or_config, str) and spec.config_cls is not type(name_or_config)):
        raise _METHODS.unknown(name)
    return spec


def method_config(name: str) -> type[SparseAttentionConfig]:
    return sparse_method(name).config_cls


def resolve_sparse_config(
    method_or_config: str | SparseAttentionConfig, overrides: dict[str, Any]
) -> SparseAttentionConfig:
    """A validated config: a method's defaults (by name) or the given config, with ``overrides`` applied."""
    if isinstance(method_or_config, SparseAttentionConfig):
        config = method_or_config
        sparse_method(config)  # an unregistered config class is an error, not a silent no-op
    elif isinstance(method_or_config, str):
        spec = sparse_method(method_or_config)
        names = sorted(f.name for f in dataclasses.fields(spec.config_cls))
        try:
            config = spec.config_cls(**overrides)
        except (TypeError, ValueError) as err:  # an unknown field, or a value the config refuses (naming it)
            if set(overrides) <= set(names):
                raise DifcacheError(str(err)) from None
            raise DifcacheError(f"{err}; {spec.config_cls.__name__} ({spec.name!r}) fields are: {names}.") from None
        return config
    else:
        raise DifcacheError(
            f"apply_sparse_attention expects a method name or a sparse config, got {type(method_or_config).__name__}; "
            f"try method='topp' or difcache.attention.TopPSparseConfig()."
        )
    return config.replace(**overrides) if overrides else config


def sparse_config_from_dict(data: Any, source: str = "config") -> SparseAttentionConfig:
    """Any registered method's config from :meth:`SparseAttentionConfig.to_dict`'s output."""
    return SparseAttentionConfig.from_dict(data, source)
