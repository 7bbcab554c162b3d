"""The method registry: config class -> ``build(config, layout) -> Plan``.

A new method is one new file that defines a config and decorates its build function with
:func:`register_method`; nothing else in the library changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from difcache.adapters.layout import Layout
from difcache.config import CacheConfig
from difcache.core import Plan
from difcache.errors import DifcacheError
from difcache.registry import Registry

BuildFn = Callable[[Any, Layout], Plan]
# fn(config, layout, session: calibration.CalibrationSession, call_kwargs: list[dict]) -> JSON-serialisable data
CalibrateFn = Callable[[Any, Layout, Any, list], dict]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type[CacheConfig]
    build: BuildFn
    description: str
    calibrate: CalibrateFn | None = None


_METHODS: Registry[MethodSpec] = Registry("method")


def register_method(config_cls: type[CacheConfig], description: str) -> Callable[[BuildFn], BuildFn]:
    """Decorator registering ``build`` for ``config_cls`` under ``config_cls.method``."""
    return _METHODS.decorator(
        config_cls.method, lambda build: MethodSpec(config_cls.method, config_cls, build, description)
    )


def register_calibrator(config_cls: type[CacheConfig]) -> Callable[[CalibrateFn], CalibrateFn]:
    """Decorator registering the offline calibration of an already registered method."""
    return _METHODS.decorator(config_cls.method, lambda fn: replace(_METHODS.lookup(config_cls.method), calibrate=fn))


def config_from_dict(raw: dict[str, Any]) -> CacheConfig:
    """The config :meth:`CacheConfig.to_dict` wrote (its ``method`` picks the class; the version is checked)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("method"), str):
        raise DifcacheError(f"A config dict needs a `method` name, got {raw!r}.")
    return method_spec(raw["method"]).config_cls.from_dict(raw)


def list_methods() -> dict[str, str]:
    """Registered method names and one-line descriptions."""
    return _METHODS.descriptions()


def method_spec(name_or_config: str | CacheConfig) -> MethodSpec:
    name = name_or_config if isinstance(name_or_config, str) else type(name_or_config).method
    return _METHODS.lookup(name)


def resolve_config(
    method_or_config: str | CacheConfig, model: Layout | str, overrides: dict[str, Any]
) -> CacheConfig:
    """A validated config: the defaults for a method name on ``model`` (a layout, or a family name), or the given
    config, with ``overrides``."""
    if isinstance(method_or_config, CacheConfig):
        config = method_or_config
        method_spec(config)  # an unregistered config class is an error, not a silent no-op
    elif isinstance(method_or_config, str):
        config_cls = method_spec(method_or_config).config_cls
        config = config_cls.for_family(model) if isinstance(model, str) else config_cls.for_layout(model)
    else:
        raise DifcacheError(
            f"apply_cache expects a method name or a config, got {type(method_or_config).__name__}; "
            f"try method='taylorseer' or difcache.TaylorSeerConfig()."
        )
    return config.replace(**overrides) if overrides else config
