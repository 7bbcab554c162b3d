"""Block-sparse attention forward: each query block attends only to its listed key blocks.

The pattern format (one for every backend): for every batch ``b``, head ``h`` and query block ``i``,
``kv_idx[b, h, i, :kv_cnt[b, h, i]]`` are the key blocks it attends to (any order, no repeats). Blocks are
``block_size`` consecutive tokens; the last may be partial. Shapes use fixed letters: ``q [B, H, N, D]``,
``k``/``v [B, Hk, N, D]`` (``H % Hk == 0``, GQA), ``kv_idx [B, H, M, K]`` int, ``kv_cnt [B, H, M]`` int,
``M = ceil(N / block_size)``. Every function returns ``(out [B, H, N, D], lse [B, H, N] fp32)``; ``lse`` is the
natural-log normaliser, ``-inf`` for rows with no key block (their output is 0), so partial results can be
merged exactly (e.g. with dense text columns).

Four implementations, checked against each other in ``tests/test_kernels_block_sparse.py``:

* :func:`block_sparse_attention` - Triton FlashAttention-style forward (online softmax over the listed
  blocks; Dao et al., FlashAttention, arXiv:2205.14135), compiled on CUDA, interpreted on CPU tensors.
* :func:`block_sparse_attention_torch` - gathers the listed key blocks into small cache-resident chunks and
  runs them through ATen's fused CPU attention: the CPU execution path, cost proportional to the kept blocks.
* :func:`block_sparse_attention_cpp` - a C++ CPU kernel (:mod:`difcache.kernels.cpu_extension`) that reads the
  listed K/V blocks in place: the fastest CPU path where a compiler is available.
* :func:`block_sparse_attention_reference` - dense fp32 masked softmax: plain and obviously right, O(N^2).
"""

from __future__ import annotations

import math

import torch

import difcache.kernels.cpu_extension as cpu_extension
from difcache.errors import DifcacheError
from difcache.kernels._common import (
    block_lengths,
    check_inputs,
    check_triton_inputs,
    expand_kv_heads,
    jit,
    listed_slots,
    mask_padding_rows,
    pad_blocks,
    tl,
    token_valid,
    triton,
)

_LOG2E = 1.4426950408889634


# The pieces both Triton kernels (this one and PSA's) are built from; `@triton.jit` helpers are inlined.
@jit
def load_tile(ptrs, mask, UPCAST: tl.constexpr):  # noqa: N803
    """``tl.load`` with 0 where masked; fp32 with ``UPCAST`` (bf16 in the interpreter, whose bf16 dot is wrong)."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@jit
def dot(a, b, IEEE: tl.constexpr):  # noqa: N803
    """``a @ b`` accumulated in fp32; exact fp32 products with ``IEEE`` (fp32 inputs: no TF32)."""
    if IEEE:  # noqa: SIM108 - a constexpr branch, kept as statements for triton
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@jit
def query_rows(
    Q, stride_qb, stride_qh, stride_qn, H, GROUP, N,  # noqa: N803
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """This program's ``BLOCK_M`` query rows (grid: query tiles x batch * heads): ``(b, h, hk, row, offs_m, offs_d,
    q [BLOCK_M, HEAD_DIM])``, with ``hk`` the key head of query head ``h`` and ``row`` the query block."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    row = (pid_m * BLOCK_M) // BLOCK
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                  offs_m[:, None] < N, UPCAST)  # fmt: skip
    return b, h, hk, row, offs_m, offs_d, q


