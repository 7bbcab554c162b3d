"""Sparse attention on the tiny offline pipelines of every supported family.

Sizes give each tiny model 192-1536 video tokens, so 16-token blocks (and SVG2's 16-32-token clusters) leave
real choices: every test here has many blocks per row.
"""

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

SIZES = {
    "wan": dict(height=64, width=64),  # grid 6 x 16 x 16
    "hunyuanvideo": dict(height=32, width=32, num_frames=9),  # 3 x 16 x 16, text padded
    "cogvideox": dict(height=128, width=128),  # 3 x 8 x 8 after the text
    "ltx": dict(height=64, width=64),
    "flux": dict(height=64, width=64),
}
BLOCK = dict(block_size=16)
EVERYWHERE = dict(warmup_steps=0, dense_layers=0)  # sparse on every step and layer (defaults keep some dense)
SVG2 = dict(q_cluster_size=32, k_cluster_size=16)
VIDEO_FAMILIES = ["wan", "hunyuanvideo", "cogvideox"]
CPP = "cpp" if cpu_extension.load() is not None else "torch"  # the automatic CPU kernels


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


def mean_error(out, ref):
    return (out - ref).abs().mean().item()


@pytest.mark.parametrize("family", list(SIZES))
def test_density_one_is_dense_and_removal_is_bit_exact(pipes, family):
    pipe, dense = pipes(family)
    for method, settings in (
        ("topk", dict(density=1.0, **BLOCK)),
        ("topp", dict(p=1.0, **BLOCK)),
        ("psa", dict(density=1.0, **BLOCK)),
        ("svg2", dict(p=1.0, **SVG2)),
    ):
        handle = apply_sparse_attention(pipe, method, **EVERYWHERE, **settings)
        out = call(pipe, family)
        stats = handle.stats()
        handle.remove()
        assert stats.sparse_calls > 0 and not stats.dense_calls, stats
        assert (out - dense).abs().max() <= 1e-5, method
    assert torch.equal(call(pipe, family), dense)


@pytest.mark.parametrize("family", list(SIZES))
def test_full_pattern_through_the_sparse_kernels_matches_dense(pipes, family, monkeypatch):
    """With the dense shortcut off, a full pattern goes through tiling, the kernels and the text merge."""
    monkeypatch.setattr(SparseRuntime, "DENSE_SHORTCUT", False)
    pipe, dense = pipes(family)
    cases = (
        ("topk", dict(density=1.0, **BLOCK), CPP),
        ("psa", dict(density=1.0, **BLOCK), "torch"),
        ("svg2", dict(p=1.0, **SVG2), CPP),
    )
    for method, settings, kernel in cases:
        with apply_sparse_attention(pipe, method, **EVERYWHERE, **settings) as handle:
            out = call(pipe, family)
            assert handle.stats().backends == {kernel: handle.stats().sparse_calls}
        assert (out - dense).abs().max() <= 5e-5, method


@pytest.mark.parametrize("family", ["wan", "hunyuanvideo", "flux"])
@pytest.mark.parametrize("method", ["topk", "psa"])
def test_error_is_bounded_and_grows_as_density_falls(pipes, family, method):
    pipe, dense = pipes(family)
    errors = []
    for density in (0.6, 0.3, 0.1):
        with apply_sparse_attention(pipe, method, density=density, **EVERYWHERE, **BLOCK) as handle:
            out = call(pipe, family)
            work = handle.stats().sparse_work
        assert abs(work - density) < 0.1
        errors.append(mean_error(out, dense))
    assert 0 < errors[0] < errors[1] < errors[2] < 0.1, errors


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_svg2_error_is_bounded_and_grows_as_the_budget_falls(pipes, family):
    pipe, dense = pipes(family)
    errors, works = [], []
    for density in (0.6, 0.3, 0.1):
        with apply_sparse_attention(pipe, "svg2", density=density, **SVG2, **EVERYWHERE) as handle:
            out = call(pipe, family)
            stats = handle.stats()
        works.append(stats.sparse_work)
        errors.append(mean_error(out, dense))
        assert stats.backends == {CPP: stats.sparse_calls} and stats.search_cost > 0
    assert works[0] > works[1] > works[2] and works[2] < 0.35, works  # clusters: the budget is met roughly
    assert 0 < errors[0] < errors[1] < errors[2] < 0.1, errors


def test_svg2_top_p_controls_work_and_warm_starts_its_clusters(pipes):
    pipe, dense = pipes("wan")
    works = []
    for p in (0.99, 0.7):
        with apply_sparse_attention(pipe, "svg2", p=p, **SVG2, **EVERYWHERE) as handle:
            call(pipe, "wan", steps=3)
            stats = handle.stats()
            state = next(iter(handle._runtime._state.values()))
        works.append(stats.sparse_work)
        assert stats.patterns_selected == 3 * 2 * 3  # every step, both CFG branches, 3 layers
        q_centroids, k_centroids = state["centroids"]
        assert q_centroids.shape[1] == 1536 // 32 and k_centroids.shape[1] == 1536 // 16
    assert works[0] > works[1]


