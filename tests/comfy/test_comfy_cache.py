"""difcache Apply Cache / Sparse Attention on ComfyUI-style models, sampled the way ComfyUI's guider does.

Uses the stand-ins of ``comfy_standins.py`` (ComfyUI itself is not installable in CI): a ModelPatcher with keyed
wrappers, a guider/sampler loop calling them as ComfyUI does, and tiny Flux / WanModel / UNetModel.
"""

import copy
import logging
import sys

import comfy_standins as S
import pytest
import torch

from difcache.comfy.nodes import APPLY_CACHE, SPARSE_ATTENTION
from difcache.comfy.patching import CACHE_KEY, SPARSE_KEY, CacheSpec, patch_cache, patch_sparse_attention
from difcache.errors import DifcacheError

FAMILIES = ("flux", "wan", "unet")
torch.set_num_threads(1)


def apply(patcher, method="taylorseer", **settings):
    return APPLY_CACHE.run(model=patcher, method=method, **settings)[0]


def last_stats(patcher):
    return patcher.wrappers[S.OUTER_SAMPLE][CACHE_KEY][0].last_stats


def rel_err(out, ref, family, shape=None):
    """Relative error of what the sampler added to the noise (the noise itself would dilute any difference)."""
    noise = S.inputs(family, shape=shape)[0]
    return ((out - ref).norm() / (ref - noise).norm()).item()


def leftovers(model):
    """Attributes difcache's hooks could leave on the shared modules."""
    names = ("forward", "_diffusers_hook", "_difcache_step_tracker", "_difcache_cache")
    return [(n, a) for n, m in model.named_modules() for a in names if a in vars(m)]


@pytest.mark.parametrize("family", FAMILIES)
def test_fewer_units_computed_output_close(family):
    base = S.make_patcher(family)
    model = base.model.diffusion_model
    ref = S.sample(base, family, steps=12)
    full = S.computed(model)
    patched = apply(base)
    out = S.sample(patched, family, steps=12)
    cached = S.computed(model) - full
    stats = last_stats(patched)
    assert cached < full / 2  # measured by the model's own counters, not by difcache
    assert stats.totals()["forecast"] > 0 and stats.totals()["compute"] == cached and stats.calls == 12
    err = rel_err(out, ref, family)
    stale = S.sample(apply(base, "fora", interval=100), family, steps=12)  # features of step 0 reused throughout
    assert err < 0.1 and rel_err(stale, ref, family) > 2.5 * err
    assert leftovers(model) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_always_compute_is_bit_identical(family):
    base = S.make_patcher(family)
    ref = S.sample(base, family, steps=6)
    assert torch.equal(S.sample(apply(base, "always_compute"), family, steps=6), ref)