@jit
def softmax_step(
    s, V, keys, valid, offs_d, stride_vn, m_i, l_i, acc,  # noqa: N803
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """One key tile of the online softmax (FlashAttention): scores ``s [BLOCK_M, T]`` in log2 units (``-inf`` where
    masked) of the keys at positions ``keys [T]`` (``valid [T]``) of the value rows at ``V``; returns the new
    ``(m_i, l_i, acc)``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = load_tile(V + keys[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None], UPCAST=UPCAST)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
    return m_new, l_i, acc


@jit
def store_rows(O, LSE, acc, m_i, l_i, b, h, offs_m, offs_d, stride_ob, stride_oh, stride_on, N):  # noqa: N803
    """Normalise and write the rows: ``out`` 0 and ``lse`` ``-inf`` where no key was attended."""
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i / 1.4426950408889634 + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < N)
    tl.store(LSE + tl.program_id(1) * N + offs_m, lse, mask=offs_m < N)


@jit
def _bsa_fwd(
    Q, K, V, O, LSE, IDX, CNT, LEN,  # noqa: N803 - Triton kernels name pointers in capitals
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
    HAS_LEN: tl.constexpr,
):  # fmt: skip
    """One program: ``BLOCK_M`` query rows of one (batch, head), online softmax over the listed key blocks.

    Head-dim columns are contiguous (stride 1). ``qk_scale`` includes log2(e) so the softmax uses exp2. With
    ``HAS_LEN`` (a padded layout) block ``j`` holds ``LEN[j]`` keys; the rest of it is padding, masked.
    """
    b, h, hk, row, offs_m, offs_d, q = query_rows(
        Q, stride_qb, stride_qh, stride_qn, H, GROUP, N, HEAD_DIM, BLOCK, BLOCK_M, UPCAST
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    cnt = tl.load(CNT + b * stride_cb + h * stride_ch + row)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    for t in range(0, cnt):
        j = tl.load(IDX + b * stride_ib + h * stride_ih + row * stride_im + t)
        if HAS_LEN:  # noqa: SIM108 - a constexpr branch, kept as statements for triton
            end = tl.minimum(j * BLOCK + tl.load(LEN + j), N)
        else:
            end = tl.minimum(j * BLOCK + BLOCK, N)
        for sub in tl.static_range(BLOCK // BLOCK_N):
            start = j * BLOCK + sub * BLOCK_N
            if start < end:  # sub-tiles past the end of a partial (or padded) block hold no keys
                offs_n = start + tl.arange(0, BLOCK_N)
                valid = offs_n < end
                k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None]
                k = load_tile(k_ptrs, mask=valid[None, :], UPCAST=UPCAST)
                s = dot(q, k, IEEE)
                s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
                m_i, l_i, acc = softmax_step(s, v_base, offs_n, valid, offs_d, stride_vn, m_i, l_i, acc, UPCAST, IEEE)
    store_rows(O, LSE, acc, m_i, l_i, b, h, offs_m, offs_d, stride_ob, stride_oh, stride_on, N)


def tile_rows(block_size: int, interpret: bool) -> int:
    """Query rows (and block-sparse key columns) per Triton tile: 64 compiled, a whole block interpreted."""
    return block_size if interpret else min(block_size, 64)


def launch(
    kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_idx: torch.Tensor, kv_cnt: torch.Tensor,
    extra: tuple[torch.Tensor, ...], block_size: int, scale: float | None, interpret: bool, **constants,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Allocate ``(out, lse)`` and launch ``kernel`` over (query tiles, batch * heads), for both Triton kernels.

    Their arguments: ``q, k, v, out, lse, kv_idx, kv_cnt``, the kernel's own ``extra`` tensors, the strides of
    ``q, k, v, out, kv_idx, kv_cnt``, ``H, GROUP, N, qk_scale``, then the tile constants (``constants`` adds the
    kernel's own).
    """
    b, h, n, d = q.shape
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    kv_idx, kv_cnt = (x.to(torch.int32).contiguous() for x in (kv_idx, kv_cnt))
    out = torch.empty_like(q)
    lse = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
    block_m = tile_rows(block_size, interpret)
    scale = d**-0.5 if scale is None else scale
    options = {} if interpret else {"num_warps": 4 if d <= 64 else 8, "num_stages": 2}
    kernel[(triton.cdiv(n, block_m), b * h)](
        q, k, v, out, lse, kv_idx, kv_cnt, *extra,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        kv_idx.stride(0), kv_idx.stride(1), kv_idx.stride(2),
        kv_cnt.stride(0), kv_cnt.stride(1),
        h, h // k.shape[1], n, scale * _LOG2E,
        HEAD_DIM=d, BLOCK=block_size, BLOCK_M=block_m,
        UPCAST=q.dtype == torch.bfloat16 and interpret, IEEE=q.dtype == torch.float32, **constants, **options,
    )  # fmt: skip
    return out, lse


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_idx: torch.Tensor,
    kv_cnt: torch.Tensor,
    block_size: int = 128,
    scale: float | None = None,
    block_len: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton block-sparse attention; CUDA tensors run compiled, CPU tensors only under ``TRITON_INTERPRET=1``.

    Head dim must be a power of two >= 16 (64 and 128 are the tuned cases). fp32 uses IEEE dots (no TF32);
    bf16 operands are upcast to fp32 in the interpreter, whose bf16 dot is wrong (triton#11584).
    ``block_len [M]``: a padded layout (see :func:`difcache.kernels._common.block_lengths`).
    """
    interpret = check_triton_inputs(q, k, v, kv_idx, kv_cnt, block_size)
    kv_cnt = kv_cnt.to(torch.int32).contiguous()
    # LEN is only read with HAS_LEN; without a padded layout any int32 tensor stands in for it
    lengths = kv_cnt if block_len is None else block_lengths(q.shape[2], block_size, block_len, q.device)
    out, lse = launch(
        _bsa_fwd, q, k, v, kv_idx, kv_cnt, (lengths.to(torch.int32),), block_size, scale, interpret,
        BLOCK_N=tile_rows(block_size, interpret), HAS_LEN=block_len is not None,
    )  # fmt: skip
    return mask_padding_rows(out, lse, block_size, block_len)


def gather_blocks(
    x: torch.Tensor, idx: torch.Tensor, block_size: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x [B, H, N, D]``, ``idx [B, H, M, K]`` -> ``[B, H, M, K * block_size, D]``: the listed blocks of each row.

    One ``index_select`` over whole blocks (each a contiguous ``block_size * D`` run), several times faster on
    CPU than advanced indexing; ``out`` as in :func:`select_rows`.
    """
    blocks = pad_blocks(x, block_size)  # [B, H, Mk, S, D]
    bsz, heads, mk = blocks.shape[:3]
    rows = blocks.reshape(bsz * heads * mk, block_size * x.shape[-1])
    base = torch.arange(bsz * heads, device=x.device).view(bsz, heads, 1, 1) * mk
    gathered = select_rows(rows, (idx.long() + base).reshape(-1), out)
    return gathered.view(*idx.shape[:3], idx.shape[3] * block_size, x.shape[-1])


def select_rows(rows: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``rows[index]`` (``rows`` 2-D), written into ``out``'s memory when ``out`` (a tensor returned by an earlier
    call) is large enough. Reuse matters on CPU: writing into memory already touched runs at copy speed, while a
    fresh allocation of a gather this size is page-faulted in on first touch, which costs several times the copy
    (``kernels/block_sparse_attention/NOTES.md``, v3)."""
    numel = index.numel() * rows.shape[1]
    if out is None or out.numel() < numel or out.dtype != rows.dtype or out.device != rows.device:
        out = torch.empty(numel, dtype=rows.dtype, device=rows.device)
    dest = out.view(-1)[:numel].view(index.numel(), rows.shape[1])
    return torch.index_select(rows, 0, index, out=dest)


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
    block_len: torch.Tensor | None = None,
    heads_per_chunk: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention by gathering each row's key blocks: exact, cost proportional to kept blocks.

    Each query block with its gathered key blocks is one small dense problem. On CPU (fp16/bf16 computed in
    fp32: CPU half matmuls are slow and inexact) see :func:`_gathered_cpu`. Elsewhere (CUDA without Triton)
    scores, masked softmax and ``P @ V`` are computed explicitly in the input dtype with fp32 softmax
    statistics, ``heads_per_chunk`` heads at a time to bound the memory (``~ density * N^2 * D / block_size``
    per head).
    """
    check_inputs(q, k, v, kv_idx, kv_cnt, block_size)
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    k, v = expand_kv_heads(k, h), expand_kv_heads(v, h)
    valid = _valid_keys(kv_idx, kv_cnt, block_size, n, block_len)  # [B, H, M, K*S]
    if q.device.type == "cpu":
        return mask_padding_rows(*_gathered_cpu(q, k, v, kv_idx, valid, block_size, scale), block_size, block_len)
    out = torch.empty_like(q)
    lse = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
    for h0 in range(0, h, heads_per_chunk):
        hs = slice(h0, min(h, h0 + heads_per_chunk))
        idx = kv_idx[:, hs].long()
        qb = pad_blocks(q[:, hs], block_size)  # [B, h, M, S, D]
        kg = gather_blocks(k[:, hs], idx, block_size)  # [B, h, M, K*S, D]
        vg = gather_blocks(v[:, hs], idx, block_size)
        s = (qb * scale) @ kg.transpose(-1, -2)
        o, l_ = masked_softmax_av(s.float(), vg, valid[:, hs, :, None, :])
        out[:, hs] = o.flatten(2, 3)[:, :, :n].to(q.dtype)
        lse[:, hs] = l_.flatten(2, 3)[:, :, :n]
    return mask_padding_rows(out, lse, block_size, block_len)


def block_sparse_attention_cpp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_idx: torch.Tensor,
    kv_cnt: torch.Tensor,
    block_size: int = 128,
    scale: float | None = None,
    block_len: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU, computed in fp32: the C++ FlashAttention-style kernel over the listed blocks, reading K and V in place
    (``csrc/block_sparse_cpu.cpp``; built on first use). Same inputs and outputs as the other implementations.

    Blocks are passed to the kernel as ranges (:func:`range_sparse_attention_cpp`): block ``j`` is
    ``[j * block_size, j * block_size + len_j)``, so padding in a padded layout is never computed.
    """
    check_inputs(q, k, v, kv_idx, kv_cnt, block_size)
    b, h, n, _ = q.shape
    lengths = block_lengths(n, block_size, block_len)
    starts = torch.arange(lengths.numel()) * block_size
    start, length = (x.expand(b, h, -1) for x in (starts, lengths))
    return range_sparse_attention_cpp(q, k, v, start, length, start, length, kv_idx, kv_cnt, scale)


def range_sparse_attention_cpp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    k_start: torch.Tensor,
    k_len: torch.Tensor,
    kv_idx: torch.Tensor,
    kv_cnt: torch.Tensor,
    scale: float | None = None,
    row_tile: int = 128,
    col_tile: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention over *ranges* of tokens on CPU (fp32, the C++ kernel): the variable-block form.

    ``q [B, H, Nq, D]``, ``k``/``v [B, Hk, Nk, D]``; per (batch, head) query range ``i`` is
    ``[q_start[b, h, i], + q_len[b, h, i])`` (``[B, H, Mq]``), key range ``j`` likewise (``[B, H, Mk]``), and
    query range ``i`` attends to key ranges ``kv_idx[b, h, i, :kv_cnt[b, h, i]]``. Ranges may have any length
    (Sparse VideoGen 2's clusters, tile-aligned blocks); listed ranges that follow each other in memory are merged
    into one run by the kernel. Rows in no query range, or whose range lists nothing, give 0 and LSE ``-inf``.
    Returns ``(out [B, H, Nq, D] in q's dtype, lse [B, H, Nq] fp32)``.
    """
    if q.device.type != "cpu":
        raise DifcacheError("The C++ range kernel runs on CPU tensors; use backend='auto' on other devices.")
    extension = cpu_extension.load()
    if extension is None:
        raise DifcacheError("The C++ CPU kernel could not be built (see the warning above); use backend='torch'.")
    b, h, nq, d = q.shape
    nk = k.shape[2]
    if k.shape[0] != b or h % k.shape[1] or k.shape != v.shape or k.shape[3] != d:
        raise DifcacheError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not form one attention.")
    mq, width = kv_idx.shape[2:]
    qs, ql, ks, kl, idx, cnt = (
        x.long().expand(b, h, *x.shape[2:]).contiguous() for x in (q_start, q_len, k_start, k_len, kv_idx, kv_cnt)
    )
    mk = ks.shape[2]
    listed = listed_slots(cnt, width)
    bad = (
        ((cnt < 0) | (cnt > width)).any()
        | (listed & ((idx < 0) | (idx >= mk))).any()
        | ((qs < 0) | (ql < 0) | (qs + ql > nq)).any()
        | ((ks < 0) | (kl < 0) | (ks + kl > nk)).any()
    )
    if bool(bad) or qs.shape[2] != mq or ql.shape != qs.shape or kl.shape != ks.shape:
        raise DifcacheError(
            f"Ranges must lie inside the sequence (q {nq}, k {nk} tokens), kv_cnt in [0, {width}] and listed kv_idx "
            f"entries in [0, {mk}); build them from one pattern."
        )
    k, v = expand_kv_heads(k, h), expand_kv_heads(v, h)
    q32, k32, v32 = (x.float().contiguous() for x in (q, k, v))
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros(b, h, nq, d)
    lse = torch.full((b, h, nq), -math.inf)
    extension.range_sparse_forward(q32, k32, v32, qs, ql, ks, kl, idx, cnt, float(scale), row_tile, col_tile, out, lse)
    return out.to(q.dtype), lse


def range_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    k_start: torch.Tensor,
    k_len: torch.Tensor,
    kv_idx: torch.Tensor,
    kv_cnt: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense fp32 reference of :func:`range_sparse_attention_cpp` (a token mask, one masked softmax; O(N^2))."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    q_id = _range_ids(q_start, q_len, b, h, nq)  # [B, H, Nq]: the query range of each row, -1 for none
    k_id = _range_ids(k_start, k_len, b, h, nk)
    mq, mk = q_start.shape[-1], k_start.shape[-1]
    listed = listed_slots(kv_cnt.expand(b, h, -1), kv_idx.shape[-1])
    pairs = torch.zeros((b, h, mq + 1, mk + 1), dtype=torch.bool, device=q.device)
    pairs[:, :, :mq].scatter_(3, torch.where(listed, kv_idx.long().expand(b, h, -1, -1), mk), True)
    pairs[..., mk] = False
    rows = pairs.gather(2, torch.where(q_id < 0, mq, q_id)[..., None].expand(-1, -1, -1, mk + 1))
    token_mask = rows.gather(3, torch.where(k_id < 0, mk, k_id)[:, :, None, :].expand(-1, -1, nq, -1))
    kf, vf = expand_kv_heads(k, h).float(), expand_kv_heads(v, h).float()
    out, lse = masked_softmax_av((q.float() @ kf.transpose(-1, -2)) * scale, vf, token_mask)
    return out.to(q.dtype), lse


def _range_ids(start: torch.Tensor, length: torch.Tensor, b: int, h: int, n: int) -> torch.Tensor:
    """``[B, H, n]`` long: which range each position belongs to (-1 where none)."""
    start, length = start.long().expand(b, h, -1), length.long().expand(b, h, -1)
    m = start.shape[-1]
    ids = torch.full((b, h, n + 1), -1, dtype=torch.long, device=start.device)
    pos = start[..., None] + torch.arange(int(length.max()) if length.numel() else 0, device=start.device)
    inside = torch.arange(pos.shape[-1], device=start.device) < length[..., None]
    rng = torch.arange(m, device=start.device).expand(b, h, m)[..., None].expand_as(pos)
    ids.scatter_(2, torch.where(inside, pos, n).flatten(2), torch.where(inside, rng, -1).flatten(2))
    return ids[..., :n]


def _valid_keys(
    kv_idx: torch.Tensor, kv_cnt: torch.Tensor, block_size: int, n: int, block_len: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, H, M, K * block_size]`` bool: gathered key slots that are listed and hold a real token."""
    listed = listed_slots(kv_cnt, kv_idx.shape[3])  # [B, H, M, K]
    lengths = block_lengths(n, block_size, block_len, kv_idx.device)
    in_block = torch.arange(block_size, device=kv_idx.device) < lengths[kv_idx.long()][..., None]
    return (listed[..., None] & in_block).flatten(3, 4)


# Bytes of gathered K and V per chunk of query blocks on CPU: small enough to stay in the caches between the
# gather and the kernel that reads it. Measured at N 8192, D 64, block 128, density 0.156, one thread: gathering
# all query blocks of a head at once ran at 3.7x dense, chunks of 1-16 query blocks at 4.2-4.6x.
CPU_CHUNK_BYTES = 8 << 20


def cpu_chunk(m: int, keys_per_block: int, d: int) -> int:
    """Query blocks per CPU chunk: as many as keep their gathered fp32 K and V within ``CPU_CHUNK_BYTES``."""
    return max(1, min(m, CPU_CHUNK_BYTES // (2 * keys_per_block * d * 4)))


def _gathered_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_idx: torch.Tensor, valid: torch.Tensor,
    block_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """CPU: for each (batch, head), chunks of query blocks gather their listed K/V blocks into one reused
    buffer (a few MB, cache-resident) and run as a batch of small problems through ATen's fused CPU flash
    attention (``fused_block_attention``: LSE kept, no score tensor), with an additive mask only for chunks
    where some slot is unlisted or past the sequence end."""
    b, h, n, d = q.shape
    m, width = kv_idx.shape[2:]
    chunk = cpu_chunk(m, width * block_size, d)
    all_valid = bool(valid.all())
    out = torch.empty(b, h, m * block_size, d, dtype=torch.float32)
    lse = torch.empty(b, h, m * block_size, dtype=torch.float32)
    kg = vg = None
    for bi in range(b):
        for hi in range(h):
            qb = pad_blocks(q[bi : bi + 1, hi : hi + 1].float(), block_size)  # [1, 1, M, S, D]
            kh, vh = k[bi : bi + 1, hi : hi + 1].float(), v[bi : bi + 1, hi : hi + 1].float()
            for m0 in range(0, m, chunk):
                rows = slice(m0, min(m, m0 + chunk))
                idx = kv_idx[bi : bi + 1, hi : hi + 1, rows]
                kg = gather_blocks(kh, idx, block_size, out=kg)  # [1, 1, c, K*S, D]
                vg = gather_blocks(vh, idx, block_size, out=vg)
                ok = valid[bi : bi + 1, hi : hi + 1, rows, None, :]
                bias = None if all_valid or bool(ok.all()) else torch.zeros(ok.shape).masked_fill_(~ok, -math.inf)
                o, l_ = fused_block_attention(qb[:, :, rows], kg, vg, scale, bias)
                tokens = slice(m0 * block_size, rows.stop * block_size)
                out[bi, hi, tokens] = o.flatten(2, 3)[0, 0]
                lse[bi, hi, tokens] = l_.flatten(2, 3)[0, 0]
    return out[:, :, :n].to(q.dtype), lse[:, :, :n]


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


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_bytes: int = 64 << 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention that also returns the log-sum-exp: ``(out [B, H, Nq, D] fp32, lse [B, H, Nq] fp32)``.

    ``q [B, H, Nq, D]`` against ``k``/``v [B, Hk, Nk, D]``, keys masked by ``key_valid [B, Nk]`` (bool) and scores
    scaled by ``scale`` (default ``D**-0.5``; pass the attention's own). On CPU through ATen's fused flash kernel
    (no score tensor); elsewhere scores are formed in query chunks of at most ``chunk_bytes``, never the whole
    ``[B, H, Nq, Nk]`` at once. Rows with no valid key give 0 and ``-inf``. Used to merge dense text columns into a
    sparse video result exactly, and for AdaSpa's exact search.
    """
    b, h, nq, d = q.shape
    scale = d**-0.5 if scale is None else scale
    k, v = expand_kv_heads(k, h).float(), expand_kv_heads(v, h).float()
    bias = None
    if key_valid is not None:
        bias = torch.zeros(key_valid.shape, device=q.device).masked_fill_(~key_valid.to(torch.bool), -math.inf)
        bias = bias[:, None, None, :]
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.float(), k, v, attn_mask=bias, scale=scale
        )
        if key_valid is not None:
            empty = ~key_valid.to(torch.bool).any(dim=-1)  # ATen gives lse 0 for a row with no valid key
            lse = lse.masked_fill(empty[:, None, None], -math.inf)
        return out, lse
    out = torch.empty(b, h, nq, d, device=q.device)
    lse = torch.empty(b, h, nq, device=q.device)
    rows = max(1, chunk_bytes // max(1, b * h * k.shape[2] * 4))
    for r0 in range(0, nq, rows):
        r = slice(r0, min(nq, r0 + rows))
        s = (q[:, :, r].float() @ k.transpose(-1, -2)) * scale
        valid = None if key_valid is None else key_valid.to(torch.bool)[:, None, None, :]
        out[:, :, r], lse[:, :, r] = masked_softmax_av(s, v, valid)
    return out, lse


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_idx: torch.Tensor,
    kv_cnt: torch.Tensor,
    block_size: int = 128,
    scale: float | None = None,
    block_len: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense fp32 reference: the token mask of the listed blocks, then a masked softmax. O(N^2) memory."""
    check_inputs(q, k, v, kv_idx, kv_cnt, block_size)
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    m = math.ceil(n / block_size)
    listed = listed_slots(kv_cnt, kv_idx.shape[-1])  # [B, H, M, K]
    block_mask = torch.zeros((b, h, m, m + 1), dtype=torch.bool, device=q.device)
    block_mask.scatter_(3, torch.where(listed, kv_idx.long(), m), True)  # unlisted slots go to column m
    token_mask = block_mask[..., :m].repeat_interleave(block_size, 2).repeat_interleave(block_size, 3)
    real = token_valid(n, block_size, block_len, q.device)
    token_mask = token_mask[:, :, :n, :n] & real & real[:, None]
    kf, vf = expand_kv_heads(k, h).float(), expand_kv_heads(v, h).float()
    s = (q.float() @ kf.transpose(-1, -2)) * scale
    out, lse = masked_softmax_av(s, vf, token_mask)
    return out.to(q.dtype), lse
