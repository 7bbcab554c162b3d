"""Quality metrics and the evaluation runs behind ``scripts/eval_fid.py`` and ``scripts/eval_vbench.py``.

* :mod:`.metrics` (PSNR, SSIM, FID, flicker), :mod:`.features` (FID feature extractors), :mod:`.clip`;
* :mod:`.samplers`, :mod:`.generate`, :mod:`.quality`, :mod:`.report`, :mod:`.runs`, :mod:`.vbench`: seeded
  sample generation across processes, scoring, reports.

The benchmark command (timing, alternatives) lives in :mod:`difcache.bench`.
"""
