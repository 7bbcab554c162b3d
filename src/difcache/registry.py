"""A table of named specs filled by decorators: the shape every difcache registry has.

Each method module registers itself with a decorator, so a new method is one new file and no ``isinstance``
ladder grows; a name nothing is registered under raises one :class:`~difcache.errors.DifcacheError` listing the
registered names. Used by :mod:`difcache.methods.registry` (cache methods) and :mod:`difcache.attention.config`
(sparse attention methods).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Protocol, TypeVar

from difcache.errors import DifcacheError


class Described(Protocol):
    """What a registered spec carries at least: a one-line description for listings."""

    description: str


SpecT = TypeVar("SpecT", bound=Described)
FnT = TypeVar("FnT", bound=Callable[..., object])


class Registry(Mapping[str, SpecT]):
    """Specs by name, read as a mapping; filled with :meth:`add` or, in the method's own module, :meth:`decorator`.

    ``kind`` says what a name names (``"sparse attention method"``), for the unknown-name error.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._specs: dict[str, SpecT] = {}

    def __getitem__(self, name: str) -> SpecT:
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def add(self, name: str, spec: SpecT) -> None:
        """Register ``spec`` under ``name`` (replacing what was there)."""
        self._specs[name] = spec

    def decorator(self, name: str, make_spec: Callable[[FnT], SpecT]) -> Callable[[FnT], FnT]:
        """A decorator that registers ``make_spec(fn)`` under ``name`` and returns ``fn`` unchanged."""

        def decorate(fn: FnT) -> FnT:
            self.add(name, make_spec(fn))
            return fn

        return decorate

    def descriptions(self) -> dict[str, str]:
        """``{name: description}`` in name order."""
        return {name: self._specs[name].description for name in sorted(self._specs)}

    def unknown(self, name: str) -> DifcacheError:
        """The error for ``name`` when nothing fits it: names the kind and lists what is registered."""
        return DifcacheError(f"Unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._specs))}.")

    def lookup(self, name: str) -> SpecT:
        """The spec registered under ``name``; raises :meth:`unknown` otherwise."""
        spec = self._specs.get(name)
        if spec is None:
            raise self.unknown(name)
        return spec
