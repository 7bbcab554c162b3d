"""Block-sparse attention forward: each query block attends only to its listed key blocks.

The pattern format (one for every backend): for every batch ``b``, head ``h`` and query block ``i``,
``kv_idx[b, h, i, :kv_cnt[b, h, i]]`` are the key blocks it attends to (any order, no repeats). Blocks are
``block_size`` consecutive tokens; the last may be partial. Shapes use fixed letters: ``q [B, H, N, D]``,
``k``/``v [B, Hk, N, D]`` (``H % Hk == 0``, GQA), ``kv_idx [B, H, M, K]`` int, ``kv_cnt [B, H, M]`` int,
``M = ceil(N / block_size)``. Every function returns ``(out [B, H, N, D], lse [B, H, N] fp32)``; ``lse`` is the
natural-log normaliser, ``-inf`` for rows with no key block (their output is 0), so partial results can be
merged exactly (e.g. with dense text columns).

Three implementations, checked against each other in ``tests/test_kernels_block_sparse.py``:

* :func:`block_sparse_attention` - Triton FlashAttention-style forward (online softmax over the listed
  blocks; Dao et al., FlashAttention, arXiv:2205.14135), compiled on CUDA, interpreted on CPU tensors.
* :func:`block_sparse_attention_torch` - gathers the listed key blocks and runs batched matmuls: the CPU
  execution path, with cost proportional to the kept blocks.
* :func:`block_sparse_attention_reference` - dense fp32 masked softmax: plain and obviously right, O(N^2).
"""

from __future__ import annotations

import math

import torch

from difcache.kernels._common import (
    check_launchable,
    check_lists,
    check_qkv,
    expand_kv_heads,
    jit,
    pad_blocks,
    tl,
    triton,
)

_LOG2E = 1.4426950408889634