def test_input_patcher_untouched_and_model_clean_after_runs():
    base = S.make_patcher("flux")
    options, wrappers = copy.deepcopy(base.model_options), copy.deepcopy(base.wrappers)
    ref = S.sample(base, "flux", steps=8)
    patched = apply(base, interval=2)
    S.sample(patched, "flux", steps=8)
    assert base.model_options == options and base.wrappers == wrappers
    assert base.model is patched.model  # shared, as in ComfyUI: hooks exist only while `patched` samples
    assert leftovers(base.model) == []
    assert torch.equal(S.sample(base, "flux", steps=8), ref)


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_state_reset_between_runs_and_step_counts(family):
    base = S.make_patcher(family)
    patched = apply(base)
    first, second = S.sample(patched, family, steps=12), S.sample(patched, family, steps=12)
    assert torch.equal(first, second)
    short = S.sample(patched, family, steps=7)
    assert torch.equal(short, S.sample(apply(S.make_patcher(family)), family, steps=7))
    stats = last_stats(patched)
    assert (stats.calls, stats.runs) == (7, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_cond_uncond_batched_or_split_each_keep_their_features(family):
    base = S.make_patcher(family)
    ref = S.sample(base, family, steps=12, batch="split")
    patched = apply(base)
    split = S.sample(patched, family, steps=12, batch="split")
    assert last_stats(patched).calls == 24 and last_stats(patched).totals()["forecast"] > 0
    assert rel_err(split, ref, family) < 0.1
    batched = S.sample(patched, family, steps=12, batch="batched")
    assert rel_err(batched, split, family) < 1e-4  # same features per cond, whether or not they share a call


def test_heun_second_evaluations_run_and_cache():
    base = S.make_patcher("wan")
    ref = S.sample(base, "wan", steps=10, sampler="heun")
    patched = apply(base)
    out = S.sample(patched, "wan", steps=10, sampler="heun")
    stats = last_stats(patched)
    assert stats.calls == 19 and stats.totals()["forecast"] > 0
    assert rel_err(out, ref, "wan") < 0.1


def test_stacks_with_other_keyed_wrappers():
    calls = {"outer": 0, "model": 0}

    def other_outer(executor, *args, **kwargs):
        calls["outer"] += 1
        return executor(*args, **kwargs)

    def other_model(executor, *args, **kwargs):
        calls["model"] += 1
        return executor(*args, **kwargs) * 1.0

    base = S.make_patcher("flux")
    alone = S.sample(apply(base), "flux", steps=8)
    before = base.clone()  # another node pack's wrappers applied before difcache...
    before.add_wrapper_with_key(S.OUTER_SAMPLE, "other", other_outer)
    before.add_wrapper_with_key(S.DIFFUSION_MODEL, "other", other_model)
    patched = apply(before)
    after = patched.clone()  # ...and after it
    after.add_wrapper_with_key(S.OUTER_SAMPLE, "other_after", other_outer)
    out = S.sample(after, "flux", steps=8)
    assert torch.equal(out, alone)
    assert calls == {"outer": 2, "model": 8}
    assert last_stats(after).totals()["forecast"] > 0


def test_apply_again_replaces_instead_of_stacking():
    base = S.make_patcher("flux")
    twice = apply(apply(base, "taylorseer"), "fora", interval=2)
    assert len(twice.wrappers[S.OUTER_SAMPLE][CACHE_KEY]) == 1
    assert len(twice.wrappers[S.DIFFUSION_MODEL]["difcache_steps"]) == 1
    S.sample(twice, "flux", steps=8)
    assert last_stats(twice).method == "fora"


def test_percent_window_computes_everything_outside_it():
    base = S.make_patcher("flux")
    full = apply(base, "fora", interval=2)
    windowed = apply(base, "fora", interval=2, start_percent=0.5)
    S.sample(full, "flux", steps=10)
    S.sample(windowed, "flux", steps=10)
    # FORA(2) over 10 steps reuses steps 2, 4, 6, 8; sigma <= 0.5 (the window) starts at step 5: 6, 8 remain.
    assert last_stats(full).totals()["reuse"] == 4 * 5
    assert last_stats(windowed).totals()["reuse"] == 2 * 5


def test_settings_the_method_lacks_are_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="difcache.comfy"):
        patched = apply(S.make_patcher("wan"), "fora", interval=2, order=3)
    assert "order" in caplog.text
    assert patched.wrappers[S.OUTER_SAMPLE][CACHE_KEY][0].spec.overrides == (("interval", 2),)


def test_errors_name_the_problem_and_the_fix():
    base = S.make_patcher("flux")
    with pytest.raises(DifcacheError, match="taylorseer"):
        patch_cache(base, CacheSpec("teacache"))  # caches block ranges: not offered in ComfyUI
    with pytest.raises(DifcacheError, match="interval"):
        apply(base, "fora", interval=0)
    with pytest.raises(DifcacheError, match="end_percent"):
        apply(base, start_percent=0.6, end_percent=0.4)
    other = S.ModelPatcher(S.BaseModel(torch.nn.Linear(2, 2)))
    with pytest.raises(DifcacheError, match="no ComfyUI adapter for Linear.*register_comfy_adapter"):
        apply(other)
    assert base.wrappers == {}


# ---------------------------------------------------------------------------------------------- sparse attention
VIDEO = (1, 4, 4, 8, 8)  # 256 video tokens: 16 blocks of 16
OVERRIDE = "optimized_attention_override"


def sparse(patcher, method="topk", **settings):
    """Sparse attention on every step and block unless the test says otherwise."""
    return patch_sparse_attention(patcher, method, **{"block_size": 16, "backend": "torch", "warmup_steps": 0,
                                                      "dense_layers": 0, **settings})  # fmt: skip


