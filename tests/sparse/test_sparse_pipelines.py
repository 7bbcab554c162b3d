"""Sparse attention on the tiny offline pipelines of every supported family."""

import pytest
import torch

import difcache
from difcache.attention import apply_sparse_attention
from difcache.attention.runtime import SparseRuntime
from difcache.errors import DifcacheError
from difcache.kernels import cpu_extension
from difcache.models.tiny import output_of, tiny_pipeline
from difcache.models.tiny import tiny_call_kwargs as _call_kwargs

torch.set_num_threads(1)

# Sizes that give each tiny model a few hundred to ~1500 video tokens, so 16-token blocks leave real choices.
SIZES = {
    "wan": dict(height=64, width=64),
    "hunyuanvideo": dict(height=32, width=32, num_frames=9),
    "cogvideox": dict(height=128, width=128),
    "ltx": dict(height=64, width=64),
    "flux": dict(height=64, width=64),
}
BLOCK = dict(block_size=16)


def call(pipe, family, steps=3):
    try:
        kwargs = _call_kwargs(family, cfg=True, num_inference_steps=steps)
    except TypeError:
        kwargs = _call_kwargs(family, pipe, cfg=True, num_inference_steps=steps)
    return output_of(pipe(**{**kwargs, **SIZES[family]}))


@pytest.fixture(scope="module")
def pipes():
    cache = {}

    def get(family):
        if family not in cache:
            pipe = tiny_pipeline(family)
            pipe.set_progress_bar_config(disable=True)
            cache[family] = (pipe, call(pipe, family))
        return cache[family]

    return get


@pytest.mark.parametrize("family", list(SIZES))
def test_density_one_is_dense_and_removal_is_bit_exact(pipes, family):
    pipe, dense = pipes(family)
    for settings in (
        dict(method="topk", density=1.0),
        dict(method="topp", p=1.0),
        dict(method="psa", density=1.0),
    ):
        handle = apply_sparse_attention(pipe, **settings, **BLOCK)
        out = call(pipe, family)
        stats = handle.stats()
        handle.remove()
        assert stats.sparse_calls > 0 and not stats.dense_calls, stats
        assert (out - dense).abs().max() <= 1e-5, settings
    assert torch.equal(call(pipe, family), dense)


@pytest.mark.parametrize("family", list(SIZES))
def test_full_pattern_through_the_sparse_kernels_matches_dense(pipes, family, monkeypatch):
    """With the dense shortcut off, a full pattern goes through tiling, the kernels and the text merge."""
    monkeypatch.setattr(SparseRuntime, "DENSE_SHORTCUT", False)
    pipe, dense = pipes(family)
    block_sparse = "cpp" if cpu_extension.load() is not None else "torch"  # the automatic CPU kernels
    cases = ((dict(method="topk", density=1.0), block_sparse), (dict(method="psa", density=1.0), "torch"))
    for settings, kernel in cases:
        with apply_sparse_attention(pipe, **settings, **BLOCK) as handle:
            out = call(pipe, family)
            assert handle.stats().backends == {kernel: handle.stats().sparse_calls}
        assert (out - dense).abs().max() <= 5e-5, settings


@pytest.mark.parametrize("family", ["wan", "hunyuanvideo", "flux"])
@pytest.mark.parametrize("method", ["topk", "psa"])
def test_error_is_bounded_and_grows_as_density_falls(pipes, family, method):
    pipe, dense = pipes(family)
    errors = []
    for density in (0.6, 0.3, 0.1):
        with apply_sparse_attention(pipe, method=method, density=density, **BLOCK) as handle:
            out = call(pipe, family)
            work = handle.stats().sparse_work
        assert abs(work - density) < 0.1
        errors.append((out - dense).abs().mean().item())
    assert 0 < errors[0] < errors[1] < errors[2] < 0.1, errors


