"""Scopes: what a method caches, and the hooks that implement it.

* :mod:`.module`: each unit on its own (pre-gate attention/FFN outputs, composite single-stream block units);
* :mod:`.block_range`: a range of blocks as one residual per stream (TeaCache, ERTACache, Δ-DiT, Lite);
* :mod:`.skip_branch`: a UNet's deep path below a skip branch (DeepCache);
* :mod:`.signals`: the indicators dynamic policies watch (TeaCache's modulated input, first-block residual).

Every hook reads its unit's :class:`~difcache.core.Slot` and nothing else of the engine.
"""
