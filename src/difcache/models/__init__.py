"""Bundled tiny models trained by difcache on procedurally generated shapes (offline, weights in the package).

pipe = difcache.models.load("dit")        # class-conditional pixel DiT, batched CFG
images = pipe([0, 1, 2, 3], num_inference_steps=50).images
"""

from difcache.models.bundled import NAMES, ShapeClassifier, available, build, info, load
from difcache.models.shapes import CLASSES, make_images

__all__ = ["CLASSES", "NAMES", "ShapeClassifier", "available", "build", "info", "load", "make_images"]