def sparse_stats(patcher):
    return patcher.wrappers[S.OUTER_SAMPLE][SPARSE_KEY][0].last_stats


def test_sparse_attention_saves_work_and_a_dense_pattern_is_exact():
    base = S.make_patcher("wan")
    ref = S.sample(base, "wan", steps=6, shape=VIDEO)
    dense = S.sample(sparse(base, "topp", p=1.0), "wan", steps=6, shape=VIDEO)
    assert torch.allclose(dense, ref, atol=1e-5)
    patched = sparse(base, "topk", density=0.25, warmup_steps=2)
    out = S.sample(patched, "wan", steps=6, shape=VIDEO)
    stats = sparse_stats(patched)
    assert stats.sparse_calls == 4 * 3 and stats.dense_calls == {"warmup": 2 * 3}  # 3 blocks, batched cond+uncond
    assert stats.attention_work < 0.6 and 0 < rel_err(out, ref, "wan", VIDEO) < 0.5
    self_attn = [b.self_attn for b in base.model.diffusion_model.blocks]
    assert all(not a._forward_pre_hooks and not a._forward_hooks for a in self_attn)
    assert not base.model.diffusion_model._forward_pre_hooks and leftovers(base.model) == []
    assert base.model_options == {"transformer_options": {}} and base.wrappers == {} and base.callbacks == {}


def test_sparse_attention_chains_an_override_that_was_there_before():
    seen = []

    def other(func, *args, **kwargs):
        seen.append(args[1].shape[1])  # key length: 4 text tokens for cross-attention, 256 for self-attention
        return func(*args, **kwargs)

    base = S.make_patcher("wan")
    base.model_options["transformer_options"][OVERRIDE] = other
    patched = sparse(base, "topk", density=0.25)
    ours = patched.model_options["transformer_options"][OVERRIDE]
    assert ours is not other and ours.difcache_sparse  # installed on top when the node runs, chaining `other`
    assert base.model_options["transformer_options"][OVERRIDE] is other  # the input model is untouched
    S.sample(patched, "wan", steps=3, shape=VIDEO)
    assert seen == [4] * 3 * 3  # only cross-attention reached it; self-attention was sparse
    assert sparse_stats(patched).sparse_calls == 3 * 3


def comfy_style_node(base, take_self_attention_on):
    """A stand-in for ComfyUI's own block-sparse node (comfy_extras/nodes_sparse_attention.py): it chains the
    current override at patch time and re-installs itself on ON_PREPARE_STATE; it takes self-attention on the
    steps in ``take_self_attention_on`` (its sigma window) and hands everything else down the chain."""
    calls = {"taken": 0, "passed": 0}
    installed = []
    step = {"i": -1}

    def install(options):
        current = options.get(OVERRIDE)
        if current in installed:
            return
        previous = current

        def override(func, *args, **kwargs):
            if args[1].shape[1] == 256 and step["i"] in take_self_attention_on:
                calls["taken"] += 1
                return S._attention(*args[:3], kwargs["heads"])
            calls["passed"] += 1
            return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)

        installed.append(override)
        options[OVERRIDE] = override

    def on_prepare_state(patcher, timestep, model_options):
        step["i"] += 1  # the stand-in sampler prepares once per step
        install(model_options["transformer_options"])

    m = base.clone()
    install(m.model_options["transformer_options"])
    m.add_callback_with_key(S.ON_PREPARE_STATE, "block_sparse_attention", on_prepare_state)
    return m, calls


@pytest.mark.parametrize("order", ["difcache_first", "comfy_first"])
def test_sparse_attention_composes_with_comfyuis_block_sparse_node(order):
    base = S.make_patcher("wan")
    if order == "difcache_first":
        patched, calls = comfy_style_node(sparse(base, "topk", density=0.25), take_self_attention_on={0, 1})
    else:
        other, calls = comfy_style_node(base, take_self_attention_on={0, 1})
        patched = sparse(other, "topk", density=0.25)
    out = S.sample(patched, "wan", steps=6, shape=VIDEO)
    stats = sparse_stats(patched)
    assert torch.isfinite(out).all()
    # every self-attention call is made once: by the other node (steps 0, 1 when it is on top) or by difcache
    assert calls["taken"] + stats.sparse_calls == 6 * 3 and stats.sparse_calls >= 4 * 3
    assert leftovers(base.model) == [] and base.model_options == {"transformer_options": {}}


