"""Base class and validators for method configs.

Every config is a frozen dataclass with the paper's defaults, validated in ``__post_init__`` so that a bad
value fails at construction with the field's name, its allowed range and the value received. Configs carry a
``VERSION`` (bump it when a field changes meaning) and round-trip through plain dicts for profiles.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import os
from typing import Any, ClassVar

from difcache.adapters.layout import Layout
from difcache.profile import Profile


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Base of every caching method's config; subclasses are registered with ``methods.register_method``."""

    VERSION: ClassVar[int] = 1
    method: ClassVar[str] = ""

    @classmethod
    def for_family(cls, family: str) -> CacheConfig:
        """The defaults for a model family (``"flux"``, ``"wan"``, ...); the paper's defaults unless overridden."""
        return cls()

    @classmethod
    def for_layout(cls, layout: Layout) -> CacheConfig:
        """The defaults for this model: its family's (:meth:`for_family`) unless a method tells sizes or tasks
        apart (TeaCache's presets per model)."""
        return cls.for_family(layout.family)

    def replace(self, **overrides: Any) -> CacheConfig:
        """A copy with ``overrides`` applied (and validated); unknown names raise naming the valid fields."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {unknown}; valid fields are {sorted(names)}.")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain fields plus ``method`` and ``version``; a profile given as an object is written as its path."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if "profile" in fields and fields["profile"] is not None and not isinstance(fields["profile"], str):
            fields["profile"] = os.fspath(fields["profile"]) if hasattr(fields["profile"], "__fspath__") else None
        return {"method": self.method, "version": self.VERSION, **fields}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CacheConfig:
        """The config a :meth:`to_dict` wrote, validated; a newer version or another method is refused."""
        if not isinstance(raw, dict):
            raise ValueError(f"{cls.__name__}.from_dict expects a dict, got {type(raw).__name__}.")
        values = dict(raw)
        method, version = values.pop("method", cls.method), values.pop("version", cls.VERSION)
        if method != cls.method:
            raise ValueError(f"This is a {method!r} config, not {cls.method!r}; use that method's config class.")
        if isinstance(version, bool) or not isinstance(version, int) or version > cls.VERSION:
            raise ValueError(
                f"{cls.__name__} version {version!r} is newer than this difcache reads ({cls.VERSION}); upgrade "
                "difcache or write the config again with this version."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise TypeError(f"{cls.__name__} has no field(s) {unknown}; valid fields are {sorted(names)}.")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def check_int(owner: object, name: str, lo: int, hi: int | None = None, *, allow_none: bool = False) -> None:
    """Raise unless ``owner.name`` is an int in ``[lo, hi]`` (``bool`` is refused: ``True`` is not 1 here)."""
    value = getattr(owner, name)
    if value is None and allow_none:
        return
    span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{type(owner).__name__}.{name} must be an int {span}, got {value!r}.")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{type(owner).__name__}.{name} must be {span}, got {value}.")


def check_float(
    owner: object, name: str, lo: float, hi: float | None = None, *, lo_open: bool = False, allow_none: bool = False
) -> None:
    """Raise unless ``owner.name`` is a finite number in the range (``lo`` excluded when ``lo_open``)."""
    value = getattr(owner, name)
    if value is None and allow_none:
        return
    lower = f"> {lo}" if lo_open else f">= {lo}"
    span = lower if hi is None else f"{lower} and <= {hi}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{type(owner).__name__}.{name} must be a number {span}, got {value!r}.")
    bad = not math.isfinite(value) or value < lo or (lo_open and value == lo) or (hi is not None and value > hi)
    if bad:
        raise ValueError(f"{type(owner).__name__}.{name} must be {span}, got {value}.")


def check_bool(owner: object, name: str) -> None:
    """Raise unless ``owner.name`` is ``True`` or ``False`` (``1`` or ``"yes"`` are refused, not guessed at)."""
    value = getattr(owner, name)
    if not isinstance(value, bool):
        raise TypeError(f"{type(owner).__name__}.{name} must be True or False, got {value!r}.")


def check_profile(owner: object, name: str = "profile") -> None:
    """Raise unless ``owner.name`` is ``None``, a path or a :class:`~difcache.profile.Profile`."""
    value = getattr(owner, name)
    if value is not None and not isinstance(value, Profile | str) and not hasattr(value, "__fspath__"):
        raise TypeError(
            f"{type(owner).__name__}.{name} must be a path or a difcache.Profile, got {type(value).__name__}."
        )


def check_choice(owner: object, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(owner, name)
    if value not in choices:
        raise ValueError(f"{type(owner).__name__}.{name} must be one of {list(choices)}, got {value!r}.")


def parse_fields(text: str) -> dict[str, Any]:
    """``"interval=4,coefficients=(1.0,0.0),forecast=taylor"`` -> config overrides, for the command line.

    Values are Python literals where they parse (``4``, ``(1.0, 0.0)``, ``'p.json'``), else plain strings
    (``taylor``). Commas inside brackets belong to the value, so tuples and lists can be given.
    """
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    fields: dict[str, Any] = {}
    for item in filter(str.strip, items):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"expected key=value[,key=value...], got {item.strip()!r} in {text!r}")
        try:
            fields[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            fields[key.strip()] = value.strip()
    return fields
