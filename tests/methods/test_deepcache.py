"""DeepCache: schedules, skip-branch structure and real diffusers pipelines (SD 1.5, SDXL, DDIM + UNet2DModel).

The tiny UNets have two layers per block (three skip features per block, as SD/SDXL/DDPM), so the official
plugin's "block b // 3, layer b % 3" rule applies, and three down blocks, so branches fall inside blocks, on
block boundaries and next to the mid block.
"""

import math

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from torch.utils.flop_counter import FlopCounterMode

import difcache
import difcache.engine.scopes.module as unit_scope
from difcache.adapters import layout_of
from difcache.core import Action
from difcache.engine.flops import _CUSTOM
from difcache.engine.scopes.skip_branch import deep_path
from difcache.methods.deepcache import DeepCacheConfig
from difcache.policies.deepcache import DeepCacheSchedule

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------- tiny pipelines
def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
    ).eval()  # fmt: skip


def sd15(layers_per_block: int = 2) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16, 16), layers_per_block=layers_per_block, sample_size=16, in_channels=4,
        out_channels=4, norm_num_groups=4, cross_attention_dim=16, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()  # fmt: skip
    pipe = StableDiffusionPipeline(_vae(), None, None, unet, DDIMScheduler(steps_offset=1, clip_sample=False),
                                   None, None, requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_kwargs(cfg: bool = True, batch_size: int = 1, steps: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(1234)
    kwargs = {
        "prompt_embeds": torch.randn(batch_size, 7, 16, generator=g), "num_inference_steps": steps,
        "height": 32, "width": 32, "generator": torch.Generator().manual_seed(seed), "output_type": "np",
        "guidance_scale": 5.0 if cfg else 1.0,
    }  # fmt: skip
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.randn(batch_size, 7, 16, generator=g)
    return kwargs


def sdxl() -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16, 16), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        norm_num_groups=4, cross_attention_dim=16, attention_head_dim=(2, 4, 4), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4,
    ).eval()  # fmt: skip
    pipe = StableDiffusionXLPipeline(_vae(), None, None, None, None, unet, EulerDiscreteScheduler(),
                                     force_zeros_for_empty_prompt=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_kwargs(cfg: bool = True, batch_size: int = 1, steps: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(1234)
    kwargs = {
        "prompt_embeds": torch.randn(batch_size, 7, 16, generator=g),
        "pooled_prompt_embeds": torch.randn(batch_size, 8, generator=g), "num_inference_steps": steps,
        "height": 32, "width": 32, "generator": torch.Generator().manual_seed(seed), "output_type": "np",
        "guidance_scale": 5.0 if cfg else 1.0,
    }  # fmt: skip
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.randn(batch_size, 7, 16, generator=g)
        kwargs["negative_pooled_prompt_embeds"] = torch.randn(batch_size, 8, generator=g)
    return kwargs


def ddim_unet2d() -> DDIMPipeline:
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), layers_per_block=2,
        norm_num_groups=4, attention_head_dim=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ).eval()  # fmt: skip
    pipe = DDIMPipeline(unet, DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ddim_kwargs(cfg: bool = False, batch_size: int = 1, steps: int = 4, seed: int = 0) -> dict:
    assert not cfg, "unconditional pipeline"
    return {"batch_size": batch_size, "num_inference_steps": steps, "generator": torch.Generator().manual_seed(seed),
            "output_type": "np"}  # fmt: skip


PIPELINES = {"sd15": (sd15, sd15_kwargs), "sdxl": (sdxl, sdxl_kwargs), "unet2d": (ddim_unet2d, ddim_kwargs)}


@pytest.fixture(scope="module")
def pipes() -> dict:
    return {name: make() for name, (make, _) in PIPELINES.items()}


def run(pipe, kwargs_fn, **kwargs) -> torch.Tensor:
    return torch.as_tensor(pipe(**kwargs_fn(**kwargs)).images).float()


class MidCounter:
    """Steps (denoiser call indices) at which the mid block really computed (its first resnet ran)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls, self.computed = 0, []
        self._handles = [
            unet.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1)),
            unet.mid_block.resnets[0].register_forward_hook(lambda *_: self.computed.append(self.calls - 1)),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------- schedules
def _official_non_uniform(num_steps: int, interval: int, center: int, exponent: float) -> tuple[int, ...]:
    """The official ``sample_from_quad_center`` as we read it, in plain Python complex arithmetic."""
    wanted = math.ceil(num_steps / interval)
    while exponent > 1:
        start, stop = (-center) ** (1 / exponent), (num_steps - center) ** (1 / exponent)
        points = [start + j * ((stop - start) / wanted) for j in range(wanted)] + [stop]
        truncated = sorted({int((p**exponent).real) for p in points})
        steps = [0] + [v + center for v in truncated[1:-1]]
        if len(steps) == wanted:
            return tuple(sorted(steps))
        exponent -= 0.02
    raise AssertionError("no exponent works")


def test_uniform_schedule_full_every_n_steps():
    policy = DeepCacheSchedule(3)
    assert policy.full_steps(10) == (0, 3, 6, 9)
    assert [policy.decide(s, 10, 0) for s in range(5)] == [Action.COMPUTE, Action.REUSE, Action.REUSE, Action.COMPUTE,
                                                           Action.REUSE]  # fmt: skip
    assert policy.decide(7, None, 0) == Action.REUSE and policy.decide(9, None, 0) == Action.COMPUTE
    assert policy.last_reuse(10) == 8 and policy.last_reuse(7) == 5
    assert DeepCacheSchedule(1).full_steps(5) == (0, 1, 2, 3, 4) and DeepCacheSchedule(1).last_reuse(5) == -1


def test_non_uniform_reproduces_paper_sd_schedule():
    # Paper SD 1.5 setting: 50 steps, N=5, pow=1.4, center=15.
    full = DeepCacheSchedule(5, uniform=False, pow=1.4, center=15).full_steps(50)
    assert full == _official_non_uniform(50, 5, 15, 1.4) == (0, 5, 9, 13, 17, 21, 26, 31, 37, 43)
    gaps = [b - a for a, b in zip(full, full[1:], strict=False)]
    assert len(set(full)) == math.ceil(50 / 5) and full[0] == 0
    narrowest = [a for a, g in zip(full, gaps, strict=False) if g == min(gaps)]
    assert narrowest[0] <= 15 < narrowest[-1] + min(gaps)  # densest around the center...
    before = [g for a, g in zip(full, gaps, strict=False) if a < 15]
    after = [g for a, g in zip(full, gaps, strict=False) if a >= 15]
    assert before == sorted(before, reverse=True) and after == sorted(after)  # ...and sparser away from it


@pytest.mark.parametrize("num_steps", [10, 20, 25, 30, 50, 100])
@pytest.mark.parametrize("interval", [3, 4, 5, 10])
def test_non_uniform_matches_official_algorithm(num_steps, interval):
    policy = DeepCacheSchedule(interval, uniform=False)
    full = policy.full_steps(num_steps)
    assert full == _official_non_uniform(num_steps, interval, 15, 1.4)
    assert len(set(full)) == math.ceil(num_steps / interval) and full[0] == 0 and full[-1] < num_steps
    assert [s for s in range(num_steps) if policy.decide(s, num_steps, 0) == Action.COMPUTE] == list(full)


def test_non_uniform_lowers_pow_until_the_count_is_exact():
    # 25 steps, N=2: 13 full steps need pow lowered from 1.4 (the official helper lands on 1.18).
    full = DeepCacheSchedule(2, uniform=False).full_steps(25)
    assert len(set(full)) == 13 and full == _official_non_uniform(25, 2, 15, 1.4)


def test_non_uniform_errors_name_the_fix():
    with pytest.raises(difcache.DifcacheError, match="uniform=True"):
        DeepCacheSchedule(2, uniform=False).full_steps(30)  # the official helper fails here too
    with pytest.raises(difcache.DifcacheError, match="apply it to the pipeline"):
        DeepCacheSchedule(3, uniform=False).decide(4, None, 0)


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("field", "value", "error", "message"),
    [
        ("cache_interval", 0, ValueError, r"cache_interval must be in \[1, 1000\], got 0"),
        ("cache_branch_id", -1, ValueError, r"cache_branch_id must be in \[0, 1000\], got -1"),
        ("uniform", 1, TypeError, "uniform must be True or False"),
        ("pow", 1.0, ValueError, r"pow must be > 1.0 and <= 10.0, got 1.0"),
        ("center", -2, ValueError, r"center must be in \[0, 100000\]"),
        ("cache_interval", True, TypeError, "cache_interval must be an int"),
    ],
)
def test_config_validation_names_field_and_range(field, value, error, message):
    with pytest.raises(error, match=message):
        DeepCacheConfig(**{field: value})


def test_defaults_are_the_official_plugins():
    config = DeepCacheConfig()
    assert (config.cache_interval, config.cache_branch_id, config.uniform) == (3, 0, True)
    assert (config.pow, config.center) == (1.4, 15)
    assert difcache.list_methods()["deepcache"].startswith("DeepCache")


# ---------------------------------------------------------------------------------------------- structure
def _leaf_layers(model: torch.nn.Module, names: tuple[str, ...]) -> set[str]:
    """Expand whole blocks into their resnets/attentions/samplers, so block- and layer-level hooks compare."""
    leaves = set()
    for name in names:
        if name == "mid_block":
            leaves.add(name)
            continue
        module = model.get_submodule(name)
        if hasattr(module, "resnets"):
            for group in ("resnets", "attentions", "downsamplers", "upsamplers"):
                children = getattr(module, group, None) or []
                leaves.update(f"{name}.{group}.{i}" for i in range(len(children)))
        else:
            leaves.add(name)
    return leaves


def _official_rule(model: torch.nn.Module, branch: int) -> set[str]:
    """Layers the official plugin skips for ``cache_branch_id=branch`` (``is_skip_step``), read independently.

    Down blocks: block i, layer j (the downsampler is layer ``len(resnets)``) skipped iff i > b // 3 or
    (i == b // 3 and j >= b % 3). Up blocks are numbered from the output (reversed), layers too, upsampler = 0:
    skipped iff i > b // 3 or (i == b // 3 and j > b % 3). The mid block is always skipped.
    """
    block, layer = branch // 3, branch % 3
    skipped = {"mid_block"}
    for i, down in enumerate(model.down_blocks):
        layers = [(j, f"resnets.{j}") for j in range(len(down.resnets))]
        layers += [(j, f"attentions.{j}") for j in range(len(getattr(down, "attentions", None) or []))]
        layers += [(len(down.resnets), f"downsamplers.{d}") for d in range(len(down.downsamplers or []))]
        skipped |= {f"down_blocks.{i}.{n}" for j, n in layers if i > block or (i == block and j >= layer)}
    n_up = len(model.up_blocks)
    for position, up in enumerate(model.up_blocks):
        i, n = n_up - 1 - position, len(up.resnets)
        layers = [(n - 1 - j, f"resnets.{j}") for j in range(n)]
        layers += [(n - 1 - j, f"attentions.{j}") for j in range(len(getattr(up, "attentions", None) or []))]
        layers += [(0, f"upsamplers.{u}") for u in range(len(up.upsamplers or []))]
        skipped |= {f"up_blocks.{position}.{m}" for j, m in layers if i > block or (i == block and j > layer)}
    return skipped


@pytest.mark.parametrize("name", ["sd15", "sdxl", "unet2d"])
def test_deep_path_is_the_official_branch_rule(pipes, name):
    unet = pipes[name].unet
    layout = layout_of(unet)
    assert len(layout.branches) == 9  # conv_in + 3 + 3 + 2
    for branch in range(9):
        assert _leaf_layers(unet, deep_path(layout, branch)) == _official_rule(unet, branch), branch


def test_feature_is_the_input_of_the_layer_taking_the_branch(pipes):
    layout = layout_of(pipes["sd15"].unet)
    last = {b: deep_path(layout, b)[-1] for b in range(9)}
    # Branch 0 (conv_in) is taken by up_blocks.2.resnets.2, whose input is attentions.1's output; branch 2 by
    # up_blocks.2.resnets.0, whose input is the previous up block's output; branch 8 by up_blocks.0.resnets.0.
    assert last[0] == "up_blocks.2.attentions.1" and last[1] == "up_blocks.2.attentions.0"
    assert last[2] == "up_blocks.1" and last[5] == "up_blocks.0" and last[8] == "mid_block"
    assert deep_path(layout, 1)[:3] == ("down_blocks.0.resnets.1", "down_blocks.0.attentions.1",
                                        "down_blocks.0.downsamplers.0")  # fmt: skip


def test_unet_layouts_keep_transformer_units_and_add_branches(pipes):
    layout = layout_of(pipes["sd15"].unet)
    assert layout.family == "unet" and layout.units and all(".transformer_blocks." in u.name for u in layout.units)
    assert [b.index for b in layout.branches] == list(range(9)) and layout.branches[0].producer == ("conv_in",)
    unet2d = layout_of(pipes["unet2d"].unet)
    assert unet2d.family == "unet2d" and unet2d.units == () and len(unet2d.branches) == 9


def test_other_layer_counts_number_branches_by_structure():
    unet = sd15(layers_per_block=1).unet
    layout = layout_of(unet)
    assert len(layout.branches) == 6  # conv_in + (1 + ds) + (1 + ds) + 1
    # Branch 1 is down_blocks.0's only layer; branch 2 its downsampler, taken by up_blocks.1's last resnet.
    assert deep_path(layout, 1) == ("down_blocks.0.downsamplers.0", "down_blocks.1", "down_blocks.2", "mid_block",
                                    "up_blocks.0", "up_blocks.1")  # fmt: skip
    assert deep_path(layout, 2) == ("down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0",
                                    "up_blocks.1.resnets.0", "up_blocks.1.attentions.0")  # fmt: skip


def test_branch_out_of_range_names_the_valid_range(pipes):
    with pytest.raises(difcache.DifcacheError, match=r"cache_branch_id must be in \[0, 8\].*got 9"):
        difcache.apply_cache(pipes["sd15"], "deepcache", cache_branch_id=9)
    assert not hasattr(pipes["sd15"].unet, "_difcache_cache")


def test_unsupported_unet_blocks_are_refused_by_name():
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
        up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"),
    )  # fmt: skip
    with pytest.raises(difcache.DifcacheError, match="SkipDownBlock2D.*method='deepcache'"):
        difcache.apply_cache(unet, "deepcache")


@pytest.mark.parametrize("name", ["sd15", "unet2d"])
@pytest.mark.parametrize(
    ("method", "settings", "message"),
    [
        ("taylorseer", {"lite": True}, "lite forecasts a transformer block stack.*lite=False"),
        ("delta_dit", {}, "Δ-DiT caches transformer block ranges.*method='deepcache'"),
        ("ertacache", {}, "ERTACache caches a transformer block stack.*method='deepcache'"),
        ("teacache", {}, "method='deepcache'"),
    ],
)
def test_block_stack_methods_on_either_unet_name_the_fix(pipes, name, method, settings, message):
    """Both UNet families (conditional ``unet``, ``UNet2DModel``'s ``unet2d``) get the message naming the fix,
    not a bare "block range outside the model" from the scope."""
    with pytest.raises(difcache.DifcacheError, match=message):
        difcache.apply_cache(pipes[name], method, **settings)
    assert not hasattr(pipes[name].unet, "_difcache_cache")


# ---------------------------------------------------------------------------------------------- pipelines
CASES = [("sd15", True, 1), ("sd15", False, 2), ("sdxl", True, 2), ("sdxl", False, 1), ("unet2d", False, 2)]


@pytest.mark.parametrize(("name", "cfg", "batch_size"), CASES)
def test_pipeline_skips_deep_path_and_stays_close(pipes, name, cfg, batch_size):
    pipe, kwargs_fn = pipes[name], PIPELINES[name][1]
    args = {"cfg": cfg, "batch_size": batch_size, "steps": 6}
    reference = run(pipe, kwargs_fn, **args)
    other_seed = run(pipe, kwargs_fn, **args, seed=1)
    counter = MidCounter(pipe.unet)
    handle = difcache.apply_cache(pipe, "deepcache")
    cached = run(pipe, kwargs_fn, **args)
    again = run(pipe, kwargs_fn, **args)
    stats = handle.stats()
    handle.remove()
    counter.remove()
    after = run(pipe, kwargs_fn, **args)

    assert torch.equal(cached, again)  # same seed, same output
    assert torch.equal(after, reference)  # remove() restores the exact model
    assert counter.computed == [0, 3, 6, 9]  # mid block ran on full steps only (uniform N=3, two runs of 6)
    (unit,) = stats.units
    assert (unit.compute, unit.reuse, stats.calls, stats.runs) == (4, 8, 12, 2)
    assert stats.ideal_speedup > 1.3
    assert not torch.equal(cached, reference)
    assert (cached - reference).abs().mean() < 0.1 * (other_seed - reference).abs().mean()


def _replace_feature_reference(pipe, feature: str, full_steps: set[int]):
    """An independent DeepCache: run the whole UNet every step, but on retrieve steps overwrite the output of the
    module feeding the branch with its output from the last full step (plain torch hooks)."""
    state = {"call": -1, "cached": None}
    module = pipe.unet.get_submodule(feature)

    def count(*_):
        state["call"] += 1

    def swap(_module, _inputs, output):
        if state["call"] in full_steps:
            state["cached"] = output
            return output
        return state["cached"]

    return [pipe.unet.register_forward_pre_hook(count), module.register_forward_hook(swap)]


@pytest.mark.parametrize(("branch", "feature"), [(0, "up_blocks.2.attentions.1"), (2, "up_blocks.1"),
                                                 (4, "up_blocks.1.attentions.0"), (8, "mid_block")])  # fmt: skip
def test_output_equals_full_unet_with_the_feature_swapped(pipes, branch, feature):
    pipe = pipes["sd15"]
    handles = _replace_feature_reference(pipe, feature, {0, 3})
    expected = run(pipe, sd15_kwargs, steps=5)
    for handle in handles:
        handle.remove()
    with difcache.apply_cache(pipe, "deepcache", cache_branch_id=branch):
        assert torch.equal(run(pipe, sd15_kwargs, steps=5), expected)


def test_feature_is_copied_so_in_place_writes_do_not_compound(pipes):
    # FreeU scales the backbone half of the input of up blocks 0 and 1 in place; with branch 5 that input is the
    # cached up_blocks.0 output. Expected: the full UNet with that output replaced by a copy of the full step's.
    pipe = pipes["sd15"]
    state = {"call": -1, "cached": None}

    def swap(_module, _inputs, output):
        if state["call"] in (0, 3):
            state["cached"] = output.clone()
        return state["cached"].clone()

    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    try:
        handles = [pipe.unet.register_forward_pre_hook(lambda *_: state.update(call=state["call"] + 1)),
                   pipe.unet.up_blocks[0].register_forward_hook(swap)]  # fmt: skip
        expected = run(pipe, sd15_kwargs, steps=5)
        for handle in handles:
            handle.remove()
        with difcache.apply_cache(pipe, "deepcache", cache_branch_id=5):
            cached = run(pipe, sd15_kwargs, steps=5)
    finally:
        pipe.disable_freeu()
    assert torch.equal(cached, expected)


def test_matches_official_plugin_bit_for_bit(pipes):
    # The official plugin (the `bench` extra) on the same pipeline; without FreeU-style in-place writes the two agree.
    deepcache = pytest.importorskip("DeepCache")
    pipe = pipes["sd15"]
    for branch in (0, 1, 5):
        helper = deepcache.DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=2, cache_branch_id=branch)
        helper.enable()
        official = run(pipe, sd15_kwargs, steps=5)
        helper.disable()
        with difcache.apply_cache(pipe, "deepcache", cache_interval=2, cache_branch_id=branch):
            assert torch.equal(run(pipe, sd15_kwargs, steps=5), official), branch


@pytest.mark.parametrize("name", ["sd15", "unet2d"])
def test_placeholders_never_reach_the_output(pipes, name, monkeypatch):
    pipe, kwargs_fn = pipes[name], PIPELINES[name][1]
    for branch in (0, 1, 3, 7):
        with difcache.apply_cache(pipe, "deepcache", cache_branch_id=branch, cache_interval=2):
            normal = run(pipe, kwargs_fn, steps=4)
            with monkeypatch.context() as patch:
                patch.setattr(unit_scope, "placeholder", lambda s, d, dev: torch.full(s, float("nan"), dtype=d))
                poisoned = run(pipe, kwargs_fn, steps=4)
        assert torch.equal(normal, poisoned), branch


def test_stats_flops_are_the_flops_executed(pipes):
    pipe = pipes["sdxl"]
    counters: list[FlopCounterMode] = []

    def start(*_):
        counters.append(FlopCounterMode(display=False, custom_mapping=_CUSTOM))
        counters[-1].__enter__()

    with difcache.apply_cache(pipe, "deepcache", cache_branch_id=1) as handle:
        run(pipe, sdxl_kwargs, steps=3)  # FLOPs are measured on the first call; count a later run
        handle.reset_stats()
        handles = [pipe.unet.register_forward_pre_hook(start),
                   pipe.unet.register_forward_hook(lambda *_: counters[-1].__exit__(None, None, None))]  # fmt: skip
        run(pipe, sdxl_kwargs, steps=7)
        for h in handles:
            h.remove()
        stats = handle.stats()
    counted = [c.get_total_flops() for c in counters]
    assert counted[1] < counted[0] == counted[3]  # retrieve steps really compute less
    assert stats.full_flops - stats.skipped_flops == sum(counted)
    assert stats.ideal_speedup == pytest.approx(len(counted) * counted[0] / sum(counted))


def test_store_keeps_only_the_one_feature(pipes):
    pipe = pipes["sd15"]
    with difcache.apply_cache(pipe, "deepcache", cache_branch_id=0) as handle:
        run(pipe, sd15_kwargs, cfg=True, batch_size=2, steps=4)
        stats = handle.stats()
    # up_blocks.2.attentions.1 output: CFG-batched (2 x 2) x 8 channels x 16 x 16 latents, fp32.
    assert stats.peak_store_bytes == 4 * 8 * 16 * 16 * 4


def test_paper_non_uniform_schedule_in_a_pipeline(pipes):
    pipe = pipes["sd15"]
    counter = MidCounter(pipe.unet)
    with difcache.apply_cache(pipe, "deepcache", cache_interval=5, cache_branch_id=1, uniform=False) as handle:
        run(pipe, sd15_kwargs, steps=50)
        stats = handle.stats()
    counter.remove()
    assert counter.computed == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]
    assert (stats.units[0].compute, stats.units[0].reuse) == (10, 40)


def test_img2img_schedule_counts_from_the_first_step_run(pipes):
    pipe = StableDiffusionImg2ImgPipeline(**pipes["sd15"].components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    kwargs = {k: v for k, v in sd15_kwargs(steps=10).items() if k not in ("height", "width")}
    counter = MidCounter(pipe.unet)
    with difcache.apply_cache(pipe, "deepcache", cache_interval=2):
        pipe(**kwargs, image=image, strength=0.7)  # 7 steps, starting at step 3 of 10
    counter.remove()
    assert counter.calls == 7 and counter.computed == [0, 2, 4, 6]


def test_bare_unet_called_by_a_pipeline_follows_its_scheduler_and_alone_asks_for_one(pipes):
    pipe = pipes["sd15"]
    for uniform in (True, False):
        with difcache.apply_cache(pipe, "deepcache", uniform=uniform):
            expected = run(pipe, sd15_kwargs, steps=5)
        # Applied to the UNet alone, the tracker finds the calling pipeline (and its scheduler) on the stack.
        with difcache.apply_cache(pipe.unet, "deepcache", uniform=uniform) as handle:
            assert torch.equal(run(pipe, sd15_kwargs, steps=5), expected)
            assert torch.equal(run(pipe, sd15_kwargs, steps=5), expected)
            assert handle.stats().runs == 2 and "DDIMScheduler" in handle.stats().steps_source
    # A loop of the user's own, with no scheduler anywhere: the step count is unknown.
    unet, x = pipe.unet, torch.randn(1, 4, 16, 16)
    with (
        difcache.apply_cache(unet, "deepcache", uniform=False),
        pytest.raises(difcache.DifcacheError, match="needs the number of steps"),
    ):
        for t in (900, 600):
            unet(x, t, encoder_hidden_states=torch.randn(1, 7, 16))


