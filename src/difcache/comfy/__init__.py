"""difcache's ComfyUI nodes (see ``comfyui/README.md`` for installation and what was verified where).

Importing this module needs no ComfyUI: it defines ``NODE_CLASS_MAPPINGS`` and ``NODE_DISPLAY_NAME_MAPPINGS``
(V1 nodes) always, and ``comfy_entrypoint`` (V3 nodes) when ``comfy_api.latest`` can be imported. The
custom-node entry point (``comfyui/__init__.py``) exports one of the two, since ComfyUI's loader ignores
``comfy_entrypoint`` when it finds V1 mappings.

What lives here: the nodes (:mod:`.nodes`) and their V1/V3 registration (:mod:`.registration`); adapters for
ComfyUI's own model classes (:mod:`.adapters`); the residual block scope its FLUX needs (:mod:`.scope`); step
tracking from ComfyUI's sigma schedule (:mod:`.run`); model patching through keyed wrappers (:mod:`.patching`);
sparse attention on ComfyUI's Wan through its attention override (:mod:`.sparse`); the ``DIFCACHE_PIPE`` nodes
for diffusers pipelines (:mod:`.pipeline`). Caching and sparse attention themselves are difcache's engine and
``difcache.attention``.
"""

from difcache.comfy.adapters import ComfyAdapter, comfy_layout, register_comfy_adapter, registered_comfy_adapters
from difcache.comfy.nodes import NODES
from difcache.comfy.patching import CacheSpec, comfy_methods, patch_cache, patch_sparse_attention
from difcache.comfy.pipeline import DifcachePipe
from difcache.comfy.registration import v1_mappings, v3_entrypoint

NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = v1_mappings(NODES)

_entrypoint = v3_entrypoint(NODES)
if _entrypoint is not None:
    comfy_entrypoint = _entrypoint

__all__ = [
    "NODES",
    "NODE_CLASS_MAPPINGS",
    "NODE_DISPLAY_NAME_MAPPINGS",
    "CacheSpec",
    "ComfyAdapter",
    "DifcachePipe",
    "comfy_layout",
    "comfy_methods",
    "patch_cache",
    "patch_sparse_attention",
    "register_comfy_adapter",
    "registered_comfy_adapters",
    "v1_mappings",
    "v3_entrypoint",
]
