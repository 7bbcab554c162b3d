"""Pyramid sparse attention forward (PSA): each listed key block is read at a level of detail.

Pyramid Sparse Attention (Li et al., "PSA: Pyramid Sparse Attention for Efficient Video Understanding and
Generation", arXiv:2512.04025) keeps the information of less important key blocks coarsely instead of
dropping it: a (query block, key block) pair at level ``l`` attends to the block's keys and values
mean-pooled by ``2**l`` (level 0 = full). A pooled key stands for ``c`` original keys (``c = 2**l``, fewer at
the end of the sequence), so its score gets ``+ log(c)``: ``c * exp(q.k_mean)`` approximates the sum of the
``c`` individual ``exp(q.k_i)``, and level 0 everywhere is exact attention.

Format: the block lists of :mod:`difcache.kernels.block_sparse_attention` plus ``kv_lvl [B, H, M, K]`` (int,
0..3) giving the level of each listed block. Pyramids are built once per call by :func:`kv_pyramid`.
Returns ``(out [B, H, N, D], lse [B, H, N] fp32)`` like the block-sparse kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from difcache.kernels._common import (
    check_inputs,
    check_triton_inputs,
    expand_kv_heads,
    jit,
    listed_slots,
    mask_padding_rows,
    pad_blocks,
    tl,
    token_valid,
)
from difcache.kernels.block_sparse_attention import (
    cpu_chunk,
    dot,
    fused_block_attention,
    gather_blocks,
    launch,
    load_tile,
    masked_softmax_av,
    query_rows,
    select_rows,
    softmax_step,
    store_rows,
)

LEVELS = 4  # pooling factors 1, 2, 4, 8


def pool_tokens(
    x: torch.Tensor, factor: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each ``factor`` consecutive tokens: ``x [B, H, N, D]`` -> ``([B, H, ceil(N/f), D], log_count)``.

    ``log_count [ceil(N/f)]`` (fp32) is the log of how many tokens each pooled one stands for (``log f``, less
    for the last group of a sequence that ``f`` does not divide). ``valid [N]`` (bool) marks the real tokens of a
    padded layout: only they are averaged and counted, and a group of padding only gets ``log 0 = -inf``.
    """
    n = x.shape[2]
    groups = math.ceil(n / factor)
    if valid is None:
        counts = torch.full((groups,), float(factor), device=x.device)
        counts[-1] = n - (groups - 1) * factor
    else:
        counts = pad_blocks(valid.float()[None, None, :, None], factor).sum(dim=3).flatten()
    if factor == 1 and valid is None:
        return x, counts.log()
    xf = x.float() if valid is None else x.float() * valid[:, None]
    summed = pad_blocks(xf, factor).sum(dim=3)
    return (summed / counts.clamp_min(1)[:, None]).to(x.dtype), counts.log()


