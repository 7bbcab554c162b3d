"""A method applied to one layout: a scope (what is cached), a policy (when) and a forecaster (what instead).

Methods build a :class:`Plan`; the runtime executes it. New methods are mostly new combinations of these
three pieces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from difcache.adapters.layout import Unit
from difcache.forecasters.base import Forecaster
from difcache.policies.base import StaticPolicy

if TYPE_CHECKING:
    from difcache.engine.runtime import CacheRuntime


class Scope(Protocol):
    """What a method caches; installs the hooks that implement it and returns their removers."""

    units: tuple[Unit, ...]

    def install(self, runtime: CacheRuntime) -> list[Callable[[], None]]: ...


@dataclass(frozen=True)
class Plan:
    scope: Scope
    policy: StaticPolicy
    forecaster: Forecaster
