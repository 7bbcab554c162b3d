"""Methods: one file each, a config with the paper's defaults and a registered ``build`` (scope + policy +
forecaster); calibrated methods keep their calibrator beside it in ``<method>_calibration.py``."""

from difcache.methods import (  # noqa: F401  (registration)
    always_compute,
    autotuned,
    bac,
    bac_calibration,
    deepcache,
    delta_dit,
    ertacache,
    ertacache_calibration,
    fora,
    taylorseer,
    teacache,
    teacache_calibration,
)
from difcache.methods.always_compute import AlwaysComputeConfig
from difcache.methods.autotuned import AutotuneConfig
from difcache.methods.bac import BACConfig
from difcache.methods.deepcache import DeepCacheConfig
from difcache.methods.delta_dit import DeltaDiTConfig
from difcache.methods.ertacache import ERTACacheConfig
from difcache.methods.fora import FORAConfig
from difcache.methods.registry import (
    config_from_dict,
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
    "AutotuneConfig",
    "BACConfig",
    "DeepCacheConfig",
    "DeltaDiTConfig",
    "ERTACacheConfig",
    "FORAConfig",
    "TaylorSeerConfig",
    "TeaCacheConfig",
    "config_from_dict",
    "list_methods",
    "method_spec",
    "register_calibrator",
    "register_method",
    "resolve_config",
]