def test_topp_mass_controls_density_on_wan(pipes):
    pipe, dense = pipes("wan")
    works, errors = [], []
    for p in (0.99, 0.9, 0.6):
        with apply_sparse_attention(pipe, "topp", p=p, **EVERYWHERE, **BLOCK) as handle:
            errors.append(mean_error(call(pipe, "wan"), dense))
            works.append(handle.stats().sparse_work)
    assert works[0] > works[1] > works[2] and errors[0] < errors[2], (works, errors)


def test_sparse_attention_is_dense_on_the_warm_up_steps_by_default(pipes):
    pipe, _ = pipes("wan")  # 3 layers, sequential CFG: 2 denoiser calls per step
    with apply_sparse_attention(pipe, "topk", **BLOCK) as handle:
        call(pipe, "wan", steps=8)
        stats = handle.stats()
        config = handle.config
    assert config.warmup_steps == 0.25 and config.dense_layers == 0.025  # Sparse VideoGen's defaults
    # first quarter of the 8 steps (2 steps) dense everywhere; layer 0 (ceil(0.025 * 3) = 1 layer) always dense
    assert stats.dense_calls == {"warmup": 2 * 2 * 2, "dense_layer": 8 * 2 * 1}
    assert stats.sparse_calls == 6 * 2 * 2


def test_warmup_dense_layers_and_pattern_reuse_on_wan(pipes):
    pipe, _ = pipes("wan")
    handle = apply_sparse_attention(pipe, "topk", density=0.5, warmup_steps=0.5, dense_layers=1, reuse_steps=2,
                                    **BLOCK)  # fmt: skip
    call(pipe, "wan", steps=4)
    stats = handle.stats()
    handle.remove()
    assert stats.dense_calls == {"dense_layer": 4 * 2 * 1, "warmup": 2 * 2 * 2}  # layer 0 always, others warm-up
    assert stats.sparse_calls == 2 * 2 * 2  # steps 2, 3 x 2 branches x layers 1, 2
    assert stats.patterns_selected == 2 * 2 and stats.patterns_reused == 2 * 2  # step 3 reuses step 2's


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("method", ["topk", "svg2"])
def test_search_steps_reuse_the_pattern_between_searches(pipes, family, method):
    """AdaSpa's schedule as a setting of any selector: search at the listed steps, reuse in between."""
    pipe, dense = pipes(family)
    calls_per_step = 2 if family != "cogvideox" else 1  # sequential CFG (Wan, HunyuanVideo) or batched
    layers = {"wan": 3, "hunyuanvideo": 4, "cogvideox": 3}[family]
    settings = dict(density=0.4, **BLOCK) if method == "topk" else dict(density=0.4, **SVG2)
    with apply_sparse_attention(pipe, method, search_steps=(1, 4), **{**settings, **EVERYWHERE}) as handle:
        out = call(pipe, family, steps=6)
        stats = handle.stats()
    per_step = calls_per_step * layers
    assert stats.dense_calls == {"before_search": 1 * per_step}  # step 0 comes before the first search
    assert stats.patterns_selected == 2 * per_step and stats.patterns_reused == 3 * per_step  # steps 2, 3, 5 reuse
    assert 0 < mean_error(out, dense) < 0.1
    with apply_sparse_attention(pipe, method, search_steps=(0.2, 0.6), **{**settings, **EVERYWHERE}) as handle:
        call(pipe, family, steps=6)  # fractions of 6 steps: steps 1 and 3
        assert handle.stats().patterns_selected == 2 * per_step
    assert torch.equal(call(pipe, family, steps=3), dense)  # removal is exact


def test_adaspa_searches_exactly_at_its_steps_and_spreads_the_budget(pipes):
    pipe, dense = pipes("wan")
    with apply_sparse_attention(pipe, "adaspa", density=0.3, dense_layers=0, **BLOCK) as handle:
        out = call(pipe, "wan", steps=10)  # defaults: dense until step 2, exact searches at steps 2 and 6
        stats = handle.stats()
        patterns = [c.selection.pattern for c in handle._runtime._patterns.values()]
    per_step = 2 * 3
    assert stats.dense_calls == {"warmup": 2 * per_step, "search": 2 * per_step}  # a search step runs dense
    assert stats.sparse_calls == 6 * per_step and stats.patterns_reused == 6 * per_step
    assert stats.search_cost == pytest.approx(2 * per_step * 1.5)  # the dense pass plus one pass over the scores
    assert abs(stats.sparse_work - 0.3) < 0.1 and 0 < mean_error(out, dense) < 0.1
    counts = torch.stack([p.kv_cnt.float().mean(dim=-1) for p in patterns])  # [patterns, B, H]: blocks per head
    assert (counts.std(dim=-1) > 0).any()  # head-adaptive: heads get different budgets