def test_sparse_attention_comes_back_after_a_node_that_replaces_the_override():
    base = S.make_patcher("wan")
    patched = sparse(base, "topk", density=0.25)
    patched.model_options["transformer_options"][OVERRIDE] = lambda func, *a, **kw: func(*a, **kw)  # no chaining
    S.sample(patched, "wan", steps=4, shape=VIDEO)
    assert sparse_stats(patched).sparse_calls == 4 * 3  # re-installed on top on the first ON_PREPARE_STATE


def test_sparse_attention_gates_by_sigma_and_keeps_listed_blocks_and_short_sequences_dense():
    base = S.make_patcher("wan")
    patched = SPARSE_ATTENTION.run(model=base, method="topk", density=0.25, start_percent=0.3, end_percent=1.0,
                                   dense_blocks="1", min_tokens=0)[0]  # fmt: skip
    S.sample(patched, "wan", steps=8, shape=VIDEO)
    stats = sparse_stats(patched)
    window = [s for s in range(8) if S.ModelSamplingFlow().sigmas(8)[s] <= S.ModelSamplingFlow().percent_to_sigma(0.3)]
    assert stats.dense_calls["dense_block"] == 8 and stats.sparse_calls == len(window) * 2
    assert stats.dense_calls["sigma"] == (8 - len(window)) * 2 and 0 < len(window) < 8
    short = SPARSE_ATTENTION.run(model=base, method="psa", min_tokens=1024)[0]  # 256 tokens: dense
    S.sample(short, "wan", steps=3, shape=VIDEO)
    assert sparse_stats(short).sparse_calls == 0 and sparse_stats(short).dense_calls.get("short", 0) > 0


@pytest.mark.parametrize("method", ["svg2", "adaspa", "psa"])
def test_every_method_runs_through_the_node(method):
    base = S.make_patcher("wan")
    video = (1, 4, 4, 16, 32)  # 2048 tokens: 16 blocks of the node's 128
    ref = S.sample(base, "wan", steps=6, shape=video)
    patched = SPARSE_ATTENTION.run(model=base, method=method, density=0.3, p=0.8, start_percent=0.0,
                                   dense_blocks="", min_tokens=0)[0]  # fmt: skip
    out = S.sample(patched, "wan", steps=6, shape=video)
    stats = sparse_stats(patched)
    assert stats.sparse_calls > 0 and stats.sparse_work < 0.8 and 0 < rel_err(out, ref, "wan", video) < 0.5, stats


def test_sparse_attention_stacked_with_the_cache_shares_the_steps():
    base = S.make_patcher("wan")
    node = SPARSE_ATTENTION.run(model=base, method="topk", density=0.5, start_percent=0.0, dense_blocks="",
                                min_tokens=0)[0]  # fmt: skip
    both = APPLY_CACHE.run(model=node, method="fora", interval=2)[0]
    S.sample(both, "wan", steps=6, shape=VIDEO)
    assert last_stats(both).totals()["reuse"] > 0
    computed_self_attn = last_stats(both).units[0].compute * 3  # FORA's schedule is the same for every unit
    assert sparse_stats(both).sparse_calls == computed_self_attn
    assert leftovers(base.model) == [] and base.wrappers == {}


def test_sparse_attention_errors_on_the_node(monkeypatch):
    with pytest.raises(DifcacheError, match="supports ComfyUI's WanModel, not Flux"):
        SPARSE_ATTENTION.run(model=S.make_patcher("flux"), method="psa")
    with pytest.raises(DifcacheError, match="density must be"):
        patch_sparse_attention(S.make_patcher("wan"), "topk", density=0)
    with pytest.raises(DifcacheError, match="'0, 1, 47-49'"):
        SPARSE_ATTENTION.run(model=S.make_patcher("wan"), method="psa", dense_blocks="first")
    monkeypatch.setitem(sys.modules, "difcache.attention.runtime", None)  # as if this install lacked it
    with pytest.raises(DifcacheError, match="sparse attention is not available"):
        SPARSE_ATTENTION.run(model=S.make_patcher("wan"), method="psa")
