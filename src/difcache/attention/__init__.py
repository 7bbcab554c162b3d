"""Block-sparse attention for video diffusion transformers (and FLUX).

Attention dominates video DiTs, and most (query, key) pairs carry little attention mass.
``apply_sparse_attention(pipe, method, **overrides)`` installs attention processors that, per batch and head,
estimate where the mass is, compute only what matters, keep text tokens dense, and leave warm-up steps and the
first layers dense. Methods (one config class each, :mod:`.config`): ``topk``, ``topp`` and ``psa`` over blocks of
3D tiles (pooled, PSA-sampled or exact mass estimates), ``adaspa`` (exact search at a few steps, reused in
between, head-adaptive budget) and ``svg2`` (k-means clusters of q and k, permuted, variable-size blocks).

* :mod:`.config` - the configs, their registry and JSON round trips;
* :mod:`.patterns` - estimators, top-p / top-k / PSA levels, and :class:`BlockPattern` (the block format);
* :mod:`.svg2` - k-means, the semantic-aware permutation and :class:`~.svg2.ClusterPattern`;
* :mod:`.selectors` - one registered selector per method;
* :mod:`.reorder` - (t, h, w) raster order to (padded) tiles and back;
* :mod:`.runtime` - the per-denoiser state and the sparse call (text merge, search schedule, stats);
* :mod:`.processors` - one diffusers attention processor per model family;
* :mod:`.api` - ``apply_sparse_attention`` and its handle.

Kernels live in :mod:`difcache.kernels`.
"""

from difcache.attention import selectors as _selectors  # noqa: F401  (registers the methods)
from difcache.attention.api import SparseAttentionHandle, apply_sparse_attention
from difcache.attention.config import (
    AdaSpaSparseConfig,
    BlockSparseConfig,
    PSASparseConfig,
    SparseAttentionConfig,
    SVG2SparseConfig,
    TopKSparseConfig,
    TopPSparseConfig,
    list_sparse_methods,
    register_sparse_method,
    sparse_config_from_dict,
)
from difcache.attention.patterns import BlockPattern
from difcache.attention.runtime import SparseAttentionStats

__all__ = [
    "AdaSpaSparseConfig",
    "BlockPattern",
    "BlockSparseConfig",
    "PSASparseConfig",
    "SVG2SparseConfig",
    "SparseAttentionConfig",
    "SparseAttentionHandle",
    "SparseAttentionStats",
    "TopKSparseConfig",
    "TopPSparseConfig",
    "apply_sparse_attention",
    "list_sparse_methods",
    "register_sparse_method",
    "sparse_config_from_dict",
]
