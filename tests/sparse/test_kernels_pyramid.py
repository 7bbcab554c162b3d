"""Pyramid sparse attention (PSA): the torch path against the dense fp32 reference, and what levels mean."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difcache.kernels import (
    block_sparse_attention_reference,
    pyramid_sparse_attention_reference,
    pyramid_sparse_attention_torch,
)
from difcache.kernels.pyramid_sparse_attention import kv_pyramid, pool_tokens

torch.set_num_threads(1)


def case(b, h, hk, n, d, block, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g)
    k, v = torch.randn(b, hk, n, d, generator=g), torch.randn(b, hk, n, d, generator=g)
    m = math.ceil(n / block)
    idx = torch.rand(b, h, m, m, generator=g).argsort(dim=-1).to(torch.int32)
    cnt = torch.randint(0, m + 1, (b, h, m), generator=g).to(torch.int32)
    lvl = torch.randint(0, 4, (b, h, m, m), generator=g).to(torch.int32)
    return q, k, v, idx, cnt, lvl


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 2), hk=st.integers(1, 2), group=st.sampled_from([1, 2]), n=st.integers(1, 300),
    d=st.sampled_from([8, 16, 64]), block=st.sampled_from([16, 32, 64]), seed=st.integers(0, 10_000),
)  # fmt: skip
def test_torch_path_matches_reference(b, hk, group, n, d, block, seed):
    q, k, v, idx, cnt, lvl = case(b, hk * group, hk, n, d, block, seed)
    ref, ref_lse = pyramid_sparse_attention_reference(q, k, v, idx, cnt, lvl, block)
    out, lse = pyramid_sparse_attention_torch(q, k, v, idx, cnt, lvl, block)
    torch.testing.assert_close(out, ref, atol=3e-6, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=3e-6, rtol=1e-5)


def test_level_zero_is_block_sparse_attention():
    q, k, v, idx, cnt, lvl = case(2, 2, 1, 200, 32, 64, seed=1)
    full, _ = block_sparse_attention_reference(q, k, v, idx, cnt, 64)
    for fn in (pyramid_sparse_attention_reference, pyramid_sparse_attention_torch):
        out, _ = fn(q, k, v, idx, cnt, torch.zeros_like(lvl), 64)
        torch.testing.assert_close(out, full, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_pooling_is_exact_on_keys_constant_within_groups(level):
    """The log(pool) correction: where each pooled group holds identical keys and values, level l is exact."""
    q, k, v, idx, cnt, _ = case(1, 2, 2, 128, 16, 32, seed=level)
    pool = 2**level
    k = k[:, :, ::pool].repeat_interleave(pool, 2)
    v = v[:, :, ::pool].repeat_interleave(pool, 2)
    full, _ = block_sparse_attention_reference(q, k, v, idx, cnt, 32)
    lvl = torch.full_like(idx, level)
    for fn in (pyramid_sparse_attention_reference, pyramid_sparse_attention_torch):
        out, _ = fn(q, k, v, idx, cnt, lvl, 32)
        torch.testing.assert_close(out, full, atol=2e-6, rtol=1e-5)


def test_without_correction_pooled_blocks_would_be_underweighted():
    """A pooled key stands for `pool` keys: its weight equals that of the full block it replaces."""
    q, k, v, idx, cnt, _ = case(1, 1, 1, 64, 16, 32, seed=3)
    k = k[:, :, ::4].repeat_interleave(4, 2)
    _, lse_full = block_sparse_attention_reference(q, k, v, idx, cnt, 32)
    _, lse_pooled = pyramid_sparse_attention_reference(q, k, v, idx, cnt, torch.full_like(idx, 2), 32)
    torch.testing.assert_close(lse_pooled, lse_full, atol=2e-6, rtol=1e-5)


def test_pool_tokens_partial_group_counts():
    x = torch.arange(10.0).reshape(1, 1, 10, 1)
    pooled, log_count = pool_tokens(x, 4)
    assert pooled.flatten().tolist() == [1.5, 5.5, 8.5]
    torch.testing.assert_close(log_count.exp(), torch.tensor([4.0, 4.0, 2.0]))
    kp, vp, bias = kv_pyramid(x, x)
    assert kp.shape[2] == 10 + 5 + 3 + 2 == bias.numel()


def test_half_precision_torch_path():
    q, k, v, idx, cnt, lvl = case(1, 2, 2, 200, 64, 64, seed=4)
    ref, _ = pyramid_sparse_attention_reference(q, k, v, idx, cnt, lvl, 64)
    out, _ = pyramid_sparse_attention_torch(q.half(), k.half(), v.half(), idx, cnt, lvl, 64)
    assert out.dtype == torch.float16
    assert (out.float() - ref).abs().max() < 5e-3


def test_padded_layout_pools_and_attends_to_real_tokens_only():
    """With ``block_len`` (a padded layout) padding is never pooled nor attended to, on every level."""
    q, k, v, idx, cnt, lvl = case(1, 2, 2, 192, 16, 64, seed=6)
    block_len = torch.tensor([64, 37, 10])
    cnt.clamp_(min=1)
    real = torch.arange(192) % 64 < block_len[torch.arange(192) // 64]
    noise = torch.randn(1, 2, 192, 16) * 100  # garbage in the padding must not change anything
    kn, vn = torch.where(real[:, None], k, noise), torch.where(real[:, None], v, noise)
    ref, ref_lse = pyramid_sparse_attention_reference(q, k, v, idx, cnt, lvl, 64, block_len=block_len)
    for kk, vv in ((k, v), (kn, vn)):
        for fn in (pyramid_sparse_attention_reference, pyramid_sparse_attention_torch):
            out, lse = fn(q, kk, vv, idx, cnt, lvl, 64, block_len=block_len)
            torch.testing.assert_close(out, ref, atol=3e-6, rtol=1e-5)
            torch.testing.assert_close(lse, ref_lse, atol=3e-6, rtol=1e-5)
    assert torch.isneginf(ref_lse[:, :, ~real]).all()
    full, _ = block_sparse_attention_reference(q, k, v, idx, cnt, 64, block_len=block_len)
    level0, _ = pyramid_sparse_attention_torch(q, kn, vn, idx, cnt, torch.zeros_like(lvl), 64, block_len=block_len)
    torch.testing.assert_close(level0, full, atol=3e-6, rtol=1e-5)