@jit
def _bsa_fwd(
    Q, K, V, O, LSE, IDX, CNT,  # noqa: N803 - Triton kernels name pointers in capitals
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_ib, stride_ih, stride_im,
    stride_cb, stride_ch,
    H, GROUP, N, qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    """One program: ``BLOCK_M`` query rows of one (batch, head), online softmax over the listed key blocks.

    Head-dim columns are contiguous (stride 1). ``qk_scale`` includes log2(e) so the softmax uses exp2.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    row = (pid_m * BLOCK_M) // BLOCK
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < N, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    cnt = tl.load(CNT + b * stride_cb + h * stride_ch + row)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    for t in range(0, cnt):
        j = tl.load(IDX + b * stride_ib + h * stride_ih + row * stride_im + t)
        for sub in tl.static_range(BLOCK // BLOCK_N):
            start = j * BLOCK + sub * BLOCK_N
            if start < N:  # sub-tiles past the end of a partial last block hold no keys
                offs_n = start + tl.arange(0, BLOCK_N)
                valid = offs_n < N
                k = tl.load(
                    k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=valid[None, :], other=0.0
                )
                if UPCAST:
                    k = k.to(tl.float32)
                if IEEE:  # noqa: SIM108 - a constexpr branch, kept as statements for triton
                    s = tl.dot(q, k, input_precision="ieee")
                else:
                    s = tl.dot(q, k)
                s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                p = tl.math.exp2(s - m_new[:, None])
                alpha = tl.math.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(
                    v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None], other=0.0
                )
                if UPCAST:
                    v = v.to(tl.float32)
                if IEEE:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i / 1.4426950408889634 + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < N)
    tl.store(LSE + pid_bh * N + offs_m, lse, mask=offs_m < N)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_idx: torch.Tensor,
    kv_cnt: torch.Tensor,
    block_size: int = 128,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton block-sparse attention; CUDA tensors run compiled, CPU tensors only under ``TRITON_INTERPRET=1``.

    Head dim must be a power of two >= 16 (64 and 128 are the tuned cases). fp32 uses IEEE dots (no TF32);
    bf16 operands are upcast to fp32 in the interpreter, whose bf16 dot is wrong (triton#11584).
    """
    interpret = check_launchable(q)
    check_qkv(q, k, v, block_size)
    check_lists(kv_idx, kv_cnt, q, k, block_size)
    b, h, n, d = q.shape
    if d < 16 or d & (d - 1):
        raise ValueError(
            f"The Triton kernel needs a power-of-two head dim >= 16, got {d}; use backend='torch'."
        )
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    kv_idx = kv_idx.to(torch.int32).contiguous()
    kv_cnt = kv_cnt.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    lse = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
    block_m = min(block_size, 64) if not interpret else block_size
    block_n = min(block_size, 64) if not interpret else block_size
    scale = d**-0.5 if scale is None else scale
    grid = (triton.cdiv(n, block_m), b * h)
    extra = {} if interpret else {"num_warps": 4 if d <= 64 else 8, "num_stages": 2}
    _bsa_fwd[grid](
        q, k, v, out, lse, kv_idx, kv_cnt,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        kv_idx.stride(0), kv_idx.stride(1), kv_idx.stride(2),
        kv_cnt.stride(0), kv_cnt.stride(1),
        h, h // k.shape[1], n, scale * _LOG2E,
        HEAD_DIM=d, BLOCK=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        UPCAST=q.dtype == torch.bfloat16 and interpret, IEEE=q.dtype == torch.float32, **extra,
    )  # fmt: skip
    return out, lse


def gather_blocks(x: torch.Tensor, idx: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x [B, H, N, D]``, ``idx [B, H, M, K]`` -> ``[B, H, M, K * block_size, D]``: the listed blocks of each row."""
    blocks = pad_blocks(x, block_size)  # [B, H, Mk, S, D]
    bsz, heads = idx.shape[:2]
    bi = torch.arange(bsz, device=x.device)[:, None, None, None]
    hi = torch.arange(heads, device=x.device)[None, :, None, None]
    return blocks[bi, hi, idx.long()].flatten(3, 4)


def masked_softmax_av(
    s: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(s + bias) @ v`` over the last axis of ``s``, masking ``~valid``; returns ``(out, lse)``.

    ``s`` is overwritten (it is a temporary). Rows with nothing valid give output 0 and lse ``-inf``.
    """
    if bias is not None:
        s += bias
    if valid is not None:
        s.masked_fill_(~valid, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = s.sub_(m).exp_()
    denom = p.sum(dim=-1, keepdim=True)
    out = (p.to(v.dtype) @ v) / denom.clamp_min(torch.finfo(denom.dtype).tiny).to(v.dtype)
    lse = (m + denom.log()).squeeze(-1)
    return out, lse


def block_sparse_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_idx: torch.Tensor,
    kv_cnt: torch.Tensor,
    block_size: int = 128,
    scale: float | None = None,
    heads_per_chunk: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention by gathering each row's key blocks: exact, cost proportional to kept blocks.

    Each query block with its gathered key blocks is one small dense attention problem. On CPU these run
    batched through ATen's fused flash-attention kernel (``_scaled_dot_product_flash_attention_for_cpu``,
    which also returns the LSE), with an additive mask only where a row lists fewer blocks than the widest
    row or the last block is partial: no ``[.., S, K*S]`` score tensor is ever materialised. Elsewhere (CUDA
    without Triton) scores, masked softmax and ``P @ V`` are computed explicitly.

    fp16/bf16 inputs are computed in fp32 on CPU (CPU half matmuls are slow and inexact) and in their own
    dtype with fp32 softmax statistics elsewhere. Heads are processed ``heads_per_chunk`` at a time to bound
    the gathered memory (``~ density * N^2 * D / block_size`` per head).
    """
    check_qkv(q, k, v, block_size)
    check_lists(kv_idx, kv_cnt, q, k, block_size)
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    compute = torch.float32 if q.device.type == "cpu" else q.dtype
    k, v = expand_kv_heads(k, h), expand_kv_heads(v, h)
    width = kv_idx.shape[3]
    out = torch.empty_like(q)
    lse = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
    slot = torch.arange(width, device=q.device)
    token = torch.arange(block_size, device=q.device)
    for h0 in range(0, h, heads_per_chunk):
        hs = slice(h0, min(h, h0 + heads_per_chunk))
        idx = kv_idx[:, hs].long()
        qb = pad_blocks(q[:, hs], block_size).to(compute)  # [B, h, M, S, D]
        kg = gather_blocks(k[:, hs].to(compute), idx, block_size)  # [B, h, M, K*S, D]
        vg = gather_blocks(v[:, hs].to(compute), idx, block_size)
        listed = slot < kv_cnt[:, hs, :, None]  # [B, h, M, K]
        in_seq = idx[..., None] * block_size + token < n  # [B, h, M, K, S]
        valid = (listed[..., None] & in_seq).flatten(3, 4)[:, :, :, None, :]  # [B, h, M, 1, K*S]
        if q.device.type == "cpu":
            bias = None if bool(valid.all()) else torch.zeros(valid.shape).masked_fill_(~valid, float("-inf"))
            o, l_ = fused_block_attention(qb, kg, vg, scale, bias)
        else:
            s = (qb * scale) @ kg.transpose(-1, -2)
            o, l_ = masked_softmax_av(s.float() if compute != torch.float32 else s, vg, valid)
        out[:, hs] = o.flatten(2, 3)[:, :, :n].to(q.dtype)
        lse[:, hs] = l_.flatten(2, 3)[:, :, :n]
    return out, lse


def fused_block_attention(
    qb: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor, scale: float, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 CPU: ``qb [B, h, M, S, D]`` against ``kg``/``vg [B, h, M, L, D]`` with an additive key ``bias
    [B, h, M, 1, L]`` (``-inf`` masks a key; ``None``: nothing masked); returns ``(out [B, h, M, S, D],
    lse [B, h, M, S])`` through ATen's fused CPU flash attention, one problem per query block, without
    materialising scores. Rows with no valid key give 0 and ``-inf``, as every backend does."""
    shape = qb.shape
    rows = shape[0] * shape[1] * shape[2]
    q3, k3, v3 = (x.reshape(rows, 1, x.shape[3], x.shape[4]) for x in (qb, kg, vg))
    mask = None if bias is None else bias.reshape(rows, 1, 1, -1).to(q3.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q3, k3, v3, attn_mask=mask, scale=scale)
    lse = lse.reshape(shape[:4])
    if bias is not None:
        empty = torch.isneginf(bias).all(dim=-1)  # [B, h, M, 1]; ATen returns out 0 but lse 0 for these rows
        if bool(empty.any()):
            lse = lse.masked_fill(empty, float("-inf"))
    return out.reshape(shape), lse


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_idx: torch.Tensor,
    kv_cnt: torch.Tensor,
    block_size: int = 128,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense fp32 reference: the token mask of the listed blocks, then a masked softmax. O(N^2) memory."""
    check_qkv(q, k, v, block_size)
    check_lists(kv_idx, kv_cnt, q, k, block_size)
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    m = math.ceil(n / block_size)
    listed = torch.arange(kv_idx.shape[-1], device=q.device) < kv_cnt[..., None]  # [B, H, M, K]
    block_mask = torch.zeros((b, h, m, m + 1), dtype=torch.bool, device=q.device)
    block_mask.scatter_(3, torch.where(listed, kv_idx.long(), m), True)  # unlisted slots go to column m
    token_mask = block_mask[..., :m].repeat_interleave(block_size, 2).repeat_interleave(block_size, 3)
    token_mask = token_mask[:, :, :n, :n]
    kf, vf = expand_kv_heads(k, h).float(), expand_kv_heads(v, h).float()
    s = (q.float() @ kf.transpose(-1, -2)) * scale
    out, lse = masked_softmax_av(s, vf, token_mask)
    return out.to(q.dtype), lse
