"""The handle every ``apply_*`` verb returns: ``stats()``, ``reset_stats()``, ``remove()`` and a context manager.

:func:`difcache.apply_cache` and :func:`difcache.attention.apply_sparse_attention` return subclasses of
:class:`Handle`, so both behave alike: at most one of each kind per model (kept on the model under ``attr``),
``remove()`` is exact and idempotent, reading a removed handle says how to apply again, and a handle cannot be
copied (a copy would share the model's hooks). A subclass says what it is and how to undo its runtime.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import torch

from difcache.errors import DifcacheError, Uncopyable


class Runtime(Protocol):
    """What a handle needs of the runtime it owns."""

    def reset_stats(self) -> None: ...


RuntimeT = TypeVar("RuntimeT", bound=Runtime)


class Handle(Uncopyable, ABC, Generic[RuntimeT]):
    """Owns one runtime installed on ``model`` with ``config``; subclasses set the class attributes below."""

    kind: ClassVar[str]  # what is applied, for messages: "cache", "sparse attention"
    verb: ClassVar[str]  # how to apply it again: "difcache.apply_cache(...)"
    attr: ClassVar[str]  # the model attribute that holds the active handle

    def __init__(self, model: torch.nn.Module, config: Any, runtime: RuntimeT) -> None:
        self.model = model
        self.config = config
        self._runtime: RuntimeT | None = runtime

    @classmethod
    def check_free(cls, model: torch.nn.Module) -> None:
        """Raise if ``model`` already holds an active handle of this kind."""
        existing = getattr(model, cls.attr, None)
        if existing is not None and existing.active:
            raise DifcacheError(
                f"{type(model).__name__} already has a difcache {cls.kind} ({existing.config!r}); call "
                f"handle.remove() on it before applying another."
            )

    def attach(self) -> None:
        """Record this handle on its model (after :meth:`check_free`)."""
        setattr(self.model, self.attr, self)

    @property
    def active(self) -> bool:
        return self._runtime is not None

    def stats(self) -> Any:
        """What the runtime counted since it was applied (or since :meth:`reset_stats`)."""
        if self._runtime is None:
            raise DifcacheError(f"This {self.kind} was removed; stats are gone. Read stats() before remove().")
        return self._read_stats(self._runtime)

    def reset_stats(self) -> None:
        """Start counting afresh (e.g. after a warm-up call)."""
        self._require().reset_stats()

    def remove(self) -> None:
        """Undo everything the runtime installed; outputs become bit-identical to the model without it."""
        if self._runtime is None:
            return
        self._release(self._runtime)
        self._runtime = None
        if getattr(self.model, self.attr, None) is self:
            delattr(self.model, self.attr)

    def _require(self) -> RuntimeT:
        if self._runtime is None:
            raise DifcacheError(f"This {self.kind} was removed; apply it again with {self.verb}.")
        return self._runtime

    # ------------------------------------------------------------------ what a subclass defines
    @abstractmethod
    def _read_stats(self, runtime: RuntimeT) -> Any:
        """The runtime's counts, as ``stats()`` returns them."""

    @abstractmethod
    def _release(self, runtime: RuntimeT) -> None:
        """Undo everything ``runtime`` installed on the model."""

    @abstractmethod
    def _describe(self) -> str:
        """What the repr shows between the config and the state, e.g. ``"12 units"``."""

    # ------------------------------------------------------------------ protocol
    def __enter__(self) -> Handle[RuntimeT]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"{type(self).__name__}({self.config!r}, {self._describe()}, {state})"

