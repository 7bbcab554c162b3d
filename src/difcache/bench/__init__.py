"""``difcache bench``: difcache's methods and the caches users have today, timed and scored side by side.

* :mod:`.run`: the benchmark runner (quality, ideal / measured / oracle speedup, FID, memory) and its reports;
* :mod:`.alternatives`: diffusers' hooks, cache-dit and the DeepCache package, applied as their docs say;
* :mod:`.timing`: interleaved medians, paired ratios, per-unit times and the oracle speedup;
* :mod:`.memory`: the peak memory a call needs on top of the weights;
* :mod:`.targets`: what the benchmark runs on (bundled models, tiny family pipelines) and default sweeps.

Quality metrics and the FID / VBench evaluation runs live in :mod:`difcache.eval`.
"""
