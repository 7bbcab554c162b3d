"""Methods: one file each, a config with the paper's defaults and a registered ``build``."""

from difcache.methods import always_compute, bac, deepcache, delta_dit, ertacache, fora, taylorseer, teacache  # noqa: F401  (registration)
from difcache.methods.always_compute import AlwaysComputeConfig
from difcache.methods.bac import BACConfig
from difcache.methods.deepcache import DeepCacheConfig
from difcache.methods.delta_dit import DeltaDiTConfig
from difcache.methods.ertacache import ERTACacheConfig
from difcache.methods.fora import FORAConfig
from difcache.methods.registry import (
    list_methods,
    method_spec,
    register_calibrator,
    register_method,
    resolve_config,
)
from difcache.methods.taylorseer import TaylorSeerConfig
from difcache.methods.teacache import TeaCacheConfig

__all__ = [
    "AlwaysComputeConfig",
    "BACConfig",
    "DeepCacheConfig",
    "DeltaDiTConfig",
    "ERTACacheConfig",
    "FORAConfig",
    "TaylorSeerConfig",
    "TeaCacheConfig",
    "list_methods",
    "method_spec",
    "register_calibrator",
    "register_method",
    "resolve_config",
]