def kv_pyramid(
    k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values at every level, concatenated along the sequence: ``[B, Hk, N + N/2 + N/4 + N/8, D]``.

    Also returns ``bias`` (fp32, same length): the ``log(count)`` score correction of every pooled key (``-inf``
    on padding, with ``valid`` as in :func:`pool_tokens`).
    """
    ks, vs, bias = [], [], []
    for level in range(LEVELS):
        kl, bl = pool_tokens(k, 2**level, valid)
        ks.append(kl)
        vs.append(pool_tokens(v, 2**level, valid)[0])
        bias.append(bl)
    return torch.cat(ks, dim=2), torch.cat(vs, dim=2), torch.cat(bias)


@jit
def _psa_fwd(
    Q, KP, VP, O, LSE, IDX, CNT, LVL, BIAS,  # noqa: N803
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
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    """One program: ``BLOCK_M`` query rows; each listed block is one tile of its level's pooled keys.

    The level is a runtime value, the tile width a compile-time one, so the four levels are four unrolled
    branches with tile widths ``BLOCK >> level`` (at least 16, the smallest ``tl.dot``; extra columns masked).
    """
    b, h, hk, row, offs_m, offs_d, q = query_rows(
        Q, stride_qb, stride_qh, stride_qn, H, GROUP, N, HEAD_DIM, BLOCK, BLOCK_M, UPCAST
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, dtype=tl.float32)
    cnt = tl.load(CNT + b * stride_cb + h * stride_ch + row)
    k_base = KP + b * stride_kb + hk * stride_kh
    v_base = VP + b * stride_vb + hk * stride_vh
    list_base = b * stride_ib + h * stride_ih + row * stride_im
    for t in range(0, cnt):
        j = tl.load(IDX + list_base + t)
        lvl = tl.load(LVL + list_base + t)
        offset = 0  # where this level starts in the concatenated pyramid
        for lv in tl.static_range(4):
            if lvl == lv:
                WIDTH: tl.constexpr = BLOCK >> lv
                TILE: tl.constexpr = WIDTH if WIDTH >= 16 else 16
                n_lv = (N + (1 << lv) - 1) >> lv
                cols = j * WIDTH + tl.arange(0, TILE)
                valid = (tl.arange(0, TILE) < WIDTH) & (cols < n_lv)
                pos = offset + cols
                k = load_tile(k_base + pos[None, :] * stride_kn + offs_d[:, None], mask=valid[None, :], UPCAST=UPCAST)
                s = dot(q, k, IEEE)
                bias = tl.load(BIAS + pos, mask=valid, other=0.0)
                s = tl.where(valid[None, :], s * qk_scale + bias[None, :] * 1.4426950408889634, float("-inf"))
                m_i, l_i, acc = softmax_step(s, v_base, pos, valid, offs_d, stride_vn, m_i, l_i, acc, UPCAST, IEEE)
            offset += (N + (1 << lv) - 1) >> lv
    store_rows(O, LSE, acc, m_i, l_i, b, h, offs_m, offs_d, stride_ob, stride_oh, stride_on, N)


def pyramid_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_idx: torch.Tensor,
    kv_cnt: torch.Tensor,
    kv_lvl: torch.Tensor,
    block_size: int = 128,
    scale: float | None = None,
    block_len: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton PSA forward; CUDA tensors run compiled, CPU tensors only under ``TRITON_INTERPRET=1``.

    ``block_len [M]``: a padded layout; padding keys get a ``-inf`` bias at every level."""
    interpret = check_triton_inputs(q, k, v, kv_idx, kv_cnt, block_size, kv_lvl)
    valid = None if block_len is None else token_valid(q.shape[2], block_size, block_len, q.device)
    kp, vp, bias = kv_pyramid(k, v, valid)
    extra = (kv_lvl.to(torch.int32).contiguous(), bias.float().contiguous())
    out, lse = launch(_psa_fwd, q, kp, vp, kv_idx, kv_cnt, extra, block_size, scale, interpret)
    return mask_padding_rows(out, lse, block_size, block_len)


def level_lists(
    kv_idx: torch.Tensor, kv_cnt: torch.Tensor, kv_lvl: torch.Tensor, level: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sub-lists of the blocks listed at ``level``: ``(idx [B, H, M, K_l], cnt [B, H, M])``, stable order."""
    width = kv_idx.shape[-1]
    slot = torch.arange(width, device=kv_idx.device)
    hit = listed_slots(kv_cnt, width) & (kv_lvl == level)
    order = torch.where(hit, slot, width + slot).argsort(dim=-1)  # hits first, in their original order
    cnt = hit.sum(dim=-1)
    k_l = int(cnt.max()) if cnt.numel() else 0
    return kv_idx.gather(-1, order[..., :k_l]), cnt


def pyramid_sparse_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_idx: torch.Tensor,
    kv_cnt: torch.Tensor,
    kv_lvl: torch.Tensor,
    block_size: int = 128,
    scale: float | None = None,
    block_len: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PSA by gathering, per level, each row's pooled key blocks, then one softmax over all of them.

    Cost is proportional to ``sum(2**-level)`` over the listed blocks. Computed in fp32 on CPU.
    ``block_len [M]``: a padded layout (padding is neither pooled nor attended to).
    """
    check_inputs(q, k, v, kv_idx, kv_cnt, block_size, kv_lvl)
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    valid = None if block_len is None else token_valid(n, block_size, block_len, q.device)
    if q.device.type == "cpu":
        k, v = expand_kv_heads(k, h), expand_kv_heads(v, h)
        out, lse = _pyramid_cpu(q, k, v, kv_idx, kv_cnt, kv_lvl, block_size, scale, valid)
        return mask_padding_rows(out, lse, block_size, block_len)
    compute = q.dtype
    k, v = expand_kv_heads(k, h).to(compute), expand_kv_heads(v, h).to(compute)
    qb = pad_blocks(q.to(compute), block_size)  # [B, H, M, S, D]
    keys, values, biases = [], [], []
    for level in range(LEVELS):
        idx, cnt = level_lists(kv_idx, kv_cnt, kv_lvl, level)
        if idx.shape[-1] == 0:
            continue
        width = block_size >> level
        kl, bias_l = pool_tokens(k, 2**level, valid)
        vl = pool_tokens(v, 2**level, valid)[0]
        n_l = kl.shape[2]
        keys.append(gather_blocks(kl, idx, width))  # [B, H, M, K_l * width, D]
        values.append(gather_blocks(vl, idx, width))
        cols = idx.long()[..., None] * width + torch.arange(width, device=q.device)  # [B, H, M, K_l, width]
        valid = listed_slots(cnt, idx.shape[-1])[..., None] & (cols < n_l)
        bias = torch.where(valid, bias_l[cols.clamp_max(n_l - 1)], float("-inf")).flatten(3, 4)
        biases.append(bias[:, :, :, None, :])
    m = qb.shape[2]
    if not keys:
        return torch.zeros_like(q), torch.full((b, h, n), float("-inf"), device=q.device)
    kg, vg = torch.cat(keys, dim=-2), torch.cat(values, dim=-2)
    bias = torch.cat(biases, dim=-1).expand(b, h, m, 1, -1)
    out, lse = masked_softmax_av(((qb * scale) @ kg.transpose(-1, -2)).float(), vg, None, bias)
    out, lse = out.flatten(2, 3)[:, :, :n].to(q.dtype), lse.flatten(2, 3)[:, :, :n]
    return mask_padding_rows(out, lse, block_size, block_len)


def _pyramid_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_idx: torch.Tensor, kv_cnt: torch.Tensor,
    kv_lvl: torch.Tensor, block_size: int, scale: float, valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """CPU PSA in fp32 with one gather per chunk of query blocks, whatever the levels.

    Per head, every level is padded to ``M`` blocks of ``block_size >> level`` pooled tokens and the levels are
    stacked as rows of ``g = block_size / 8`` tokens: a level-``l`` block is ``8 >> l`` consecutive rows. Each
    query block's listed (block, level) pairs become a row list (valid rows first), so a chunk of query blocks
    gathers its keys, values and ``log(count)`` biases with one ``index_select`` each into reused buffers and
    runs through ATen's fused CPU attention (:func:`fused_block_attention`), as in the block-sparse CPU path.
    """
    b, h, n, d = q.shape
    m, width = kv_idx.shape[2:]
    g = block_size // 8
    per_level = [m * (8 >> level) for level in range(LEVELS)]  # rows per level
    base = torch.tensor([sum(per_level[:level]) for level in range(LEVELS)])
    bias_rows = _level_bias_rows(n, block_size, m, valid)
    # Row lists for every (batch, head, query block): [B, H, M, K * 8], valid rows first.
    lvl = kv_lvl.long()
    rows_per = 8 >> lvl
    sub = torch.arange(8)
    rows = (base[lvl] + kv_idx.long() * rows_per)[..., None] + sub
    ok = ((sub < rows_per[..., None]) & listed_slots(kv_cnt, width)[..., None]).flatten(3, 4)
    order = torch.argsort((~ok).to(torch.int8), dim=-1, stable=True)
    rows = torch.where(ok, rows.flatten(3, 4), 0).gather(-1, order)
    ok = ok.gather(-1, order)
    lengths = ok.sum(-1).amax(-1).tolist()  # [B][H]: the longest row list of each head
    out = torch.zeros(b, h, m * block_size, d)
    lse = torch.full((b, h, m * block_size), -math.inf)
    kg = vg = None
    for bi in range(b):
        for hi in range(h):
            length = lengths[bi][hi]
            if length == 0:
                continue
            kp, vp = (_level_rows(x[bi, hi].float(), block_size, m, valid) for x in (k, v))
            qb = pad_blocks(q[bi : bi + 1, hi : hi + 1].float(), block_size)
            chunk = cpu_chunk(m, length * g, d)
            for m0 in range(0, m, chunk):
                blocks = slice(m0, min(m, m0 + chunk))
                flat = rows[bi, hi, blocks, :length].reshape(-1)
                kg = select_rows(kp, flat, kg).view(1, 1, -1, length * g, d)
                vg = select_rows(vp, flat, vg).view(1, 1, -1, length * g, d)
                bias = bias_rows.index_select(0, flat).view(1, 1, -1, 1, length * g)
                listed_rows = ok[bi, hi, blocks, :length, None].expand(-1, -1, g).reshape(bias.shape)
                bias.masked_fill_(~listed_rows, -math.inf)
                o, l_ = fused_block_attention(qb[:, :, blocks], kg, vg, scale, bias)
                tokens = slice(m0 * block_size, blocks.stop * block_size)
                out[bi, hi, tokens] = o.flatten(2, 3)[0, 0]
                lse[bi, hi, tokens] = l_.flatten(2, 3)[0, 0]
    return out[:, :, :n].to(q.dtype), lse[:, :, :n]


def _level_bias_rows(n: int, block_size: int, m: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The ``log(count)`` score correction laid out like :func:`_level_rows`; ``-inf`` on padding tokens."""
    levels = []
    for level in range(LEVELS):
        log_count = pool_tokens(torch.empty(1, 1, n, 0), 2**level, valid)[1]
        levels.append(F.pad(log_count, (0, m * (block_size >> level) - log_count.numel()), value=-math.inf))
    return torch.cat(levels).view(-1, block_size // 8)


def _level_rows(x: torch.Tensor, block_size: int, m: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``x [N, D]`` -> every level padded to ``m`` blocks and stacked as rows of ``block_size / 8`` tokens."""
    levels = [
        pad_blocks(pool_tokens(x[None, None], 2**level, valid)[0], block_size >> level) for level in range(LEVELS)
    ]
    return torch.cat([lv.reshape(-1, x.shape[1]) for lv in levels]).view(-1, (block_size // 8) * x.shape[1])


def pyramid_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_idx: torch.Tensor,
    kv_cnt: torch.Tensor,
    kv_lvl: torch.Tensor,
    block_size: int = 128,
    scale: float | None = None,
    block_len: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense fp32 reference: every level's pooled keys side by side, a token mask per level, one softmax."""
    check_inputs(q, k, v, kv_idx, kv_cnt, block_size, kv_lvl)
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    m = math.ceil(n / block_size)
    listed = listed_slots(kv_cnt, kv_idx.shape[-1])
    level_map = torch.full((b, h, m, m + 1), -1, dtype=torch.long, device=q.device)
    level_map.scatter_(3, torch.where(listed, kv_idx.long(), m), kv_lvl.long())
    level_map = level_map[..., :m]  # [B, H, M, Mk]: -1 = skipped
    qf = q.float()
    valid = None if block_len is None else token_valid(n, block_size, block_len, q.device)
    scores, values = [], []
    for level in range(LEVELS):
        kl, bias = pool_tokens(expand_kv_heads(k, h).float(), 2**level, valid)
        vl = pool_tokens(expand_kv_heads(v, h).float(), 2**level, valid)[0]
        mask = (level_map == level).repeat_interleave(block_size, 2)[:, :, :n]
        mask = mask.repeat_interleave(block_size >> level, 3)[..., : kl.shape[2]]
        s = (qf @ kl.transpose(-1, -2)) * scale + bias
        scores.append(s.masked_fill(~mask, float("-inf")))
        values.append(vl)
    out, lse = masked_softmax_av(torch.cat(scores, dim=-1), torch.cat(values, dim=-2), None)
    return mask_padding_rows(out.to(q.dtype), lse, block_size, block_len)