def test_estimators_give_patterns_close_to_dense(pipes):
    pipe, dense = pipes("hunyuanvideo")
    for estimator, extra in (("pooled", {}), ("pooled", {"sim_threshold": 0.5}), ("sampled", {})):
        with apply_sparse_attention(pipe, "topk", density=0.4, estimator=estimator, **extra, **EVERYWHERE, **BLOCK):
            assert 0 < mean_error(call(pipe, "hunyuanvideo"), dense) < 0.1, estimator


def test_tiles_the_grid_does_not_divide_are_padded_into_whole_blocks(monkeypatch):
    """Wan at 48 x 80 pixels has a 6 x 12 x 20 grid: 2 x 8 x 8 tiles leave 4-wide and 4-high edge tiles."""
    monkeypatch.setattr(SparseRuntime, "DENSE_SHORTCUT", False)
    pipe = tiny_pipeline("wan")
    pipe.set_progress_bar_config(disable=True)
    size = dict(height=48, width=80)
    kwargs = {**_call_kwargs("wan", cfg=True, num_inference_steps=2), **size}
    dense = output_of(pipe(**kwargs))
    for method, settings in (("topk", dict(density=1.0)), ("psa", dict(density=1.0)), ("topk", dict(density=0.3))):
        with apply_sparse_attention(pipe, method, **settings, block_size=128, **EVERYWHERE) as handle:
            out = output_of(pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}))
            stats = handle.stats()
        assert stats.sparse_calls == 2 * 2 * 3
        if settings["density"] == 1.0:
            assert (out - dense).abs().max() <= 5e-5, method
        else:
            assert 0 < mean_error(out, dense) < 0.1 and stats.sparse_work < 0.6


def test_fraction_warmup_without_a_scheduler_says_what_to_do():
    pipe = tiny_pipeline("wan")
    handle = apply_sparse_attention(pipe.transformer, "topk", density=0.5, warmup_steps=0.3, **BLOCK)
    x = torch.randn(1, 4, 3, 8, 8)
    with pytest.raises(DifcacheError, match="int count"):
        pipe.transformer(x, timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, 6, 32))
    handle.remove()


@pytest.mark.parametrize("method", ["psa", "svg2", "topk"])
def test_composes_with_taylorseer_in_both_removal_orders(pipes, method):
    pipe, dense = pipes("wan")
    settings = {
        "psa": dict(density=0.5, **BLOCK),
        "svg2": dict(p=0.9, **SVG2),
        "topk": dict(density=0.5, search_steps=(1, 3), **BLOCK),  # search-then-reuse under a cache
    }[method]
    for first_removed in ("cache", "sparse"):
        cache = difcache.apply_cache(pipe, "taylorseer")
        sparse = apply_sparse_attention(pipe, method, **{**EVERYWHERE, **settings})
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
        apply_sparse_attention(tiny_pipeline("dit"), "topp")
    pipe, _ = pipes("ltx")
    handle = apply_sparse_attention(pipe, "topp", **BLOCK)
    with pytest.raises(DifcacheError, match="remove"):
        apply_sparse_attention(pipe, "topp")
    handle.remove()
    with pytest.raises(DifcacheError, match="fields are"):
        apply_sparse_attention(pipe, "topp", sparsity=0.8)
    with pytest.raises(DifcacheError, match=r"TopKSparseConfig.density must be > 0 and <= 1, got 1.5"):
        apply_sparse_attention(pipe, "topk", density=1.5)
    with pytest.raises(DifcacheError, match="registered: adaspa, psa, svg2, topk, topp"):
        apply_sparse_attention(pipe, "sparge")


def test_foreign_processor_is_refused():
    pipe = tiny_pipeline("wan")
    pipe.transformer.blocks[0].attn1.set_processor(object())
    with pytest.raises(DifcacheError, match="default"):
        apply_sparse_attention(pipe, "topp")


def test_reference_backend_agrees_with_torch_backend(pipes):
    pipe, _ = pipes("hunyuanvideo")
    outs = []
    for backend in ("torch", "reference"):
        with apply_sparse_attention(pipe, "psa", density=0.4, backend=backend, **EVERYWHERE, **BLOCK):
            outs.append(call(pipe, "hunyuanvideo"))
    assert (outs[0] - outs[1]).abs().max() < 1e-5
    outs = []
    for backend in ("cpp", "torch", "reference") if CPP == "cpp" else ("torch", "reference"):
        with apply_sparse_attention(pipe, "svg2", p=0.8, backend=backend, **SVG2, **EVERYWHERE):
            outs.append(call(pipe, "hunyuanvideo"))
    assert all((o - outs[-1]).abs().max() < 1e-5 for o in outs)
