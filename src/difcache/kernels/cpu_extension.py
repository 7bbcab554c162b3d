"""The C++ CPU kernel for block-sparse attention (``csrc/block_sparse_cpu.cpp``), built on first use.

It runs the FlashAttention update per (batch, head, query range) over the listed key ranges (fixed blocks, padded
blocks or variable-size clusters), reading K and V in place through the BLAS ``sgemm`` that libtorch_cpu exports:
no gather, unlike the torch path. Built with
``torch.utils.cpp_extension.load`` (a C++ compiler and ninja; ~1 minute once, then cached under
``~/.cache/torch_extensions``). Where it cannot be built, or with ``DIFCACHE_CPU_EXTENSION=0``, ``load()``
returns ``None`` and the torch path runs instead (a warning says why, once).
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).parent / "csrc" / "block_sparse_cpu.cpp"


@functools.cache
def load() -> Any | None:
    """The compiled module (``range_sparse_forward``), or ``None`` when it is disabled or cannot be built."""
    if os.environ.get("DIFCACHE_CPU_EXTENSION", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load as build

        digest = hashlib.sha1(SOURCE.read_bytes()).hexdigest()[:10]
        return build(
            # the source's hash in the name: checkouts with another version of the kernel (a second worktree, an
            # older install) build their own module instead of replacing this one under a shared cache directory
            name=f"difcache_sparse_cpu_{digest}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],  # see the .cpp on fast-math
            extra_ldflags=["-fopenmp"],
        )
    except Exception as err:  # no compiler, no ninja, a failing build: the torch path still works
        warnings.warn(
            f"difcache: could not build the C++ block-sparse CPU kernel ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}); using the torch path. Set DIFCACHE_CPU_EXTENSION=0 to skip trying.",
            stacklevel=2,
        )
        return None
