"""ComfyUI custom-node entry point for difcache: link or copy this folder to ``ComfyUI/custom_nodes/comfyui-difcache``.

The nodes live in the ``difcache`` package (``difcache.comfy``); this file only hands them to ComfyUI. Install
difcache into ComfyUI's Python (``pip install -e /path/to/difcache``); if it is not installed, the ``src``
folder next to this one (the real path, so a symlinked folder works) is put on ``sys.path``.

Name the folder anything but ``difcache``. Loaders that register a custom-node folder under its own name, or put
``custom_nodes`` on ``sys.path``, would otherwise make this file *be* ``difcache`` and shadow the real package
(0 nodes loaded). As a guard, when this module finds itself registered as ``difcache`` or importable as it, it
steps aside for the import of the real package and leaves that one in ``sys.modules``.

ComfyUI's loader takes ``NODE_CLASS_MAPPINGS`` (V1) when a module defines it and only otherwise looks for
``comfy_entrypoint`` (V3), so exactly one is exported: V3 when ``comfy_api`` provides what the nodes need, V1
otherwise or when the environment variable ``DIFCACHE_COMFY_V1=1`` is set.
"""

import importlib
import os
import sys

_HERE = os.path.dirname(os.path.realpath(__file__))


def _is_this_pack(module):
    path = getattr(module, "__file__", None)
    return path is not None and os.path.dirname(os.path.realpath(path)) == _HERE


def _import_difcache_comfy():
    """``difcache.comfy`` from the real package, never from this folder (see the module docstring)."""
    if _is_this_pack(sys.modules.get("difcache")):
        del sys.modules["difcache"]  # registered under the package's name: make room for the real one
    parents = {os.path.dirname(_HERE), os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))}
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) not in parents]  # custom_nodes
    try:
        try:
            pack = importlib.import_module("difcache.comfy")
        except ImportError:
            src = os.path.join(os.path.dirname(_HERE), "src")
            if not os.path.isdir(os.path.join(src, "difcache")):
                raise
            saved.insert(0, src)
            sys.path.insert(0, src)
            pack = importlib.import_module("difcache.comfy")
    finally:
        sys.path[:] = saved
    return pack


_pack = _import_difcache_comfy()

_v3 = None if os.environ.get("DIFCACHE_COMFY_V1") == "1" else _pack.v3_entrypoint(_pack.NODES)
if _v3 is not None:
    comfy_entrypoint = _v3
else:
    NODE_CLASS_MAPPINGS = _pack.NODE_CLASS_MAPPINGS
    NODE_DISPLAY_NAME_MAPPINGS = _pack.NODE_DISPLAY_NAME_MAPPINGS
