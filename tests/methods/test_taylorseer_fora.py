"""TaylorSeer and FORA on the real pipeline classes: schedules as the official code has them, pre-gate units (the
block's current gate and residual still apply, single-stream blocks included), warm-up counted from the run's
first step (img2img), Lite, removal."""

import diffusers as d
import pytest
import torch

import difcache
from difcache.core import Action
from difcache.models.tiny import tiny, tiny_call_kwargs
from difcache.policies import FORASchedule, TaylorSeerSchedule, schedule_string


def _images(out) -> torch.Tensor:
    return torch.as_tensor(out.images if hasattr(out, "images") else out.frames)


def test_official_schedules():
    # TaylorSeer's cal_type: W full steps, then every N-th from step W-1. FORA: descending index % N, step 0 full.
    assert schedule_string(TaylorSeerSchedule(6, 3), 12) == "CCCFFFFFCFFF"
    assert schedule_string(FORASchedule(3), 10) == "CRRCRRCRRC"
    assert TaylorSeerSchedule(4, 2, Action.REUSE).decide(3, 10, 0) == Action.REUSE


@pytest.mark.parametrize(
    ("family", "expected"),
    [("flux", (6, 1, 3)), ("wan", (5, 1, 1)), ("hunyuanvideo", (5, 1, 1)), ("dit", (4, 4, 2)), ("sd3", (5, 1, 3))],
)
def test_presets_per_family(family, expected):
    config = difcache.TaylorSeerConfig.for_family(family)
    assert (config.interval, config.order, config.warmup) == expected


@pytest.mark.parametrize("family", ["flux", "wan", "pixart"])
@pytest.mark.parametrize("method", ["taylorseer", "fora"])
def test_pipeline_skips_units_stays_close_and_removal_is_exact(family, method):
    pipe = tiny(family)
    pipe.set_progress_bar_config(disable=True)
    reference = _images(pipe(**tiny_call_kwargs(family, num_inference_steps=12)))
    other_seed = _images(pipe(**tiny_call_kwargs(family, num_inference_steps=12, seed=1)))
    with difcache.apply_cache(pipe, method, interval=3) as handle:
        cached = _images(pipe(**tiny_call_kwargs(family, num_inference_steps=12)))
        stats = handle.stats()
    assert stats.ideal_speedup > 1.5 and stats.totals()["compute"] > 0
    assert stats.totals()["forecast" if method == "taylorseer" else "reuse"] > 0
    assert (cached - reference).abs().mean() < 0.25 * (other_seed - reference).abs().mean()
    assert torch.equal(_images(pipe(**tiny_call_kwargs(family, num_inference_steps=12))), reference)


def _single_block_outputs(family: str, delta: float) -> list[tuple[bool, list[torch.Tensor]]]:
    """Outputs of the last single-stream block per call, with ``delta`` added to its image-stream input."""
    pipe = tiny(family)
    pipe.set_progress_bar_config(disable=True)
    block = pipe.transformer.single_transformer_blocks[-1]
    seen: list[tuple[bool, list[torch.Tensor]]] = []
    with difcache.apply_cache(pipe, "taylorseer", interval=3, warmup=2, order=1) as handle:
        slot = handle._runtime.slots[-1]

        def perturb(module, args, kwargs):
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + delta}
            return (args[0] + delta, *args[1:]), kwargs

        hooks = [
            block.register_forward_pre_hook(perturb, with_kwargs=True),
            block.register_forward_hook(lambda m, a, o: seen.append((slot.skip, [t.clone() for t in o]))),
        ]
        pipe(**tiny_call_kwargs(family, num_inference_steps=6))
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("family", ["flux", "hunyuanvideo"])
def test_single_stream_block_applies_its_current_gate_and_residual_to_the_forecast(family):
    # The official TaylorSeer caches proj_out(cat(attn, mlp)) *before* the gate and returns x + gate * F:
    # moving the block's input on a forecast step moves its output by exactly as much.
    base, moved = _single_block_outputs(family, 0.0), _single_block_outputs(family, 0.1)
    stream = 1 if family == "flux" else 0  # FLUX returns (text, image); HunyuanVideo (image, text)
    forecasts = [(a, b) for (skip, a), (_, b) in zip(base, moved, strict=True) if skip]
    assert forecasts, "the schedule forecast no step"
    for a, b in forecasts:
        assert torch.allclose(b[stream] - a[stream], torch.full_like(a[stream], 0.1), atol=1e-5)


def _img2img_decisions(method: str, strength: float) -> list[int]:
    """Whether the first unit is skipped, per step of one img2img run."""
    base = tiny("flux")
    pipe = d.FluxImg2ImgPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    kwargs = tiny_call_kwargs("flux", cfg=False, num_inference_steps=10)
    for key in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
        kwargs.pop(key, None)
    image = torch.rand(1, 3, 16, 16)
    with difcache.apply_cache(pipe, method, interval=3, **({"warmup": 3} if method == "taylorseer" else {})) as h:
        rows: dict[int, int] = {}
        # Listeners run in order: this one reads the slot the runtime has just armed for the announced call (the
        # last announcement of a step is the one its call picks up).
        remove = h._runtime.tracker.on_call(lambda i: rows.__setitem__(i.step - i.start, int(h._runtime.slots[0].skip)))
        pipe(image=image, strength=strength, **kwargs)
        remove()
    return [rows[s] for s in sorted(rows)]


@pytest.mark.parametrize("method", ["taylorseer", "fora"])
def test_img2img_warmup_counts_from_the_runs_first_step(method):
    full, partial = _img2img_decisions(method, 1.0), _img2img_decisions(method, 0.6)
    assert len(partial) < len(full)
    # The schedule of a run as long as the img2img run, from its own step 0 (FORA's is anchored at the last step).
    policy = TaylorSeerSchedule(3, 3) if method == "taylorseer" else FORASchedule(3)
    assert partial == [int(c != "C") for c in schedule_string(policy, len(partial))]
    assert partial[0] == 0 and (method == "fora" or partial[:3] == [0, 0, 0])  # warm-up not skipped


def test_lite_forecasts_one_residual_for_the_whole_stack():
    pipe = tiny("flux")
    pipe.set_progress_bar_config(disable=True)
    reference = _images(pipe(**tiny_call_kwargs("flux", num_inference_steps=12)))
    with difcache.apply_cache(pipe, "taylorseer", lite=True, interval=3, warmup=2) as handle:
        cached = _images(pipe(**tiny_call_kwargs("flux", num_inference_steps=12)))
        stats = handle.stats()
    assert len(stats.units) == 1 and stats.units[0].forecast > 0 and stats.ideal_speedup > 1.8
    assert (cached - reference).abs().max() < 0.2
