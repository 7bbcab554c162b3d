"""Both ``apply_*`` verbs return a :class:`difcache.handle.Handle`: the same rules for applying twice, reading a
removed handle, removing, copying and ``with``."""

import copy

import pytest

import difcache
from difcache.attention import apply_sparse_attention
from difcache.handle import Handle
from difcache.models.tiny import output_of, tiny_call_kwargs, tiny_pipeline

VERBS = {"cache": lambda pipe: difcache.apply_cache(pipe, "fora"), "sparse attention": apply_sparse_attention}


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("wan")


@pytest.mark.parametrize("kind", VERBS)
def test_handle_rules_are_the_same_for_every_verb(pipe, kind):
    apply = VERBS[kind]
    handle = apply(pipe)
    assert isinstance(handle, Handle) and handle.kind == kind and handle.active
    assert "active" in repr(handle)
    with pytest.raises(difcache.DifcacheError, match=f"already has a difcache {kind}"):
        apply(pipe)
    with pytest.raises(difcache.DifcacheError, match="cannot be copied"):
        copy.deepcopy(handle)
    handle.remove()
    handle.remove()  # idempotent
    assert not handle.active and "removed" in repr(handle)
    with pytest.raises(difcache.DifcacheError, match="stats are gone"):
        handle.stats()
    with pytest.raises(difcache.DifcacheError, match="apply it again with difcache"):
        handle.reset_stats()
    with apply(pipe) as again:  # the slot is free again, and `with` removes
        assert again.active
    assert not again.active


def test_cache_and_sparse_attention_handles_compose(pipe):
    def run():
        return output_of(pipe(**{**tiny_call_kwargs("wan", num_inference_steps=3), "height": 64, "width": 64}))

    reference = run()
    with difcache.apply_cache(pipe, "fora"), apply_sparse_attention(pipe, "topk", block_size=16, warmup_steps=0):
        assert not (run() == reference).all()
    assert (run() == reference).all()
