"""Pattern selection, the block-list format, tiling, and config validation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difcache.attention import BlockPattern, PSASparseConfig, SVG2SparseConfig, TopKSparseConfig, TopPSparseConfig
from difcache.attention.patterns import (
    SKIP,
    budget_blocks,
    exact_block_mass,
    head_adaptive_counts,
    pooled_block_scores,
    psa_level_counts,
    psa_levels_by_budget,
    psa_levels_by_mass,
    sampled_block_scores,
    topk_mask,
    topp_mask,
)
from difcache.attention.reorder import first_frame_blocks, from_tiles, tile_layout, tile_permutation, to_tiles
from difcache.attention.runtime import merge_partials
from difcache.attention.selectors import select_pattern
from difcache.attention.svg2 import ClusterPattern, kmeans, select_clusters
from difcache.kernels import attention_with_lse, block_sparse_attention_reference

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
    lengths = torch.full((m,), 16.0)
    lengths[-1] = 13.0  # the last block is partial: pairs weigh by their tokens
    weight = torch.outer(lengths, lengths) / lengths.sum() ** 2
    expected_work = (torch.where(levels == SKIP, 0.0, 2.0 ** -levels.float().clamp_min(0)) * weight).sum((-1, -2))
    torch.testing.assert_close(pattern.work(), expected_work.mean())


def test_pooled_scores_find_the_planted_block():
    q = torch.zeros(1, 1, 64, 8)
    k = torch.zeros(1, 1, 64, 8)
    q[..., 0] = 5.0
    k[:, :, 32:48, 0] = 5.0  # only key block 2 (of 16 tokens) aligns with the queries
    pr, forced = pooled_block_scores(q, k, 16)
    assert (pr.argmax(-1) == 2).all() and forced is None
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
        TopKSparseConfig(density=1.0, block_size=16),
        TopPSparseConfig(p=1.0, block_size=16),
        PSASparseConfig(density=1.0, block_size=16),
        TopKSparseConfig(density=1.0, block_size=16, estimator="sampled"),
    ):
        pattern = select_pattern(cfg, q, k).pattern
        assert (pattern.kv_cnt == 7).all() and pattern.dense
        assert pattern.work().item() == pytest.approx(1.0)


def attention_probs(q, k, scale=None):
    return torch.softmax((q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale), dim=-1)


def true_block_mass(q, k, block):
    """Mean over each query block's rows of the attention mass on each key block (the definition)."""
    p = attention_probs(q, k)
    n = q.shape[2]
    m = -(-n // block)
    p = torch.nn.functional.pad(p, (0, m * block - n, 0, m * block - n))
    return p.unflatten(-1, (m, block)).sum(-1).unflatten(2, (m, block)).sum(3) / torch.tensor(
        [min(block, n - i * block) for i in range(m)]
    )[:, None]


def test_exact_block_mass_is_the_true_mass_from_the_lse():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 150, 16, generator=g) for _ in range(3))
    _, lse = attention_with_lse(q, k, v)
    mass = exact_block_mass(q, k, lse, 32, chunk_bytes=64 * 150 * 4)
    torch.testing.assert_close(mass, true_block_mass(q, k, 32), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mass.sum(-1), torch.ones(2, 3, 5), atol=1e-5, rtol=0)


def test_sampled_scores_find_the_planted_block_and_are_reproducible():
    q = torch.zeros(1, 1, 256, 8)
    k = torch.randn(1, 1, 256, 8, generator=torch.Generator().manual_seed(1)) * 0.1
    q[..., 0] = 3.0
    k[:, :, 64:96, 0] = 3.0  # key block 2 of 32 tokens
    pr = sampled_block_scores(q, k, 32)
    assert (pr.argmax(-1) == 2).all()
    torch.testing.assert_close(pr.sum(-1), torch.ones(1, 1, 8))
    assert torch.equal(pr, sampled_block_scores(q, k, 32))


