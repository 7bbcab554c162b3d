"""difcache: training-free feature caching and block-sparse attention for Hugging Face diffusers.

handle = difcache.apply_cache(pipe, method="taylorseer")
image = pipe(...).images[0]
print(handle.stats())
handle.remove()
"""

from difcache.adapters import block_adapter, register_adapter
from difcache.api import CacheHandle, apply_cache, autotune, calibrate, remove_cache
from difcache.attention import (
    AdaSpaSparseConfig,
    PSASparseConfig,
    SparseAttentionConfig,
    SparseAttentionHandle,
    SparseAttentionStats,
    SVG2SparseConfig,
    TopKSparseConfig,
    TopPSparseConfig,
    apply_sparse_attention,
    list_sparse_methods,
)
from difcache.config import CacheConfig
from difcache.core import Action
from difcache.engine.stats import CacheStats
from difcache.errors import DifcacheError
from difcache.methods import (
    AlwaysComputeConfig,
    AutotuneConfig,
    BACConfig,
    DeepCacheConfig,
    DeltaDiTConfig,
    ERTACacheConfig,
    FORAConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
    list_methods,
    register_method,
)
from difcache.profile import Profile
from difcache.version import __version__ as __version__

__all__ = [
    "Action",
    "AdaSpaSparseConfig",
    "AlwaysComputeConfig",
    "AutotuneConfig",
    "BACConfig",
    "CacheConfig",
    "CacheHandle",
    "CacheStats",
    "DeepCacheConfig",
    "DeltaDiTConfig",
    "DifcacheError",
    "ERTACacheConfig",
    "FORAConfig",
    "PSASparseConfig",
    "Profile",
    "SVG2SparseConfig",
    "SparseAttentionConfig",
    "SparseAttentionHandle",
    "SparseAttentionStats",
    "TaylorSeerConfig",
    "TeaCacheConfig",
    "TopKSparseConfig",
    "TopPSparseConfig",
    "apply_cache",
    "autotune",
    "apply_sparse_attention",
    "block_adapter",
    "calibrate",
    "list_methods",
    "list_sparse_methods",
    "register_adapter",
    "register_method",
    "remove_cache",
]
