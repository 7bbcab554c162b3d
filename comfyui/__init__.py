"""ComfyUI custom-node entry point for difcache: link or copy this folder to ``ComfyUI/custom_nodes/difcache``.

The nodes live in the ``difcache`` package (``difcache.comfy``); this file only hands them to ComfyUI. Install
difcache into ComfyUI's Python (``pip install -e /path/to/difcache``); if it is not installed, the ``src``
folder next to this one (the real path, so a symlinked folder works) is put on ``sys.path``.

ComfyUI's loader takes ``NODE_CLASS_MAPPINGS`` (V1) when a module defines it and only otherwise looks for
``comfy_entrypoint`` (V3), so exactly one is exported: V3 when ``comfy_api`` provides what the nodes need, V1
otherwise or when the environment variable ``DIFCACHE_COMFY_V1=1`` is set.
"""

import os
import sys

try:
    import difcache.comfy as _pack
except ImportError:
    _src = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "src")
    if not os.path.isdir(os.path.join(_src, "difcache")):
        raise
    sys.path.insert(0, _src)
    import difcache.comfy as _pack

_v3 = None if os.environ.get("DIFCACHE_COMFY_V1") == "1" else _pack.v3_entrypoint(_pack.NODES)
if _v3 is not None:
    comfy_entrypoint = _v3
else:
    NODE_CLASS_MAPPINGS = _pack.NODE_CLASS_MAPPINGS
    NODE_DISPLAY_NAME_MAPPINGS = _pack.NODE_DISPLAY_NAME_MAPPINGS
