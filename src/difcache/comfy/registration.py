"""Node definitions written once, exposed as ComfyUI V1 classes and, when ``comfy_api`` is importable, V3 nodes.

A :class:`NodeDef` lists its inputs and outputs as :class:`Field`\\s and has a ``run(**inputs) -> tuple``.
:func:`v1_class` turns it into a legacy node (``INPUT_TYPES``, ``RETURN_TYPES``, ``FUNCTION``...);
:func:`v3_entrypoint` into ``io.ComfyNode`` subclasses behind a ``comfy_entrypoint`` (``comfy_api.latest``).
Nothing here imports ComfyUI unless V3 is asked for, so the pack imports without ComfyUI installed.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("difcache.comfy")

WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


@dataclass(frozen=True)
class Field:
    """One input or output: a socket (``MODEL``, ``IMAGE``, ``DIFCACHE_PIPE``) or a widget (``WIDGETS``)."""

    name: str
    type: str
    tooltip: str | None = None
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: tuple[str, ...] = ()
    multiline: bool = False
    optional: bool = False
    control_after_generate: bool = False

    def v1(self) -> tuple:
        extras = {
            "default": self.default,
            "min": self.min,
            "max": self.max,
            "step": self.step,
            "tooltip": self.tooltip,
            "multiline": self.multiline or None,
            "control_after_generate": self.control_after_generate or None,
        }
        extras = {k: v for k, v in extras.items() if v is not None}
        kind: Any = list(self.options) if self.type == "COMBO" else self.type
        return (kind, extras) if extras else (kind,)

    def v3_input(self, io: Any) -> Any:
        common = {"tooltip": self.tooltip, "optional": self.optional}
        if self.type in ("INT", "FLOAT"):
            cls = io.Int if self.type == "INT" else io.Float
            numeric = {"default": self.default, "min": self.min, "max": self.max, "step": self.step}
            if self.control_after_generate:
                numeric["control_after_generate"] = True
            return cls.Input(self.name, **common, **numeric)
        if self.type == "STRING":
            return io.String.Input(self.name, **common, default=self.default, multiline=self.multiline)
        if self.type == "BOOLEAN":
            return io.Boolean.Input(self.name, **common, default=self.default)
        if self.type == "COMBO":
            return io.Combo.Input(self.name, options=list(self.options), default=self.default, **common)
        return socket_type(io, self.type).Input(self.name, **common)

    def v3_output(self, io: Any) -> Any:
        return socket_type(io, self.type).Output(display_name=self.name, tooltip=self.tooltip)


@dataclass(frozen=True)
class NodeDef:
    node_id: str
    display_name: str
    category: str
    description: str
    inputs: tuple[Field, ...]
    outputs: tuple[Field, ...]
    run: Callable[..., tuple]


_CUSTOM_TYPES: dict[str, tuple[Any, Any]] = {}  # name -> (the io module it was made with, the type)


def socket_type(io: Any, name: str) -> Any:
    """``io.Model`` / ``io.Image`` for ComfyUI's types, one ``io.Custom(name)`` per custom type."""
    builtin = {"MODEL": "Model", "IMAGE": "Image", "LATENT": "Latent"}.get(name)
    if builtin is not None:
        return getattr(io, builtin)
    cached = _CUSTOM_TYPES.get(name)
    if cached is None or cached[0] is not io:
        cached = _CUSTOM_TYPES[name] = (io, io.Custom(name))
    return cached[1]


def v1_class(node: NodeDef) -> type:
    """A legacy (V1) node class for ``node``."""

    def input_types(cls: type) -> dict:
        required = {f.name: f.v1() for f in node.inputs if not f.optional}
        optional = {f.name: f.v1() for f in node.inputs if f.optional}
        return {"required": required, **({"optional": optional} if optional else {})}

    def execute(self: Any, **inputs: Any) -> tuple:
        return node.run(**inputs)

    return type(
        node.node_id,
        (),
        {
            "__doc__": node.description,
            "INPUT_TYPES": classmethod(input_types),
            "RETURN_TYPES": tuple(o.type for o in node.outputs),
            "RETURN_NAMES": tuple(o.name for o in node.outputs),
            "OUTPUT_TOOLTIPS": tuple(o.tooltip or "" for o in node.outputs),
            "FUNCTION": "execute",
            "CATEGORY": node.category,
            "DESCRIPTION": node.description,
            "execute": execute,
        },
    )


def v1_mappings(nodes: tuple[NodeDef, ...]) -> tuple[dict[str, type], dict[str, str]]:
    """``NODE_CLASS_MAPPINGS`` and ``NODE_DISPLAY_NAME_MAPPINGS``."""
    return {n.node_id: v1_class(n) for n in nodes}, {n.node_id: n.display_name for n in nodes}


def v3_class(node: NodeDef, io: Any) -> type:
    """A V3 ``io.ComfyNode`` subclass for ``node``."""

    def define_schema(cls: type) -> Any:
        return io.Schema(
            node_id=node.node_id,
            display_name=node.display_name,
            category=node.category,
            description=node.description,
            inputs=[f.v3_input(io) for f in node.inputs],
            outputs=[o.v3_output(io) for o in node.outputs],
        )

    def execute(cls: type, **inputs: Any) -> Any:
        return io.NodeOutput(*node.run(**inputs))

    return type(
        node.node_id,
        (io.ComfyNode,),
        {"__doc__": node.description, "define_schema": classmethod(define_schema), "execute": classmethod(execute)},
    )


def v3_entrypoint(nodes: tuple[NodeDef, ...], module: str = "comfy_api.latest") -> Callable[[], Any] | None:
    """A ``comfy_entrypoint`` for ComfyUI's V3 loader, or ``None`` when ``comfy_api`` cannot be imported or lacks
    what the nodes use (the V1 mappings then serve)."""
    try:
        api = importlib.import_module(module)
        io, extension_base = api.io, api.ComfyExtension
        classes = [v3_class(n, io) for n in nodes]
        for cls in classes:
            cls.define_schema()
    except Exception as err:  # noqa: BLE001  (no or an incompatible comfy_api: V1 only)
        if not isinstance(err, ModuleNotFoundError):
            log.warning("difcache: comfy_api V3 nodes unavailable (%s: %s); using V1 nodes.", type(err).__name__, err)
        return None

    class DifcacheExtension(extension_base):
        async def get_node_list(self) -> list[type]:
            return list(classes)

    def comfy_entrypoint() -> Any:
        return DifcacheExtension()

    return comfy_entrypoint
