"""The nodes against a real ComfyUI source tree: its loader, ModelPatcher, sampler and model classes.

ComfyUI is not installable from PyPI, so these run only when ``COMFYUI_PATH`` names a ComfyUI checkout whose
dependencies are importable (``pip install -r requirements.txt`` there); otherwise they are skipped and the
stand-in tests (``test_comfy_cache.py``) cover the same behaviour. Models are ComfyUI's own ``Flux``,
``WanModel`` and ``UNetModel`` built from tiny configs with random weights, sampled through
``comfy.sample.sample`` (KSampler's path: CFGGuider, OUTER_SAMPLE and DIFFUSION_MODEL wrappers, calc_cond_batch).
"""

import asyncio
import os
import pathlib
import sys

import pytest
import torch

COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")
ENTRY = pathlib.Path(__file__).resolve().parents[2] / "comfyui"
CONFIGS = {
    "flux": ("Flux", (1, 16, 8, 8), {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 32,
        "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 4, "depth": 2, "depth_single_blocks": 3,
        "axes_dim": [4, 6, 6], "theta": 10000, "qkv_bias": True, "guidance_embed": False}),
    "wan": ("WAN21_T2V", (1, 16, 3, 8, 8), {
        "image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 8, "in_dim": 16, "dim": 64,
        "ffn_dim": 128, "freq_dim": 32, "text_dim": 32, "out_dim": 16, "num_heads": 4, "num_layers": 3}),
    "unet": ("SD15", (1, 4, 16, 16), {
        "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
        "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1],
        "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1, "context_dim": 32,
        "use_linear_in_transformer": True, "adm_in_channels": None, "use_temporal_attention": False,
        "use_spatial_transformer": True, "legacy": False, "dtype": torch.float32}),
}  # fmt: skip


@pytest.fixture(scope="module")
def comfy():
    sys.path.insert(0, COMFYUI)
    import comfy.cli_args

    if not torch.cuda.is_available():  # ComfyUI's --cpu, set before model_management reads it
        comfy.cli_args.args.cpu = True
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models

    torch.set_num_threads(1)
    return comfy


def build(comfy, family):
    name, _, config = CONFIGS[family]
    if family == "flux" and "txt_ids_dims" in flux_param_names(comfy):
        config = {**config, "txt_ids_dims": []}  # FLUX.1: text ids all zero (current ComfyUI requires the field)
    model_config = getattr(comfy.supported_models, name)(config)
    model_config.set_inference_dtype(torch.float32, None)
    torch.manual_seed(0)
    model = model_config.get_model({}, device="cpu")
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.normal_(0, 0.05)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def flux_param_names(comfy):
    """The fields of the installed ComfyUI's ``FluxParams`` (``txt_ids_dims`` appeared after Oct 2025)."""
    import dataclasses

    import comfy.ldm.flux.model

    return {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}


def sample(comfy, patcher, family, steps=12, sampler="euler", shape=None):
    g = torch.Generator().manual_seed(0)
    shape = shape or CONFIGS[family][1]
    extra = {"pooled_output": torch.randn(1, 32, generator=g)} if family == "flux" else {}
    pos, neg = [[torch.randn(1, 8, 32, generator=g), extra]], [[torch.randn(1, 8, 32, generator=g), dict(extra)]]
    noise = torch.randn(shape, generator=g)
    with torch.inference_mode():
        out = comfy.sample.sample(patcher, noise, steps, 3.0, sampler, "simple", pos, neg, torch.zeros(shape), seed=0,
                                  disable_pbar=True)  # fmt: skip
    return out.float().cpu()


def leftovers(model):
    names = ("forward", "_diffusers_hook", "_difcache_step_tracker")
    return [(n, a) for n, m in model.named_modules() for a in names if a in vars(m)]


@pytest.mark.parametrize("family", CONFIGS)
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_cache_on_real_comfyui(comfy, family, sampler):
    from difcache.comfy.nodes import APPLY_CACHE

    base = build(comfy, family)
    model = base.get_model_object("diffusion_model")
    ref = sample(comfy, base, family, sampler=sampler)
    exact = APPLY_CACHE.run(model=base, method="always_compute")[0]
    assert torch.equal(sample(comfy, exact, family, sampler=sampler), ref)
    patched = APPLY_CACHE.run(model=base, method="taylorseer")[0]
    out = sample(comfy, patched, family, sampler=sampler)
    assert torch.equal(sample(comfy, patched, family, sampler=sampler), out)  # state reset between runs
    stats = patched.wrappers["outer_sample"]["difcache_cache"][0].last_stats
    assert stats.totals()["forecast"] > stats.totals()["compute"] > 0
    assert ((out - ref).norm() / ref.norm()).item() < 0.05
    assert leftovers(model) == [] and base.wrappers == {}


def test_sparse_attention_on_real_comfyui_wan(comfy):
    from difcache.comfy.patching import patch_sparse_attention

    base = build(comfy, "wan")
    video = (1, 16, 4, 16, 16)
    ref = sample(comfy, base, "wan", steps=6, shape=video)
    everywhere = dict(block_size=16, backend="torch", warmup_steps=0, dense_layers=0)
    dense = patch_sparse_attention(base, method="topp", p=1.0, **everywhere)
    assert torch.allclose(sample(comfy, dense, "wan", steps=6, shape=video), ref, atol=1e-4)
    patched = patch_sparse_attention(base, method="topk", density=0.3, **everywhere)
    out = sample(comfy, patched, "wan", steps=6, shape=video)
    stats = patched.wrappers["outer_sample"]["difcache_sparse_attention"][0].last_stats
    assert stats.sparse_calls == 6 * 3 and stats.attention_work < 0.6
    assert ((out - ref).norm() / ref.norm()).item() < 0.1
    assert leftovers(base.get_model_object("diffusion_model")) == []


@pytest.mark.parametrize("v1", [False, True])
def test_comfyui_loader_registers_the_nodes(comfy, monkeypatch, v1):
    import nodes

    if v1:
        monkeypatch.setenv("DIFCACHE_COMFY_V1", "1")
    monkeypatch.setattr(nodes, "NODE_CLASS_MAPPINGS", dict(nodes.NODE_CLASS_MAPPINGS))
    assert asyncio.run(nodes.load_custom_node(str(ENTRY), module_parent="custom_nodes"))
    cls = nodes.NODE_CLASS_MAPPINGS["DifcacheApplyCache"]
    assert hasattr(cls, "GET_NODE_INFO_V1") is not v1
    info = cls.GET_NODE_INFO_V1() if not v1 else {"input": cls.INPUT_TYPES()}
    assert list(info["input"]["required"])[:2] == ["model", "method"]
