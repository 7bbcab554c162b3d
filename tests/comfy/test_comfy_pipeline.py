"""The DIFCACHE_PIPE nodes (Load -> Apply -> Sample) on the tiny offline diffusers pipelines."""

import pytest
import torch

import difcache
from difcache.comfy.nodes import APPLY_PIPELINE, LOAD_PIPELINE, SAMPLE_PIPELINE
from difcache.comfy.pipeline import DifcachePipe
from difcache.errors import DifcacheError
from difcache.models.tiny import output_of, tiny_call_kwargs, tiny_pipeline

torch.set_num_threads(1)


def defaults(family, **kw):
    """tiny_call_kwargs without what the Sample node's widgets set."""
    kwargs = tiny_call_kwargs(family, **kw)
    for name in ("num_inference_steps", "generator", "output_type"):
        kwargs.pop(name)
    return kwargs


def hooked(module):
    return any(getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks for m in module.modules())


@pytest.fixture(scope="module")
def flux():
    return DifcachePipe(tiny_pipeline("flux"), call_defaults=defaults("flux", cfg=True))


def test_apply_is_idempotent_and_never_touches_the_pipeline(flux):
    once = APPLY_PIPELINE.run(pipe=flux, method="taylorseer", interval=3)[0]
    twice = APPLY_PIPELINE.run(pipe=once, method="taylorseer", interval=3)[0]
    assert once == twice and once.cache.interval == 3 and once.pipe is flux.pipe
    assert not hooked(flux.pipe.transformer) and flux.cache is None
    assert APPLY_PIPELINE.run(pipe=once, method="fora")[0].cache.method == "fora"
    assert APPLY_PIPELINE.run(pipe=once, method="none")[0].cache is None
    with pytest.raises(DifcacheError, match="deepcache"):
        APPLY_PIPELINE.run(pipe=flux, method="deepcache")  # a UNet method on a transformer: fails on Apply


def test_sample_caches_for_the_call_only(flux):
    run = dict(steps=8, cfg=1.0, seed=3)
    ref, no_stats = SAMPLE_PIPELINE.run(pipe=flux, **run)
    applied = APPLY_PIPELINE.run(pipe=flux, method="taylorseer", interval=2, warmup=2)[0]
    image, stats = SAMPLE_PIPELINE.run(pipe=applied, **run)
    assert no_stats == "" and "forecast" in stats and "16 denoiser calls" in stats  # true CFG: 2 calls per step
    assert image.shape == ref.shape == (1, 16, 16, 3) and image.min() >= 0.0 and image.max() <= 1.0
    assert 0 < ((image - ref).norm() / ref.norm()).item() < 0.05
    assert not hooked(flux.pipe.transformer) and not difcache.remove_cache(flux.pipe)
    assert torch.equal(SAMPLE_PIPELINE.run(pipe=flux, **run)[0], ref)


def test_load_apply_sample_chain_with_json_arguments(tmp_path):
    tiny_pipeline("dit").save_pretrained(tmp_path)
    loaded = LOAD_PIPELINE.run(path=str(tmp_path), dtype="float32", device="cpu")[0]
    assert type(loaded.pipe).__name__ == "DiTPipeline"
    applied = APPLY_PIPELINE.run(pipe=loaded, method="fora", interval=2)[0]
    image, stats = SAMPLE_PIPELINE.run(pipe=applied, steps=6, cfg=4.0, seed=0, extra_kwargs='{"class_labels": [1, 2]}')
    assert image.shape == (2, 8, 8, 3) and "reused" in stats
    with pytest.raises(DifcacheError, match="takes no argument"):
        SAMPLE_PIPELINE.run(pipe=applied, steps=2, seed=0, extra_kwargs='{"class_label": [1]}')
    with pytest.raises(DifcacheError, match="not valid JSON"):
        SAMPLE_PIPELINE.run(pipe=applied, steps=2, seed=0, extra_kwargs="{class_labels: 1}")
    with pytest.raises(DifcacheError, match="needs a path"):
        LOAD_PIPELINE.run(path=" ")


def test_video_frames_become_one_image_batch():
    wan = DifcachePipe(tiny_pipeline("wan"), call_defaults=defaults("wan", cfg=True))
    applied = APPLY_PIPELINE.run(pipe=wan, method="taylorseer")[0]
    frames, stats = SAMPLE_PIPELINE.run(pipe=applied, steps=4, cfg=4.0, seed=0)
    direct = output_of(wan.pipe(**tiny_call_kwargs("wan", cfg=True)))  # [B, F, H, W, C]
    assert direct.dim() == 5 and frames.shape == direct.shape[1:] and frames.shape[0] > 1
    assert "8 denoiser calls" in stats  # sequential CFG: 2 calls per step