def test_similarity_guard_keeps_blocks_whose_mean_is_no_summary():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 1, 64, 16, generator=g), torch.randn(1, 1, 64, 16, generator=g)
    k[:, :, :16] = k[:, :, :1] + 0.01 * torch.randn(1, 1, 16, 16, generator=g)  # key block 0: self-similar
    q[:, :, :16] = q[:, :, :1]  # query block 0: self-similar
    probs, forced = pooled_block_scores(q, k, 16, sim_threshold=0.5)
    assert forced[0, 0, 1:].all()  # dissimilar query blocks keep every key block
    assert not forced[0, 0, 0, 0] and forced[0, 0, 0, 1:].all()  # dissimilar key blocks are always kept
    assert probs[0, 0, 0, 0] == pytest.approx(1.0)  # the only key block with an estimate takes the mass


def test_head_adaptive_counts_spend_the_budget_where_the_mass_is_spread():
    m = 10
    sharp = torch.zeros(m, m)
    sharp[:, 0] = 1.0  # a head that puts all its mass on one block
    flat = torch.full((m, m), 1.0 / m)  # a head that spreads it evenly
    counts = head_adaptive_counts(torch.stack([sharp, flat])[None], density=0.3)
    assert counts.sum() == 2 * 3 and counts[0, 0] < counts[0, 1]
    assert counts[0, 0] >= 1


