"""Shared plumbing of the attention kernels: the optional Triton import, input checks, block padding.

Triton is optional: on a machine without it (or without a GPU) everything here still imports, and the torch
paths run. Kernels launch compiled on CUDA tensors, or on CPU tensors in Triton's interpreter when
``TRITON_INTERPRET=1`` was set before triton was imported (the interpreter replaces triton's standard library
at import time, so it cannot be switched on later).
"""

from __future__ import annotations

import math

import torch

from difcache.errors import DifcacheError

try:  # guarded: a broken or missing triton must never break `import difcache`
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_available() -> bool:
    """True when triton imported (kernels launch compiled on CUDA, interpreted on CPU)."""
    return triton is not None


def jit(fn):
    """``triton.jit`` when triton imported, else the plain function (never launched then)."""
    return fn if triton is None else triton.jit(fn)


def _probe(x):  # decorated like the kernels, to see which mode they got
    pass


_PROBE = jit(_probe)


def interpreting() -> bool:
    """True when the kernels run in triton's interpreter: ``TRITON_INTERPRET=1`` was set before triton (and
    difcache's kernels) were imported, so both triton's standard library and the kernels are interpreted."""
    if triton is None:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover
        return False
    return isinstance(_PROBE, InterpretedFunction) and isinstance(tl.zeros, InterpretedFunction)


def check_launchable(q: torch.Tensor) -> bool:
    """Whether a Triton launch on ``q``'s device can work; returns ``interpret``. Raises with the fix otherwise."""
    if triton is None:
        raise RuntimeError("Triton is not installed; use the torch backend (backend='torch').")
    if interpreting():
        if q.device.type != "cpu":
            raise RuntimeError(
                "TRITON_INTERPRET=1 runs kernels on CPU tensors only; move q, k, v to the CPU."
            )
        return True
    if q.device.type != "cuda":
        raise RuntimeError(
            "Triton kernels need CUDA tensors, or the Triton interpreter for CPU tensors (set TRITON_INTERPRET=1 "
            "before torch is imported). On CPU use backend='torch' or backend='flex'."
        )
    return False


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> None:
    """Shapes ``q [B, H, N, D]``, ``k``/``v [B, Hk, N, D]`` with ``H % Hk == 0``, one dtype and device."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise DifcacheError(
            f"q, k, v must be [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}. "
            "Transpose from [B, N, H, D] with .transpose(1, 2)."
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise DifcacheError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree: self-attention needs equal "
            "batch, sequence length and head dim. Pass tensors of one attention call."
        )
    if q.shape[1] % k.shape[1]:
        raise DifcacheError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key heads (GQA).")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise DifcacheError(f"q, k, v must share one dtype of {DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}.")
    if block_size < 16 or block_size & (block_size - 1):
        raise DifcacheError(f"`block_size` must be a power of two >= 16, got {block_size}.")


def check_lists(
    kv_idx: torch.Tensor, kv_cnt: torch.Tensor, q: torch.Tensor, k: torch.Tensor, block_size: int
):
    """``kv_idx [B, H, M, K]`` and ``kv_cnt [B, H, M]`` match ``q`` (``M = ceil(N / block_size)``)."""
    b, h, n, _ = q.shape
    m = math.ceil(n / block_size)
    if kv_idx.dim() != 4 or tuple(kv_idx.shape[:3]) != (b, h, m) or tuple(kv_cnt.shape) != (b, h, m):
        raise DifcacheError(
            f"Block lists kv_idx {tuple(kv_idx.shape)} / kv_cnt {tuple(kv_cnt.shape)} do not fit q {tuple(q.shape)} "
            f"with block_size {block_size}: expected [{b}, {h}, {m}, K] and [{b}, {h}, {m}]. Build the pattern "
            "from the same q and block size."
        )


def check_levels(kv_lvl: torch.Tensor, kv_idx: torch.Tensor) -> None:
    """PSA's ``kv_lvl [B, H, M, K]`` gives a level for every slot of ``kv_idx``."""
    if kv_lvl.shape != kv_idx.shape:
        raise DifcacheError(f"kv_lvl {tuple(kv_lvl.shape)} must match kv_idx {tuple(kv_idx.shape)}.")


