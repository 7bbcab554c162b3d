"""Block-sparse attention: the torch (gathered) path, the C++ CPU kernel and FlexAttention against the dense fp32
reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from difcache.errors import DifcacheError
from difcache.kernels import (
    block_sparse_attention_cpp,
    block_sparse_attention_flex,
    block_sparse_attention_reference,
    block_sparse_attention_torch,
    cpu_extension,
    range_sparse_attention_cpp,
    range_sparse_attention_reference,
    resolve_backend,
)
from difcache.kernels.flex import block_mask_of

torch.set_num_threads(1)


def random_lists(b, h, n, block, density=None, seed=0):
    """Random per-row block lists (random order, no repeats); counts from 0 to all, or ``density`` of the row."""
    g = torch.Generator().manual_seed(seed)
    m = math.ceil(n / block)
    idx = torch.rand(b, h, m, m, generator=g).argsort(dim=-1).to(torch.int32)
    if density is None:
        cnt = torch.randint(0, m + 1, (b, h, m), generator=g).to(torch.int32)
    else:
        cnt = torch.full((b, h, m), round(density * m), dtype=torch.int32)
    return idx, cnt


def qkv(b, h, hk, n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g)
    k, v = torch.randn(b, hk, n, d, generator=g), torch.randn(b, hk, n, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _cpp():
    """The C++ kernel among the implementations under test, where it builds."""
    return (block_sparse_attention_cpp,) if cpu_extension.load() is not None else ()


def rel_rms(a, b):
    return (
        (a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt().clamp_min(1e-12)
    ).item()


@pytest.mark.parametrize("impl", ["torch", "cpp"])
@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 2), hk=st.integers(1, 2), group=st.sampled_from([1, 2]), n=st.integers(1, 300),
    d=st.sampled_from([8, 16, 60, 64]), block=st.sampled_from([16, 32, 64]), seed=st.integers(0, 10_000),
)  # fmt: skip
def test_cpu_paths_match_reference(impl, b, hk, group, n, d, block, seed):
    if impl == "cpp" and cpu_extension.load() is None:
        pytest.skip("the C++ CPU kernel could not be built here")
    fn = {"torch": block_sparse_attention_torch, "cpp": block_sparse_attention_cpp}[impl]
    h = hk * group
    q, k, v = qkv(b, h, hk, n, d, seed=seed)
    idx, cnt = random_lists(b, h, n, block, seed=seed)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, block)
    out, lse = fn(q, k, v, idx, cnt, block)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-6, rtol=1e-5)  # -inf where a row lists no block


needs_cpp = pytest.mark.skipif(cpu_extension.load() is None, reason="the C++ CPU kernel could not be built here")


@needs_cpp
def test_cpp_kernel_half_precision_and_bad_lists():
    q, k, v = qkv(1, 2, 2, 200, 64, torch.bfloat16)
    idx, cnt = random_lists(1, 2, 200, 64, seed=2)
    ref, _ = block_sparse_attention_reference(q.float(), k.float(), v.float(), idx, cnt, 64)
    out, _ = block_sparse_attention_cpp(q, k, v, idx, cnt, 64)
    assert out.dtype == torch.bfloat16 and rel_rms(out, ref) < 5e-3
    bad = idx.clone()
    bad[0, 0, 0, 0] = 4  # 200 tokens make 4 blocks: index 4 is out of range (the kernel would read past K)
    with pytest.raises(DifcacheError, match="listed kv_idx"):
        block_sparse_attention_cpp(q, k, v, bad, torch.full_like(cnt, 4), 64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_path_half_precision(dtype):
    q, k, v = qkv(2, 4, 2, 333, 64, dtype)
    idx, cnt = random_lists(2, 4, 333, 64, seed=3)
    ref, _ = block_sparse_attention_reference(q.float(), k.float(), v.float(), idx, cnt, 64)
    out, _ = block_sparse_attention_torch(q, k, v, idx, cnt, 64)
    assert out.dtype == dtype
    assert rel_rms(out, ref) < (5e-3 if dtype == torch.bfloat16 else 1e-3)


@pytest.mark.parametrize("n", [63, 128, 257])
def test_density_one_is_dense_sdpa(n):
    q, k, v = qkv(1, 2, 2, n, 32)
    idx, cnt = random_lists(1, 2, n, 32, density=1.0)
    dense = F.scaled_dot_product_attention(q, k, v)
    for fn in (block_sparse_attention_reference, block_sparse_attention_torch, *_cpp()):
        out, _ = fn(q, k, v, idx, cnt, 32)
        torch.testing.assert_close(out, dense, atol=1e-6, rtol=1e-5)


def test_density_zero_gives_zero_and_minus_inf():
    q, k, v = qkv(1, 2, 2, 100, 16)
    idx, cnt = random_lists(1, 2, 100, 32, density=0.0)
    for fn in (block_sparse_attention_reference, block_sparse_attention_torch, *_cpp()):
        out, lse = fn(q, k, v, idx, cnt, 32)
        assert torch.equal(out, torch.zeros_like(out))
        assert torch.isneginf(lse).all()


def test_sparsity_is_real_not_a_mask_on_dense():
    """Dropping a block must change exactly the rows that listed it."""
    q, k, v = qkv(1, 1, 1, 256, 16)
    idx, cnt = random_lists(1, 1, 256, 64, density=1.0)
    full, _ = block_sparse_attention_torch(q, k, v, idx, cnt, 64)
    cnt2 = cnt.clone()
    cnt2[0, 0, 1] -= 1  # row 1 loses its last listed block
    part, _ = block_sparse_attention_torch(q, k, v, idx, cnt2, 64)
    changed = (part - full).abs().amax(dim=-1)[0, 0] > 1e-6
    assert changed[64:128].all() and not changed[:64].any() and not changed[128:].any()


def test_bad_inputs_raise_with_the_fix():
    q, k, v = qkv(1, 2, 2, 100, 16)
    idx, cnt = random_lists(1, 2, 100, 32)
    with pytest.raises(DifcacheError, match="block_size"):
        block_sparse_attention_torch(q, k, v, idx, cnt, 48)
    with pytest.raises(DifcacheError, match="do not fit"):
        block_sparse_attention_torch(q, k, v, idx[:, :, :2], cnt[:, :, :2], 32)
    with pytest.raises(DifcacheError, match="B, H, N, D"):
        block_sparse_attention_torch(q[0], k, v, idx, cnt, 32)


def test_flex_block_mask_never_runs_dense_or_only_full():
    """The two CPU traps: a mask without mask_mod runs dense; only-full-block masks fail to compile."""
    idx, cnt = random_lists(1, 2, 300, 64, seed=1)
    mask = block_mask_of(idx, cnt, 300, 64)
    assert mask.mask_mod.__name__ == "lookup"
    nonempty = cnt > 0
    assert (mask.kv_num_blocks[nonempty] >= 1).all()  # every visited row keeps a partial block


@pytest.mark.parametrize("n", [100, 256])
def test_flex_eager_matches_reference(n):
    q, k, v = qkv(2, 2, 1, n, 32)
    idx, cnt = random_lists(2, 2, n, 64, seed=n)
    cnt.clamp_(min=1)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, 64)
    out, lse = block_sparse_attention_flex(q, k, v, idx, cnt, 64, compiled=False)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-6, rtol=1e-5)


def test_flex_extra_keys_equal_one_softmax_over_the_union():
    q, k, v = qkv(1, 2, 2, 200, 16)
    ek, ev = torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)
    valid = torch.tensor([[True, False, True, True, False, True, True]])
    idx, cnt = random_lists(1, 2, 200, 64, seed=5)
    cnt.clamp_(min=1)
    out, _ = block_sparse_attention_flex(q, k, v, idx, cnt, 64, compiled=False, extra_k=ek, extra_v=ev,
                                         extra_valid=valid)  # fmt: skip
    m = math.ceil(200 / 64)
    block_mask = torch.zeros(1, 2, m, m, dtype=torch.bool)
    for h in range(2):
        for i in range(m):
            block_mask[0, h, i, idx[0, h, i, : cnt[0, h, i]].long()] = True
    token_mask = block_mask.repeat_interleave(64, 2).repeat_interleave(64, 3)[:, :, :200, :200]
    full_mask = torch.cat([token_mask, valid[:, None, None, :].expand(1, 2, 200, 7)], dim=-1)
    ref = F.scaled_dot_product_attention(q, torch.cat([k, ek], 2), torch.cat([v, ev], 2), attn_mask=full_mask)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_flex_compiled_matches_reference():
    q, k, v = qkv(1, 2, 2, 384, 32)
    idx, cnt = random_lists(1, 2, 384, 128, seed=7)
    cnt.clamp_(min=1)
    ref, _ = block_sparse_attention_reference(q, k, v, idx, cnt, 128)
    out, lse = block_sparse_attention_flex(q, k, v, idx, cnt, 128, compiled=True)
    assert lse is None  # compiled CPU flex cannot return it
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_backend_choice_by_device_and_override():
    cpu = torch.device("cpu")
    block_sparse = "cpp" if cpu_extension.load() is not None else "torch"
    assert resolve_backend("auto", cpu, pyramid=False, n_tokens=100) == block_sparse
    assert resolve_backend("auto", cpu, pyramid=False, n_tokens=8192) == block_sparse
    assert resolve_backend("auto", cpu, pyramid=True, n_tokens=8192) == "torch"  # PSA: no C++ kernel
    with pytest.raises(DifcacheError, match="not PSA"):
        resolve_backend("cpp", cpu, pyramid=True, n_tokens=10)
    assert resolve_backend("reference", cpu, pyramid=True, n_tokens=10) == "reference"
    with pytest.raises(DifcacheError, match="pooled PSA"):
        resolve_backend("flex", cpu, pyramid=True, n_tokens=10)
    with pytest.raises(DifcacheError, match="one of"):
        resolve_backend("cuda-magic", cpu, pyramid=False, n_tokens=10)


# ---------------------------------------------------------------------------------------------- padded layouts
def random_block_len(n, block, seed):
    """Per-block real-token counts of a padded layout over ``n`` positions (each block holds >= 1 token)."""
    g = torch.Generator().manual_seed(seed)
    m = math.ceil(n / block)
    lengths = torch.randint(1, block + 1, (m,), generator=g)
    lengths[-1] = min(int(lengths[-1]), n - (m - 1) * block)
    return lengths


def compact_reference(q, k, v, idx, cnt, block, block_len):
    """Attention over the real tokens only (padding dropped), with the token mask of the listed blocks."""
    n = q.shape[2]
    pos = torch.arange(n)
    real = pos % block < block_len[pos // block]
    blk = (pos // block)[real]
    m = block_len.numel()
    table = torch.zeros(*idx.shape[:3], m, dtype=torch.bool)
    for b in range(idx.shape[0]):
        for h in range(idx.shape[1]):
            for i in range(m):
                table[b, h, i, idx[b, h, i, : cnt[b, h, i]].long()] = True
    mask = table[:, :, blk][:, :, :, blk]
    h = q.shape[1]
    kk, vv = (x.repeat_interleave(h // x.shape[1], 1) for x in (k, v))
    out = F.scaled_dot_product_attention(q[:, :, real], kk[:, :, real], vv[:, :, real], attn_mask=mask)
    return out, real


@pytest.mark.parametrize("impl", ["reference", "torch", "cpp", "flex"])
@settings(max_examples=15, deadline=None)
@given(n=st.integers(20, 300), block=st.sampled_from([16, 32, 64]), group=st.sampled_from([1, 2]),
       seed=st.integers(0, 10_000))  # fmt: skip
def test_padded_layout_attends_to_real_tokens_only(impl, n, block, group, seed):
    if impl == "cpp" and cpu_extension.load() is None:
        pytest.skip("the C++ CPU kernel could not be built here")
    fn = {
        "reference": block_sparse_attention_reference,
        "torch": block_sparse_attention_torch,
        "cpp": block_sparse_attention_cpp,
        "flex": lambda *a, **kw: block_sparse_attention_flex(*a, compiled=False, **kw),
    }[impl]
    q, k, v = qkv(1, 2 * group, 2, n, 16, seed=seed)
    block_len = random_block_len(n, block, seed)
    idx, cnt = random_lists(1, 2 * group, n, block, seed=seed)
    cnt.clamp_(min=1)
    expected, real = compact_reference(q, k, v, idx, cnt, block, block_len)
    out, lse = fn(q, k, v, idx, cnt, block, block_len=block_len)
    torch.testing.assert_close(out[:, :, real], expected, atol=2e-6, rtol=1e-5)
    assert torch.equal(out[:, :, ~real], torch.zeros_like(out[:, :, ~real]))  # padding rows: 0 and -inf
    assert lse is None or torch.isneginf(lse[:, :, ~real]).all()


def random_ranges(b, h, n, max_len, seed):
    """Consecutive ranges of random lengths (0..max_len) tiling [0, n) per (batch, head)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (b, h, n + 1), generator=g)
    start = lengths.cumsum(-1) - lengths
    keep = start < n
    m = int(keep.sum(-1).max())
    start, lengths = start[..., :m], lengths[..., :m]
    lengths = torch.minimum(lengths, (n - start).clamp(min=0))
    return start.clamp(max=n), lengths


