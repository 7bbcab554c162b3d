"""Sparse attention configs: one class per method, the registry, validation and JSON round trips."""

import dataclasses
import json

import pytest

from difcache.attention import (
    AdaSpaSparseConfig,
    PSASparseConfig,
    SparseAttentionConfig,
    SVG2SparseConfig,
    TopKSparseConfig,
    TopPSparseConfig,
    list_sparse_methods,
    sparse_config_from_dict,
)
from difcache.attention.config import resolve_sparse_config
from difcache.errors import DifcacheError

CONFIGS = [TopKSparseConfig, TopPSparseConfig, PSASparseConfig, AdaSpaSparseConfig, SVG2SparseConfig]
NON_DEFAULT = {
    TopKSparseConfig: dict(density=0.15, tile=(1, 4, 4), search_steps=(3, 0.5), sim_threshold=0.2),
    TopPSparseConfig: dict(p=0.8, estimator="sampled", reuse_steps=3, min_tokens=4096),
    PSASparseConfig: dict(density=None, thresholds=(0.4, 0.6, 0.8, 0.9), block_size=64),
    AdaSpaSparseConfig: dict(density=0.1, search_steps=(10, 30), warmup_steps=10),
    SVG2SparseConfig: dict(density=0.2, k_cluster_size=76, min_kc_ratio=0.1, dense_layers=1),
}


def test_every_method_is_registered_with_its_config():
    assert set(list_sparse_methods()) == {cls.method for cls in CONFIGS}


@pytest.mark.parametrize("cls", CONFIGS)
def test_configs_round_trip_through_json(cls):
    for config in (cls(), cls(**NON_DEFAULT[cls])):
        data = json.loads(json.dumps(config.to_dict()))
        assert data["method"] == cls.method and data["version"] == cls.VERSION
        assert sparse_config_from_dict(data) == config
        assert cls.from_dict(data) == config


@pytest.mark.parametrize("cls", CONFIGS)
def test_a_newer_version_is_refused_naming_the_fix(cls):
    data = cls().to_dict()
    with pytest.raises(DifcacheError, match="newer difcache.*upgrade difcache"):
        sparse_config_from_dict({**data, "version": cls.VERSION + 1})
    with pytest.raises(DifcacheError, match="re-create it"):
        sparse_config_from_dict({**data, "version": 1})
    with pytest.raises(DifcacheError, match="no field"):
        sparse_config_from_dict({**data, "sparsity": 0.8})
    with pytest.raises(DifcacheError, match="Unknown sparse attention method"):
        sparse_config_from_dict({**data, "method": "sparge"})


def test_method_names_take_their_config_defaults_and_overrides_are_validated():
    assert resolve_sparse_config("topk", {}) == TopKSparseConfig()
    assert resolve_sparse_config("svg2", {"density": 0.3}) == SVG2SparseConfig(density=0.3)
    base = PSASparseConfig(density=0.3)
    assert resolve_sparse_config(base, {"block_size": 64}) == PSASparseConfig(density=0.3, block_size=64)
    with pytest.raises(DifcacheError, match=r"PSASparseConfig.block_size must be a power of two in \[16, 256\]"):
        resolve_sparse_config(base, {"block_size": 48})
    with pytest.raises(DifcacheError, match="has no field.*'p'"):
        resolve_sparse_config(base, {"p": 0.9})
    with pytest.raises(DifcacheError, match="expects a method name or a sparse config"):
        resolve_sparse_config(3, {})
    with pytest.raises(DifcacheError, match="base of the method configs"):
        SparseAttentionConfig()


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (TopKSparseConfig, dict(density=0.0), r"density must be > 0 and <= 1, got 0.0"),
        (TopKSparseConfig, dict(block_size=True), "block_size"),
        (TopKSparseConfig, dict(tile=(2, 8)), "tile"),
        (TopKSparseConfig, dict(min_blocks=0), "min_blocks"),
        (TopKSparseConfig, dict(estimator="mean"), "estimator"),
        (TopKSparseConfig, dict(estimator="sampled", sim_threshold=0.3), "guards the pooled estimator"),
        (TopKSparseConfig, dict(estimator="exact"), "saves nothing; give search_steps"),
        (TopKSparseConfig, dict(sim_threshold=2.0), r"cosine similarity in \[-1, 1\]"),
        (TopPSparseConfig, dict(p=1.5), "p must be"),
        (TopPSparseConfig, dict(warmup_steps=1.5), "warmup_steps"),
        (TopPSparseConfig, dict(warmup_steps=-1), "warmup_steps"),
        (TopPSparseConfig, dict(dense_layers=-1), "dense_layers"),
        (TopPSparseConfig, dict(reuse_steps=0), "reuse_steps"),
        (TopPSparseConfig, dict(search_steps=()), "search_steps"),
        (TopPSparseConfig, dict(search_steps=(1.5,)), "search_steps"),
        (TopPSparseConfig, dict(search_steps=(2,), reuse_steps=2), "not both; drop reuse_steps"),
        (TopPSparseConfig, dict(backend="cuda"), "backend"),
        (TopPSparseConfig, dict(min_tokens=-1), "min_tokens"),
        (PSASparseConfig, dict(thresholds=(0.9, 0.5, 0.6, 0.7)), "thresholds"),
        (PSASparseConfig, dict(full_share=0), "full_share"),
        (AdaSpaSparseConfig, dict(density=2), "density"),
        (SVG2SparseConfig, dict(p=0.9, density=0.2), "not both; pass p=None"),
        (SVG2SparseConfig, dict(k_cluster_size=0), "k_cluster_size"),
        (SVG2SparseConfig, dict(min_kc_ratio=1.5), "min_kc_ratio"),
    ],
)
def test_config_names_the_bad_field(cls, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cls(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(keep_diagonal=1), "keep_diagonal must be True or False, got 1."),
     (dict(min_blocks=True), "min_blocks must be an int >= 1, got True.")],
)  # fmt: skip
def test_a_value_of_the_wrong_type_is_not_reported_as_an_unknown_field(kwargs, message):
    with pytest.raises(DifcacheError) as info:
        resolve_sparse_config("topk", kwargs)
    assert str(info.value) == f"TopKSparseConfig.{message}"


def test_defaults_follow_the_papers_and_resolve_per_run():
    for cls in (TopKSparseConfig, TopPSparseConfig, PSASparseConfig, SVG2SparseConfig):
        config = cls()
        assert config.warmup_steps == 0.25 and config.dense_layers == 0.025  # Sparse VideoGen, PSA, Radial
        assert config.warmup_count(50) == 13 and config.dense_layer_count(40) == 1 and config.dense_layer_count(3) == 1
    ada = AdaSpaSparseConfig()
    assert ada.search_schedule(50) == (10, 30) and ada.warmup_count(50) == 10 and ada.estimator == "exact"
    assert PSASparseConfig().estimator == "sampled" and TopKSparseConfig().estimator == "pooled"
    assert TopPSparseConfig(search_steps=(3, 0.5)).search_schedule(10) == (3, 5)
    assert TopPSparseConfig().search_schedule(10) is None
    with pytest.raises(DifcacheError, match="number of steps is unknown"):
        TopPSparseConfig(search_steps=(0.5,)).search_schedule(None)
    assert TopPSparseConfig(warmup_steps=3).warmup_count(None) == 3
    assert TopPSparseConfig(warmup_steps=0.2).warmup_count(None) is None
    assert SVG2SparseConfig().p == 0.9 and SVG2SparseConfig(density=0.2).p is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        TopPSparseConfig().p = 0.5
