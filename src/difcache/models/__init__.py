"""Bundled tiny models trained by difcache on procedurally generated shapes (offline, weights in the package).

pipe = difcache.models.load("dit")        # class-conditional pixel DiT, batched CFG
images = pipe([0, 1, 2, 3], num_inference_steps=50).images

and tiny random-weight models of the real diffusers classes, for tests and for trying an API in seconds:

pipe = difcache.models.tiny("flux")        # a FluxPipeline; tiny_call_kwargs("flux") gives offline inputs
"""

from difcache.models.bundled import NAMES, ShapeClassifier, available, build, info, load
from difcache.models.shapes import CLASSES, make_images
from difcache.models.tiny import FAMILIES, tiny, tiny_call_kwargs, tiny_denoiser

__all__ = [
    "CLASSES",
    "FAMILIES",
    "NAMES",
    "ShapeClassifier",
    "available",
    "build",
    "info",
    "load",
    "make_images",
    "tiny",
    "tiny_call_kwargs",
    "tiny_denoiser",
]
