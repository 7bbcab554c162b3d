"""Scopes: what a method caches, and the hooks that implement it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from difcache.adapters.layout import Unit
from difcache.engine.hooks import UNIT_HOOK, UnitHook, register

if TYPE_CHECKING:
    from difcache.engine.runtime import CacheRuntime


@dataclass(frozen=True)
class ModuleScope:
    """Each unit's output is cached on its own (pre-gate attention/FFN outputs, or whole blocks)."""

    units: tuple[Unit, ...]

    def install(self, runtime: CacheRuntime) -> list[Callable[[], None]]:
        return [register(u.module, UnitHook(runtime, i), UNIT_HOOK) for i, u in enumerate(self.units)]
