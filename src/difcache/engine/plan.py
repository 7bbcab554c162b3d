"""A method applied to one layout: a scope (what is cached), a policy (when) and a forecaster (what instead).

Methods build a :class:`Plan`; the runtime executes it. New methods are mostly new combinations of these
three pieces.

A plan may also carry *extras*: installers for what a method changes outside the denoiser's modules (ERTACache
wraps the pipeline's scheduler). Each is called once by :meth:`CacheRuntime.install` with the runtime (which
gives ``runtime.scheduler``, ``runtime.model`` and ``runtime.tracker``) after the scope's hooks are in place,
and returns a remover; removers run in reverse order on ``remove()``, before the step tracker lets go of the
scheduler. An installer that raises aborts the install and everything installed so far is removed.
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


# installer(runtime) -> remover
Extra = Callable[["CacheRuntime"], Callable[[], None]]


class Scope(Protocol):
    """What a method caches; installs the hooks that implement it and returns their removers."""

    units: tuple[Unit, ...]

    def install(self, runtime: CacheRuntime) -> list[Callable[[], None]]: ...


@dataclass(frozen=True)
class Plan:
    scope: Scope
    policy: StaticPolicy
    forecaster: Forecaster
    extras: tuple[Extra, ...] = ()
