"""The Triton kernels, run in Triton's interpreter on CPU, against the torch references.

The interpreter must be switched on before triton is first imported (it replaces triton's standard library
then). When this module is collected first it sets ``TRITON_INTERPRET=1`` itself; when something imported
triton earlier in the session, the kernel tests run in a fresh subprocess instead.
"""

import os
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from difcache.kernels import (  # noqa: E402
    block_sparse_attention,
    block_sparse_attention_reference,
    interpreting,
    pyramid_sparse_attention,
    pyramid_sparse_attention_reference,
    triton_available,
)

torch.set_num_threads(1)
IN_SUBPROCESS = os.environ.get("DIFCACHE_TRITON_SUBPROCESS") == "1"
needs_interpreter = pytest.mark.skipif(
    not interpreting(), reason="triton was imported before TRITON_INTERPRET=1; covered by the subprocess test"
)
pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def case(b, h, hk, n, d, block, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g)
    k, v = torch.randn(b, hk, n, d, generator=g), torch.randn(b, hk, n, d, generator=g)
    m = math.ceil(n / block)
    idx = torch.rand(b, h, m, m, generator=g).argsort(dim=-1).to(torch.int32)
    cnt = torch.randint(0, m + 1, (b, h, m), generator=g).to(torch.int32)
    lvl = torch.randint(0, 4, (b, h, m, m), generator=g).to(torch.int32)
    return q.to(dtype), k.to(dtype), v.to(dtype), idx, cnt, lvl


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@needs_interpreter
@settings(max_examples=12, deadline=None)
@given(
    b=st.integers(1, 2), hk=st.integers(1, 2), group=st.sampled_from([1, 2]), n=st.integers(1, 260),
    d=st.sampled_from([16, 64, 128]), block=st.sampled_from([16, 64, 128]), seed=st.integers(0, 10_000),
    dtype=st.sampled_from([torch.float32, torch.float16]),
)  # fmt: skip
def test_block_sparse_kernel_matches_reference(b, hk, group, n, d, block, seed, dtype):
    q, k, v, idx, cnt, _ = case(b, hk * group, hk, n, d, block, seed, dtype)
    ref, ref_lse = block_sparse_attention_reference(q.float(), k.float(), v.float(), idx, cnt, block)
    out, lse = block_sparse_attention(q, k, v, idx, cnt, block)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, atol=TOL[dtype], rtol=TOL[dtype])


@needs_interpreter
@settings(max_examples=12, deadline=None)
@given(
    b=st.integers(1, 2), hk=st.integers(1, 2), group=st.sampled_from([1, 2]), n=st.integers(1, 260),
    d=st.sampled_from([16, 64, 128]), block=st.sampled_from([16, 64, 128]), seed=st.integers(0, 10_000),
    dtype=st.sampled_from([torch.float32, torch.float16]),
)  # fmt: skip
def test_pyramid_kernel_matches_reference(b, hk, group, n, d, block, seed, dtype):
    q, k, v, idx, cnt, lvl = case(b, hk * group, hk, n, d, block, seed, dtype)
    ref, ref_lse = pyramid_sparse_attention_reference(q.float(), k.float(), v.float(), idx, cnt, lvl, block)
    out, lse = pyramid_sparse_attention(q, k, v, idx, cnt, lvl, block)
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, atol=TOL[dtype], rtol=TOL[dtype])


@needs_interpreter
@pytest.mark.parametrize("kernel", ["block", "pyramid"])
def test_bf16_operands_are_upcast_in_the_interpreter(kernel):
    q, k, v, idx, cnt, lvl = case(1, 2, 2, 200, 64, 64, seed=2, dtype=torch.bfloat16)
    if kernel == "block":
        ref, _ = block_sparse_attention_reference(q.float(), k.float(), v.float(), idx, cnt, 64)
        out, _ = block_sparse_attention(q, k, v, idx, cnt, 64)
    else:
        ref, _ = pyramid_sparse_attention_reference(q.float(), k.float(), v.float(), idx, cnt, lvl, 64)
        out, _ = pyramid_sparse_attention(q, k, v, idx, cnt, lvl, 64)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=TOL[torch.bfloat16], rtol=TOL[torch.bfloat16])


@needs_interpreter
@pytest.mark.parametrize("n", [64, 200])
def test_density_one_is_dense_sdpa(n):
    q, k, v, idx, _, _ = case(1, 2, 2, n, 64, 64, seed=n)
    cnt = torch.full(idx.shape[:3], idx.shape[-1], dtype=torch.int32)
    out, _ = block_sparse_attention(q, k, v, idx, cnt, 64)
    torch.testing.assert_close(
        out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5
    )
    zero_lvl = torch.zeros_like(idx)
    out, _ = pyramid_sparse_attention(q, k, v, idx, cnt, zero_lvl, 64)
    torch.testing.assert_close(
        out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5
    )


@needs_interpreter
@pytest.mark.parametrize("kernel", ["block", "pyramid"])
def test_padded_layout_matches_reference(kernel):
    q, k, v, idx, cnt, lvl = case(1, 2, 1, 200, 32, 64, seed=5)
    cnt.clamp_(min=1)
    block_len = torch.tensor([64, 20, 1, 8])
    if kernel == "block":
        ref, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, 64, block_len=block_len)
        out, lse = block_sparse_attention(q, k, v, idx, cnt, 64, block_len=block_len)
    else:
        ref, ref_lse = pyramid_sparse_attention_reference(q, k, v, idx, cnt, lvl, 64, block_len=block_len)
        out, lse = pyramid_sparse_attention(q, k, v, idx, cnt, lvl, 64, block_len=block_len)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@needs_interpreter
def test_density_zero_gives_zero():
    q, k, v, idx, _, lvl = case(1, 1, 1, 100, 16, 16, seed=0)
    cnt = torch.zeros(idx.shape[:3], dtype=torch.int32)
    out, lse = block_sparse_attention(q, k, v, idx, cnt, 16)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out, lse = pyramid_sparse_attention(q, k, v, idx, cnt, lvl, 16)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


@pytest.mark.skipif(interpreting() or IN_SUBPROCESS, reason="the kernel tests ran in this process")
def test_kernels_in_a_fresh_interpreter_process():
    env = {**os.environ, "TRITON_INTERPRET": "1", "DIFCACHE_TRITON_SUBPROCESS": "1"}
    cmd = [sys.executable, "-m", "pytest", __file__, "-o", "addopts=", "-q", "-p", "no:cacheprovider", "-x"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, summary