def test_tile_layout_packs_whole_tiles_into_blocks():
    grid, tile = (5, 12, 20), (2, 8, 8)  # edge tiles 1 frame deep, 4 high, 4 wide
    layout = tile_layout(grid, tile, 128)
    assert layout.block_len is not None and 0 < layout.padded_fraction < 0.3
    index = torch.nn.functional.pad(layout.index, (0, (-layout.n_padded) % 128), value=-1)
    t, rest = index // (12 * 20), index % (12 * 20)
    tile_id = ((t // 2) * 2 + (rest // 20) // 8) * 3 + (rest % 20) // 8
    blocks = index.view(-1, 128)
    tiles = tile_id.view(-1, 128)
    seen = {}
    for b in range(blocks.shape[0]):
        real = blocks[b] >= 0
        assert real.sum() == layout.block_len[b] and real[: int(real.sum())].all()  # real tokens first
        for tid in tiles[b][real].unique().tolist():
            assert seen.setdefault(tid, b) == b  # a tile never straddles two blocks
    x = torch.randn(1, 2, 5 * 12 * 20, 3)
    padded = layout.gather(x)
    assert torch.equal(layout.scatter(padded), x) and (padded[:, :, layout.index < 0] == 0).all()
    assert tile_layout((4, 16, 16), tile, 128).block_len is None  # divisible: no padding
    frame0 = layout.first_frame_blocks(12 * 20)
    assert frame0.any() and not frame0.all()


def test_kmeans_clusters_and_warm_start():
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(4, 8, generator=g) * 5
    x = (centres.repeat_interleave(50, 0) + 0.1 * torch.randn(200, 8, generator=g))[None]
    labels, centroids, sizes = kmeans(x, 4, iters=10)
    assert sorted(sizes[0].tolist()) == [50, 50, 50, 50]
    assert all(len(labels[0, i * 50 : (i + 1) * 50].unique()) == 1 for i in range(4))
    again, _, _ = kmeans(x, 4, iters=0, init=centroids)
    assert torch.equal(again, labels)


def test_svg2_selection_top_p_budget_and_exact_attention_at_one():
    g = torch.Generator().manual_seed(4)
    qc, kc = torch.randn(2, 5, 8, generator=g), torch.randn(2, 7, 8, generator=g)
    sizes = torch.randint(1, 20, (2, 7), generator=g)
    keep = select_clusters(qc, kc, sizes, 0.5, p=0.8, density=None, min_kc_ratio=0.0)
    weighted = sizes[:, None, :] * torch.exp((qc @ kc.transpose(1, 2)) * 0.5)
    probs = weighted / weighted.sum(-1, keepdim=True)
    kept = (probs * keep).sum(-1)
    smallest = torch.where(keep, probs, float("inf")).amin(-1)
    assert (kept >= 0.8 - 1e-6).all() and ((kept - smallest) < 0.8).all()  # the fewest clusters reaching p
    budget = select_clusters(qc, kc, sizes, 0.5, p=None, density=0.3, min_kc_ratio=0.0)
    tokens = (sizes[:, None, :] * budget).sum(-1)
    assert (tokens >= 0.3 * sizes.sum(-1, keepdim=True)).all()
    q, k, v = (torch.randn(1, 2, 90, 8, generator=g) for _ in range(3))
    pattern = select_pattern(SVG2SparseConfig(p=1.0, q_cluster_size=20, k_cluster_size=10), q, k).pattern
    assert isinstance(pattern, ClusterPattern) and pattern.dense and pattern.work().item() == pytest.approx(1.0)
    for backend in ("reference", "torch"):
        out, lse = pattern.attend(q, k, v, backend, None)
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=0)
    sparse = select_pattern(SVG2SparseConfig(p=0.5, q_cluster_size=20, k_cluster_size=10), q, k).pattern
    assert 0 < sparse.work().item() < 1
    ranges = (sparse.q_start, sparse.q_len)
    assert torch.equal(ranges[0][..., 1:], (ranges[0] + ranges[1])[..., :-1])  # clusters tile the permutation


class _Tracker:
    """What SparseRuntime reads from difcache's step tracker: ``info`` and ``on_new_run``."""

    def __init__(self):
        from difcache.engine.steps import StepInfo

        self.info = StepInfo(run=0, step=5, num_steps=10, branch="cond", call_in_step=0)

    def on_new_run(self, callback):
        return lambda: None


@pytest.mark.parametrize("text_first", [True, False])
def test_text_keys_merge_exactly_with_the_attentions_own_scale(monkeypatch, text_first):
    """Video queries over a full pattern plus dense text keys (fused kernel, LSE merge) equal one softmax over all
    keys at the scale given, with padded text keys masked; both token layouts (text before or after the video)."""
    from difcache.attention.runtime import SparseRuntime

    monkeypatch.setattr(SparseRuntime, "DENSE_SHORTCUT", False)
    runtime = SparseRuntime(TopKSparseConfig(density=1.0, block_size=16, tile=(1, 3, 5), warmup_steps=0,
                                             dense_layers=0), _Tracker())  # fmt: skip
    runtime.grid = (2, 8, 12)  # 192 video tokens; 1 x 3 x 5 tiles leave edge tiles: a padded layout
    g = torch.Generator().manual_seed(5)
    n_text = 7
    q, k, v = (torch.randn(2, 3, 192 + n_text, 16, generator=g) for _ in range(3))
    text_valid = torch.ones(2, n_text, dtype=torch.bool)
    text_valid[1, 4:] = False  # padding of the second prompt
    start = n_text if text_first else 0
    out = runtime.attend(0, q, k, v, start, text_valid, scale=0.11)
    keys = torch.ones(2, 192 + n_text, dtype=torch.bool)
    text = slice(0, n_text) if text_first else slice(192, 192 + n_text)
    keys[:, text] = text_valid
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None], scale=0.11)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)
    stats = runtime.stats()
    assert stats.sparse_calls == 1 and stats.search_seconds is not None and stats.search_cost > 0


def test_attention_with_lse_masks_keys_and_keeps_the_scale():
    g = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(2, 4, 30, 8, generator=g), torch.randn(2, 2, 11, 8, generator=g), torch.randn(2, 2, 11, 8)
    valid = torch.rand(2, 11, generator=g) > 0.4
    valid[1] = False  # a row with no valid key: 0 and -inf
    out, lse = attention_with_lse(q, k, v, valid, scale=0.2)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = (q @ kk.transpose(-1, -2)) * 0.2
    torch.testing.assert_close(lse[0], torch.logsumexp(s[0].masked_fill(~valid[0], -torch.inf), -1))
    expected = torch.nn.functional.scaled_dot_product_attention(q[:1], kk[:1], vv[:1], attn_mask=valid[:1, None, None],
                                                                scale=0.2)  # fmt: skip
    torch.testing.assert_close(out[:1], expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
