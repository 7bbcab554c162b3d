"""Pattern selection, the block-list format, tiling, and config validation."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difcache.attention import BlockPattern, SparseAttentionConfig
from difcache.attention.patterns import (
    SKIP,
    budget_blocks,
    pooled_block_scores,
    psa_level_counts,
    psa_levels_by_budget,
    psa_levels_by_mass,
    topk_mask,
    topp_mask,
)
from difcache.attention.reorder import first_frame_blocks, from_tiles, tile_permutation, to_tiles
from difcache.attention.runtime import merge_partials, select_pattern
from difcache.kernels import block_sparse_attention_reference

torch.set_num_threads(1)


def probs(b=2, h=3, m=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, h, m, m, generator=g) * 3, dim=-1)


@pytest.mark.parametrize("p", [0.3, 0.7, 0.9, 0.99])
def test_topp_keeps_the_fewest_blocks_reaching_p(p):
    pr = probs()
    mask = topp_mask(pr, p)
    kept_mass = (pr * mask).sum(-1)
    assert (kept_mass >= p - 1e-6).all()
    # dropping the smallest kept block falls below p: the set is minimal
    smallest = torch.where(mask, pr, float("inf")).amin(-1)
    assert ((kept_mass - smallest) < p + 1e-6).all()


def test_topp_min_blocks_forced_and_one_is_all():
    pr = probs()
    forced = torch.eye(9, dtype=torch.bool).expand_as(pr)
    mask = topp_mask(pr, 0.01, min_blocks=3, forced=forced)
    assert (mask.sum(-1) >= 3).all() and mask[forced].all()
    assert topp_mask(pr, 1.0).all()


def test_topk_budget_exact_and_highest_mass():
    pr = probs()
    mask = topk_mask(pr, 4)
    assert (mask.sum(-1) == 4).all()
    assert (torch.where(mask, pr, 2.0).amin(-1) >= torch.where(mask, -1.0, pr).amax(-1)).all()
    assert (
        budget_blocks(0.15, 64) == 10
        and budget_blocks(0.001, 64, min_blocks=2) == 2
        and budget_blocks(1.0, 7) == 7
    )


@pytest.mark.parametrize("density", [0.05, 0.15, 0.25, 0.5, 0.9, 1.0])
def test_psa_budget_spends_the_density_and_covers_at_most_all(density):
    m = 64
    counts = psa_level_counts(density, m)
    work = sum(c * 2.0**-lv for lv, c in enumerate(counts)) / m
    assert sum(counts) <= m
    assert abs(work - density) < 2.5 / m
    levels = psa_levels_by_budget(probs(m=m), density)
    assert ((levels != SKIP).sum(-1) == sum(counts)).all()
    if density == 1.0:
        assert (levels == 0).all()


def test_psa_levels_follow_mass_rank():
    pr = probs(m=16)
    levels = psa_levels_by_mass(pr, (0.4, 0.6, 0.8, 0.9))
    ordered = pr.argsort(-1, descending=True)
    ranked_levels = levels.gather(-1, ordered).float()
    ranked_levels[ranked_levels == SKIP] = 99
    assert (ranked_levels.diff(dim=-1) >= 0).all()  # coarser (or skipped) as mass falls
    assert (levels.gather(-1, ordered[..., :1]) == 0).all()
    assert (psa_levels_by_mass(pr, (1.0, 1.0, 1.0, 1.0)) == 0).all()


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 12), seed=st.integers(0, 1000), pyramid=st.booleans())
def test_block_pattern_round_trips_level_maps(m, seed, pyramid):
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(-1, 4 if pyramid else 1, (2, 2, m, m), generator=g).to(torch.int8)
    pattern = BlockPattern.from_level_map(levels, 16, m * 16 - 3, pyramid=pyramid)
    assert torch.equal(pattern.level_map(), levels)
    assert torch.equal(pattern.kv_cnt, (levels != SKIP).sum(-1).int())
    listed = torch.arange(pattern.kv_idx.shape[-1]) < pattern.kv_cnt[..., None]
    padded = torch.where(listed, pattern.kv_idx, 10**6 + torch.arange(pattern.kv_idx.shape[-1]))
    assert (padded.diff(dim=-1) > 0).all()  # listed blocks ascending, padding after them
    expected_work = torch.where(levels == SKIP, 0.0, 2.0 ** -levels.float().clamp_min(0)).mean()
    torch.testing.assert_close(pattern.work(), expected_work)


def test_pooled_scores_find_the_planted_block():
    q = torch.zeros(1, 1, 64, 8)
    k = torch.zeros(1, 1, 64, 8)
    q[..., 0] = 5.0
    k[:, :, 32:48, 0] = 5.0  # only key block 2 (of 16 tokens) aligns with the queries
    pr = pooled_block_scores(q, k, 16)
    assert (pr.argmax(-1) == 2).all()
    torch.testing.assert_close(pr.sum(-1), torch.ones(1, 1, 4))


@settings(max_examples=30, deadline=None)
@given(
    t=st.integers(1, 5),
    h=st.integers(1, 11),
    w=st.integers(1, 11),
    tile=st.sampled_from([(2, 8, 8), (1, 4, 4), (2, 3, 5)]),
)
def test_tiling_is_a_bijection_and_inverts_exactly(t, h, w, tile):
    perm, inverse = tile_permutation((t, h, w), tile)
    n = t * h * w
    assert torch.equal(perm.sort().values, torch.arange(n))
    x = torch.randn(2, 3, n, 4)
    assert torch.equal(from_tiles(to_tiles(x, perm), inverse), x)


def test_tiles_group_space_time_neighbourhoods():
    perm, _ = tile_permutation((4, 16, 16), (2, 8, 8))
    first = perm[:128]
    t, hw = first // 256, first % 256
    assert set(t.tolist()) == {0, 1} and (hw // 16).max() < 8 and (hw % 16).max() < 8
    sink = first_frame_blocks((4, 16, 16), perm, 128, 8)
    assert sink.tolist() == [True] * 4 + [False] * 4  # the four tiles of frames 0-1


def test_merge_partials_is_the_softmax_over_the_union():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 32, 8, generator=g) for _ in range(3))
    cnt_a = torch.tensor([[[1, 1]]], dtype=torch.int32)
    idx_a = torch.tensor([[[[0], [0]]]], dtype=torch.int32)
    idx_b = torch.tensor([[[[1], [1]]]], dtype=torch.int32)
    oa, la = block_sparse_attention_reference(q, k, v, idx_a, cnt_a, 16)
    ob, lb = block_sparse_attention_reference(q, k, v, idx_b, cnt_a, 16)
    merged = merge_partials(oa, la, ob, lb)
    torch.testing.assert_close(merged, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_select_pattern_density_one_lists_everything():
    q, k = torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16)
    for cfg in (
        SparseAttentionConfig(method="topk", density=1.0, block_size=16),
        SparseAttentionConfig(method="topp", p=1.0, block_size=16),
        SparseAttentionConfig(method="psa", density=1.0, block_size=16),
    ):
        pattern = select_pattern(cfg, q, k)
        assert (pattern.kv_cnt == 7).all() and pattern.work().item() == 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(method="dense"), "method"),
        (dict(method="topk"), "density"),
        (dict(method="topk", density=0.0), "density"),
        (dict(method="topp", p=1.5), "`p`"),
        (dict(method="topp", density=0.2), "density"),
        (dict(method="psa", p=0.9), "`p`"),
        (dict(block_size=48), "block_size"),
        (dict(block_size=True), "block_size"),
        (dict(warmup_steps=1.5), "warmup_steps"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(dense_layers=-1), "dense_layers"),
        (dict(reuse_steps=0), "reuse_steps"),
        (dict(tile=(2, 8)), "tile"),
        (dict(psa_thresholds=(0.9, 0.5, 0.6, 0.7)), "psa_thresholds"),
        (dict(backend="cuda"), "backend"),
        (dict(min_blocks=0), "min_blocks"),
    ],
)
def test_config_names_the_bad_field(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SparseAttentionConfig(**kwargs)


def test_config_defaults_and_warmup_resolution():
    cfg = SparseAttentionConfig()
    assert cfg.method == "topp" and cfg.p == 0.9
    assert SparseAttentionConfig(warmup_steps=0.2).warmup_count(50) == 10
    assert SparseAttentionConfig(warmup_steps=3).warmup_count(None) == 3
    assert SparseAttentionConfig(warmup_steps=0.2).warmup_count(None) is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.p = 0.5
