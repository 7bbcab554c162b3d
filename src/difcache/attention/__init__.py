"""Block-sparse attention for video diffusion transformers (and FLUX).

Attention dominates video DiTs, and most (query block, key block) pairs carry little attention mass.
``apply_sparse_attention`` installs attention processors that, per batch and head, estimate the mass of
every block pair from mean-pooled queries and keys, compute only the pairs that matter (top-p, top-k) or
compute the rest coarsely (PSA's pyramid levels), keep text tokens dense, and leave warm-up steps and the
first layers dense. Video tokens are grouped into 3D tiles first so that blocks are space-time neighbourhoods.

* :mod:`.patterns` - scoring, top-p / top-k / PSA levels, and :class:`BlockPattern` (the one internal format);
* :mod:`.reorder` - (t, h, w) raster order to tiles and back;
* :mod:`.runtime` - the per-denoiser state and the sparse call (text merge, pattern reuse, stats);
* :mod:`.processors` - one diffusers attention processor per model family;
* :mod:`.api` - ``apply_sparse_attention`` and its handle.

Kernels live in :mod:`difcache.kernels`.
"""

from difcache.attention.api import SparseAttentionHandle, apply_sparse_attention
from difcache.attention.config import SparseAttentionConfig
from difcache.attention.patterns import BlockPattern
from difcache.attention.runtime import SparseAttentionStats

__all__ = [
    "BlockPattern",
    "SparseAttentionConfig",
    "SparseAttentionHandle",
    "SparseAttentionStats",
    "apply_sparse_attention",
]