def test_topp_mass_controls_density_on_wan(pipes):
    pipe, dense = pipes("wan")
    works, errors = [], []
    for p in (0.99, 0.9, 0.6):
        with apply_sparse_attention(pipe, method="topp", p=p, **BLOCK) as handle:
            errors.append((call(pipe, "wan") - dense).abs().mean().item())
            works.append(handle.stats().sparse_work)
    assert works[0] > works[1] > works[2] and errors[0] < errors[2], (works, errors)


def test_warmup_dense_layers_and_pattern_reuse_on_wan(pipes):
    pipe, _ = pipes("wan")  # 3 layers, sequential CFG: 2 denoiser calls per step
    handle = apply_sparse_attention(pipe, method="topk", density=0.5, warmup_steps=0.5, dense_layers=1,
                                    reuse_steps=2, **BLOCK)  # fmt: skip
    call(pipe, "wan", steps=4)
    stats = handle.stats()
    handle.remove()
    assert stats.dense_calls == {
        "dense_layer": 4 * 2 * 1,
        "warmup": 2 * 2 * 2,
    }  # layer 0 always, others in warm-up
    assert stats.sparse_calls == 2 * 2 * 2  # steps 2, 3 x 2 branches x layers 1, 2
    assert stats.patterns_selected == 2 * 2 and stats.patterns_reused == 2 * 2  # step 3 reuses step 2's


def test_fraction_warmup_without_a_scheduler_says_what_to_do():
    pipe = tiny_pipeline("wan")
    handle = apply_sparse_attention(pipe.transformer, method="topk", density=0.5, warmup_steps=0.3, **BLOCK)
    x = torch.randn(1, 4, 3, 8, 8)
    with pytest.raises(DifcacheError, match="int count"):
        pipe.transformer(x, timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, 6, 32))
    handle.remove()


def test_composes_with_taylorseer_in_both_removal_orders(pipes):
    pipe, dense = pipes("wan")
    for first_removed in ("cache", "sparse"):
        cache = difcache.apply_cache(pipe, "taylorseer")
        sparse = apply_sparse_attention(pipe, method="psa", density=0.5, **BLOCK)
        out = call(pipe, "wan", steps=6)
        cache_stats, sparse_stats = cache.stats(), sparse.stats()
        assert sparse_stats.sparse_calls > 0 and torch.isfinite(out).all()
        assert str(cache_stats) and str(sparse_stats)
        handles = (cache, sparse) if first_removed == "cache" else (sparse, cache)
        handles[0].remove()
        call(pipe, "wan")
        handles[1].remove()
        assert torch.equal(call(pipe, "wan"), dense)


def test_unsupported_model_and_double_apply_fail_clearly(pipes):
    with pytest.raises(DifcacheError, match="does not support DiTTransformer2DModel"):
        apply_sparse_attention(tiny_pipeline("dit"), method="topp")
    pipe, _ = pipes("ltx")
    handle = apply_sparse_attention(pipe, method="topp", **BLOCK)
    with pytest.raises(DifcacheError, match="remove"):
        apply_sparse_attention(pipe, method="topp")
    handle.remove()
    with pytest.raises(DifcacheError, match="fields are"):
        apply_sparse_attention(pipe, method="topp", sparsity=0.8)


def test_foreign_processor_is_refused():
    pipe = tiny_pipeline("wan")
    pipe.transformer.blocks[0].attn1.set_processor(object())
    with pytest.raises(DifcacheError, match="default"):
        apply_sparse_attention(pipe, method="topp")


def test_reference_backend_agrees_with_torch_backend(pipes):
    pipe, _ = pipes("hunyuanvideo")
    outs = []
    for backend in ("torch", "reference"):
        with apply_sparse_attention(pipe, method="psa", density=0.4, backend=backend, **BLOCK):
            outs.append(call(pipe, "hunyuanvideo"))
    assert (outs[0] - outs[1]).abs().max() < 1e-5
