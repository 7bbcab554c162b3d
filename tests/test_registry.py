"""The generic name -> spec registry (difcache.registry) that method registries are built on."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from difcache.errors import DifcacheError
from difcache.registry import Registry


@dataclass(frozen=True)
class Spec:
    fn: object
    description: str


def test_decorator_registers_and_returns_the_function_unchanged():
    registry: Registry[Spec] = Registry("widget")

    @registry.decorator("b", lambda fn: Spec(fn, "second"))
    def build_b():
        return 2

    registry.add("a", Spec(None, "first"))
    assert build_b() == 2 and registry.lookup("b").fn is build_b
    assert dict(registry) == {"b": registry["b"], "a": registry["a"]} and len(registry) == 2 and "a" in registry
    assert registry.descriptions() == {"a": "first", "b": "second"}  # in name order
    registry.add("a", Spec(None, "replaced"))
    assert registry.lookup("a").description == "replaced"


def test_unknown_name_lists_the_registered_ones():
    registry: Registry[Spec] = Registry("widget")
    registry.add("b", Spec(None, ""))
    registry.add("a", Spec(None, ""))
    with pytest.raises(DifcacheError, match=r"^Unknown widget 'c'; registered: a, b\.$"):
        registry.lookup("c")
    assert registry.get("c") is None