@needs_cpp
@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), nq=st.integers(1, 200), nk=st.integers(1, 200),
       max_len=st.sampled_from([3, 40, 300]), seed=st.integers(0, 10_000))  # fmt: skip
def test_range_kernel_matches_reference(b, h, nq, nk, max_len, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, 16, generator=g)
    k, v = torch.randn(b, 1, nk, 16, generator=g), torch.randn(b, 1, nk, 16, generator=g)
    qs, ql = random_ranges(b, h, nq, max_len, seed)
    ks, kl = random_ranges(b, h, nk, max_len, seed + 1)
    mq, mk = qs.shape[-1], ks.shape[-1]
    idx = torch.rand(b, h, mq, mk, generator=g).argsort(-1)
    idx[..., : mk // 2] = idx[..., : mk // 2].sort(-1).values  # ascending runs, so adjacent ranges get merged
    cnt = torch.randint(0, mk + 1, (b, h, mq), generator=g)
    ref, ref_lse = range_sparse_attention_reference(q, k, v, qs, ql, ks, kl, idx, cnt, 0.3)
    out, lse = range_sparse_attention_cpp(q, k, v, qs, ql, ks, kl, idx, cnt, 0.3, row_tile=16, col_tile=32)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-6, rtol=1e-5)


def test_range_reference_is_attention_within_the_listed_ranges():
    q, k, v = qkv(1, 1, 1, 10, 8)
    qs, ql = torch.tensor([[[0, 4]]]), torch.tensor([[[4, 6]]])
    ks, kl = torch.tensor([[[0, 3, 7]]]), torch.tensor([[[3, 4, 3]]])
    idx, cnt = torch.tensor([[[[2, 0], [1, 0]]]]), torch.tensor([[[2, 1]]])
    out, _ = range_sparse_attention_reference(q, k, v, qs, ql, ks, kl, idx, cnt)
    keys0 = torch.tensor([7, 8, 9, 0, 1, 2])
    expected0 = F.scaled_dot_product_attention(q[:, :, :4], k[:, :, keys0], v[:, :, keys0])
    expected1 = F.scaled_dot_product_attention(q[:, :, 4:], k[:, :, 3:7], v[:, :, 3:7])
    torch.testing.assert_close(out, torch.cat([expected0, expected1], 2), atol=1e-6, rtol=1e-5)
