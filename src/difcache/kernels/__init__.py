"""Attention kernels and their torch references, with the backend chosen by device.

* ``block_sparse_attention*`` - attend to listed key blocks (:mod:`.block_sparse_attention`);
* ``pyramid_sparse_attention*`` - listed key blocks at pooled levels of detail, PSA (:mod:`.pyramid_sparse_attention`);
* ``block_sparse_attention_flex`` - the same through compiled FlexAttention (:mod:`.flex`);
* ``range_sparse_attention*`` - query and key *ranges* of any length (variable blocks: Sparse VideoGen 2's
  clusters, tile-aligned blocks), the C++ CPU kernel and its dense reference.

Block layouts may be *padded* (``block_len``: each block's real tokens first, padding after; see
:func:`difcache.kernels._common.block_lengths`), which every block-sparse and PSA backend honours.

Backends: ``"triton"`` (CUDA; CPU only under ``TRITON_INTERPRET=1``), ``"cpp"`` (CPU block-sparse: a C++
kernel reading K/V blocks in place, built once on first use), ``"torch"`` (gathered blocks, any device; on CPU
through ATen's fused flash kernel), ``"flex"`` (compiled FlexAttention, block-sparse only), ``"reference"``
(dense fp32, O(N^2) memory), and ``"auto"``: Triton on CUDA when triton imports; on CPU the C++ kernel for
block-sparse when it builds; the torch path otherwise (PSA on CPU, or no compiler). Measured at N = 8192,
density 0.156 (``scripts/bench_sparse.py kernel``): cpp > torch > compiled flex (flex also compiles 5-25 s per
shape); numbers in ``BENCHMARKS.md``.
"""

from __future__ import annotations

import torch

import difcache.kernels.cpu_extension as cpu_extension
from difcache.errors import DifcacheError
from difcache.kernels._common import interpreting, triton_available
from difcache.kernels.block_sparse_attention import (
    attention_with_lse,
    block_sparse_attention,
    block_sparse_attention_cpp,
    block_sparse_attention_reference,
    block_sparse_attention_torch,
    range_sparse_attention_cpp,
    range_sparse_attention_reference,
)
from difcache.kernels.flex import block_sparse_attention_flex, flex_available
from difcache.kernels.pyramid_sparse_attention import (
    pyramid_sparse_attention,
    pyramid_sparse_attention_reference,
    pyramid_sparse_attention_torch,
)

BACKENDS = ("auto", "triton", "cpp", "torch", "flex", "reference")

__all__ = [
    "BACKENDS",
    "attention_with_lse",
    "block_sparse_attention",
    "block_sparse_attention_cpp",
    "block_sparse_attention_flex",
    "block_sparse_attention_reference",
    "block_sparse_attention_torch",
    "interpreting",
    "pyramid_sparse_attention",
    "pyramid_sparse_attention_reference",
    "pyramid_sparse_attention_torch",
    "range_sparse_attention_cpp",
    "range_sparse_attention_reference",
    "resolve_backend",
    "sparse_attention",
    "triton_available",
]


def resolve_backend(backend: str, device: torch.device, pyramid: bool, n_tokens: int) -> str:
    """The concrete backend for ``backend`` (maybe ``"auto"``) on ``device``; raises if it cannot run there."""
    if backend not in BACKENDS:
        raise DifcacheError(f"Unknown attention backend {backend!r}; choose one of {BACKENDS}.")
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        if device.type == "cpu" and not pyramid and cpu_extension.load() is not None:
            return "cpp"
        return "torch"
    if backend == "cpp" and (device.type != "cpu" or pyramid):
        raise DifcacheError("backend='cpp' is the CPU block-sparse kernel (not PSA); use backend='auto'.")
    if backend == "cpp" and cpu_extension.load() is None:
        raise DifcacheError("backend='cpp': the C++ CPU kernel could not be built (see the warning); use 'torch'.")
    if backend == "flex" and not flex_available():
        raise DifcacheError("backend='flex' needs torch.nn.attention.flex_attention (torch >= 2.5); use 'auto'.")
    if backend == "flex" and pyramid:
        raise DifcacheError(
            "FlexAttention cannot read pooled PSA levels; use backend='torch' or 'triton' for psa."
        )
    if backend == "triton" and not (device.type == "cuda" or (device.type == "cpu" and interpreting())):
        raise DifcacheError(
            "backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 set before import, for tests); "
            "use backend='auto'."
        )
    return backend


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_idx: torch.Tensor,
    kv_cnt: torch.Tensor,
    kv_lvl: torch.Tensor | None,
    block_size: int,
    backend: str,
    scale: float | None = None,
    block_len: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatch to one concrete backend (not ``"auto"``); PSA when ``kv_lvl`` is given.

    ``block_len [M]`` describes a padded layout (:func:`difcache.kernels._common.block_lengths`). Returns
    ``(out, lse)``; compiled flex on CPU cannot return ``lse`` and gives ``None``.
    """
    if kv_lvl is not None:
        fn = {
            "triton": pyramid_sparse_attention,
            "torch": pyramid_sparse_attention_torch,
            "reference": pyramid_sparse_attention_reference,
        }[backend]
        return fn(q, k, v, kv_idx, kv_cnt, kv_lvl, block_size, scale, block_len)
    if backend == "flex":
        return block_sparse_attention_flex(q, k, v, kv_idx, kv_cnt, block_size, scale, block_len=block_len)
    fn = {
        "triton": block_sparse_attention,
        "cpp": block_sparse_attention_cpp,
        "torch": block_sparse_attention_torch,
        "reference": block_sparse_attention_reference,
    }[backend]
    return fn(q, k, v, kv_idx, kv_cnt, block_size, scale, block_len)