def check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_idx: torch.Tensor, kv_cnt: torch.Tensor, block_size: int,
    kv_lvl: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """What every backend checks first: :func:`check_qkv`, :func:`check_lists`, and with ``kv_lvl`` (PSA)
    :func:`check_levels`."""
    check_qkv(q, k, v, block_size)
    check_lists(kv_idx, kv_cnt, q, k, block_size)
    if kv_lvl is not None:
        check_levels(kv_lvl, kv_idx)


def check_triton_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_idx: torch.Tensor, kv_cnt: torch.Tensor, block_size: int,
    kv_lvl: torch.Tensor | None = None,
) -> bool:  # fmt: skip
    """:func:`check_launchable`, :func:`check_inputs`, and the head dim the Triton kernels take (a power of two
    >= 16); returns ``interpret``."""
    interpret = check_launchable(q)
    check_inputs(q, k, v, kv_idx, kv_cnt, block_size, kv_lvl)
    d = q.shape[-1]
    if d < 16 or d & (d - 1):
        raise ValueError(
            f"The Triton kernel needs a power-of-two head dim >= 16, got {d}; use backend='torch'."
        )
    return interpret


def block_lengths(
    n: int, block_size: int, block_len: torch.Tensor | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``[M]`` int64: the tokens each block holds. Without ``block_len`` every block is full but a partial last one.

    ``block_len`` describes a *padded* layout (:func:`difcache.attention.reorder.tile_layout`): block ``j`` holds
    its ``block_len[j]`` real tokens at the start of positions ``[j * block_size, (j + 1) * block_size)`` and padding
    after them, which no kernel reads as a key and whose query rows come out as 0 with LSE ``-inf``.
    """
    m = math.ceil(n / block_size)
    if block_len is None:
        starts = torch.arange(m, device=device) * block_size
        return (n - starts).clamp(max=block_size)
    if block_len.dim() != 1 or block_len.numel() != m:
        raise DifcacheError(
            f"block_len must be [M] = [{m}] (one length per block of {block_size} over {n} tokens), got "
            f"{tuple(block_len.shape)}; build it with difcache.attention.reorder.tile_layout."
        )
    return block_len.to(device=device, dtype=torch.int64)


def token_valid(n: int, block_size: int, block_len: torch.Tensor | None, device: torch.device | str = "cpu"):
    """``[n]`` bool: positions that hold a real token (all of them without ``block_len``)."""
    if block_len is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    pos = torch.arange(n, device=device)
    return pos % block_size < block_lengths(n, block_size, block_len, device)[pos // block_size]


def mask_padding_rows(
    out: torch.Tensor, lse: torch.Tensor, block_size: int, block_len: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padding rows of a padded layout get output 0 and LSE ``-inf`` (every backend agrees on them)."""
    if block_len is None:
        return out, lse
    pad = ~token_valid(out.shape[2], block_size, block_len, out.device)
    return out.masked_fill(pad[:, None], 0.0), lse.masked_fill(pad, float("-inf"))


def listed_slots(kv_cnt: torch.Tensor, width: int) -> torch.Tensor:
    """``[..., width]`` bool: which slots of each block list are in use (slot ``< kv_cnt``)."""
    return torch.arange(width, device=kv_cnt.device) < kv_cnt[..., None]


def pad_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[B, H, N, D]`` -> ``[B, H, M, block_size, D]``, zero-padding the last partial block."""
    n = x.shape[2]
    m = math.ceil(n / block_size)
    if m * block_size != n:
        x = torch.nn.functional.pad(x, (0, 0, 0, m * block_size - n))
    return x.unflatten(2, (m, block_size))


def expand_kv_heads(k: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat GQA key/value heads to ``heads`` (a view when they already match)."""
    return k if k.shape[1] == heads else k.repeat_interleave(heads // k.shape[1], dim=1)
