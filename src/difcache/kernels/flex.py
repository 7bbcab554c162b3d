"""Block-sparse attention through PyTorch's FlexAttention (``torch.nn.attention.flex_attention``).

Two traps found on CPU (see /work/shared/research/sparse-attention.md, section 4a) and guarded here:

* **Index lists alone run dense.** ``BlockMask.from_kv_blocks(..., mask_mod=None)`` is silently computed as
  dense attention; the block lists are only honoured together with a ``mask_mod``. :func:`block_mask_of`
  therefore always attaches a ``mask_mod`` that looks the (query block, key block) pair up in a dense table.
* **Only-full-block masks do not compile on CPU** (C++ codegen: "'kv_indices' was not declared"). Every block
  is passed as a *partial* block (``kv_num_blocks``), never as a full one (``full_kv_num_blocks``).

Eager flex on CPU materialises the whole score matrix (slower than dense); only the compiled function is
sparse. Compilation costs 15-25 s per new shape; the compiled function is cached per process.
"""

from __future__ import annotations

import functools
import math

import torch

from difcache.kernels._common import (
    block_lengths,
    check_inputs,
    listed_slots,
    mask_padding_rows,
    token_valid,
)


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except Exception:  # pragma: no cover - very old torch
        return False
    return True


def block_mask_of(
    kv_idx: torch.Tensor,
    kv_cnt: torch.Tensor,
    n: int,
    block_size: int,
    extra_valid: torch.Tensor | None = None,
    block_len: torch.Tensor | None = None,
):
    """A FlexAttention ``BlockMask`` for the block lists, with a table-lookup ``mask_mod``.

    ``extra_valid [B, E]`` (bool) appends ``E`` keys after the ``n`` listed ones that every query row attends
    to where valid (dense text columns). ``block_len [M]``: a padded layout, whose padding keys are masked.
    Each row's first listed block is a partial block (``mask_mod``
    applied); its other whole blocks are full blocks, which skip the ``mask_mod`` and run about twice as fast
    on CPU. At least one partial block per row also avoids the only-full-blocks compile failure.
    """
    from torch.nn.attention.flex_attention import BlockMask

    b, h, m, width = kv_idx.shape
    device = kv_idx.device
    n_kv = n + (0 if extra_valid is None else extra_valid.shape[1])
    m_kv = math.ceil(n_kv / block_size)
    listed = listed_slots(kv_cnt, width)
    table = torch.zeros((b, h, m, m_kv + 1), dtype=torch.bool, device=device)
    table.scatter_(3, torch.where(listed, kv_idx.long(), m_kv), True)
    table = table[..., :m_kv]
    video = table[..., :m].contiguous()  # the lookup of listed key blocks
    whole = torch.zeros(m_kv, dtype=torch.bool, device=device)
    whole[: n // block_size] = True  # video blocks with no padding or text inside: may be full blocks
    real = token_valid(n, block_size, block_len, device)
    if block_len is not None:
        whole[:m] &= block_lengths(n, block_size, block_len, device) == block_size
    if extra_valid is not None:
        table[..., n // block_size :] = True  # every block holding text keys is visited (masked per token)
        text = extra_valid.to(torch.bool).contiguous()

        def lookup(b_i, h_i, q_i, kv_i):
            kv_video = torch.clamp(kv_i, max=n - 1)
            in_video = video[b_i, h_i, q_i // block_size, kv_video // block_size] & real[kv_video]
            in_text = text[b_i, torch.clamp(kv_i - n, min=0)]
            return torch.where(kv_i < n, in_video, in_text)

    else:

        def lookup(b_i, h_i, q_i, kv_i):
            return video[b_i, h_i, q_i // block_size, kv_i // block_size] & real[kv_i]

    ar = torch.arange(m_kv, device=device)
    first = torch.where(table, ar, m_kv).amin(dim=-1, keepdim=True)  # each row's first visited block
    partial = table & (~whole | (ar == first))
    full = table & ~partial
    return BlockMask.from_kv_blocks(
        *_as_lists(partial), *_as_lists(full), BLOCK_SIZE=block_size, mask_mod=lookup, seq_lengths=(n, n_kv)
    )


def _as_lists(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``[B, H, M, Mk]`` bool -> ``(counts, indices)`` with each row's blocks first, as flex wants."""
    mk = table.shape[-1]
    ar = torch.arange(mk, device=table.device)
    indices = torch.where(table, ar, mk + ar).argsort(dim=-1).to(torch.int32)
    return table.sum(dim=-1, dtype=torch.int32), indices


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def block_sparse_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_idx: torch.Tensor,
    kv_cnt: torch.Tensor,
    block_size: int = 128,
    scale: float | None = None,
    compiled: bool = True,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    extra_valid: torch.Tensor | None = None,
    block_len: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block-sparse attention with FlexAttention; ``compiled=False`` is eager (correct, but dense cost on CPU).

    Same format and results as :func:`difcache.kernels.block_sparse_attention.block_sparse_attention_reference`.
    ``extra_k``/``extra_v [B, Hk, E, D]`` are keys every row attends to (masked by ``extra_valid [B, E]``), in
    the same softmax. Returns ``(out, lse)``; compiled flex on CPU does not support ``lse`` and returns ``None``
    for it (rows with no key are then not guaranteed to be 0).
    """
    from torch.nn.attention.flex_attention import flex_attention

    check_inputs(q, k, v, kv_idx, kv_cnt, block_size)
    n = q.shape[2]
    if extra_k is not None:
        if extra_valid is None:
            extra_valid = torch.ones(extra_k.shape[0], extra_k.shape[2], dtype=torch.bool, device=q.device)
        k, v = torch.cat([k, extra_k], dim=2), torch.cat([v, extra_v], dim=2)
    mask = block_mask_of(kv_idx, kv_cnt, n, block_size, extra_valid, block_len)
    want_lse = not (compiled and q.device.type == "cpu")
    fn = _compiled_flex() if compiled else flex_attention
    gqa = q.shape[1] != k.shape[1]
    result = fn(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa, return_lse=want_lse)
    if not want_lse:
        return mask_padding_rows(result, torch.zeros(result.shape[:3]), block_size, block_len)[0], None
    out, lse = result
    lse = lse.float()
    empty = ~torch.isfinite(lse)
    out = out.masked_fill(empty[..., None], 0.0)
    return mask_padding_rows(out, lse.masked_fill(empty, float("-inf")), block_size, block_len)
