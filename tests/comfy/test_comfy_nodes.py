"""Registration of the nodes (V1 mappings, V3 schema), the custom_nodes entry point and the example workflows."""

import asyncio
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import types

import comfy_standins as S
import pytest
import torch

import difcache
import difcache.comfy as pack
from difcache.comfy.nodes import NODES
from difcache.comfy.registration import WIDGETS, v3_entrypoint

ROOT = pathlib.Path(__file__).resolve().parents[2] / "comfyui"
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


# ---------------------------------------------------------------------------------------------- a comfy_api stand-in
def _typed(io_type, allowed):
    """A ComfyType with ``Input``/``Output`` accepting only the keyword arguments comfy_api's own accept
    (names from ``comfy_api/latest/_io.py``), so a misspelt or unsupported option fails here too."""

    class Input:
        def __init__(self, id, **kwargs):
            unknown = set(kwargs) - set(allowed) - {"display_name", "optional", "tooltip", "lazy"}
            if unknown:
                raise TypeError(f"{io_type}.Input got unexpected keyword(s) {sorted(unknown)}")
            self.id, self.io_type, self.kwargs = id, io_type, kwargs

    class Output:
        def __init__(self, id=None, display_name=None, tooltip=None, is_output_list=False):
            self.id, self.io_type, self.display_name, self.tooltip = id, io_type, display_name, tooltip

    return type(io_type, (), {"io_type": io_type, "Input": Input, "Output": Output})


def fake_comfy_api():
    numeric = ("default", "min", "max", "step", "display_mode", "socketless", "force_input")
    io = types.SimpleNamespace(
        Int=_typed("INT", numeric + ("control_after_generate",)),
        Float=_typed("FLOAT", numeric + ("round",)),
        String=_typed(
            "STRING", ("multiline", "placeholder", "default", "dynamic_prompts", "socketless", "force_input")
        ),
        Boolean=_typed("BOOLEAN", ("default", "label_on", "label_off", "socketless", "force_input")),
        Combo=_typed("COMBO", ("options", "default", "control_after_generate", "upload", "image_folder", "remote")),
        Model=_typed("MODEL", ("extra_dict",)),
        Image=_typed("IMAGE", ("extra_dict",)),
        Custom=lambda io_type: _typed(io_type, ("extra_dict",)),
        Schema=lambda **kw: types.SimpleNamespace(**kw),
        ComfyNode=type("ComfyNode", (), {}),
        NodeOutput=lambda *args: types.SimpleNamespace(args=args),
    )

    class ComfyExtension:
        async def get_node_list(self):
            raise NotImplementedError

    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ComfyExtension = io, ComfyExtension
    return latest


@pytest.fixture
def comfy_api(monkeypatch):
    latest = fake_comfy_api()
    monkeypatch.setitem(sys.modules, "comfy_api", types.ModuleType("comfy_api"))
    monkeypatch.setitem(sys.modules, "comfy_api.latest", latest)
    return latest


# ---------------------------------------------------------------------------------------------- V1 / V3
def test_v1_mappings_describe_every_node():
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS) == {n.node_id for n in pack.NODES}
    apply = pack.NODE_CLASS_MAPPINGS["DifcacheApplyCache"]
    spec = apply.INPUT_TYPES()["required"]
    assert list(spec) == ["model", "method", "interval", "order", "warmup", "start_percent", "end_percent"]
    assert spec["model"] == ("MODEL", {"tooltip": spec["model"][1]["tooltip"]})
    assert spec["method"][0] == ["always_compute", "fora", "taylorseer"]
    assert spec["interval"][1] | {"tooltip": ""} == {"default": -1, "min": -1, "max": 100, "step": 1, "tooltip": ""}
    assert apply.RETURN_TYPES == ("MODEL",) and apply.FUNCTION == "execute" and apply.CATEGORY == "difcache"
    sample = pack.NODE_CLASS_MAPPINGS["DifcacheSamplePipeline"]
    assert sample.INPUT_TYPES()["optional"]["extra_kwargs"][0] == "STRING"
    assert sample.INPUT_TYPES()["required"]["seed"][1]["control_after_generate"] is True
    assert sample.RETURN_TYPES == ("IMAGE", "STRING")
    patched = apply().execute(model=S.make_patcher("unet"), method="fora", interval=2, order=-1, warmup=-1,
                              start_percent=0.0, end_percent=1.0)[0]  # fmt: skip
    assert "difcache_cache" in patched.wrappers["outer_sample"]


def test_importing_without_comfyui_defines_no_v3_entrypoint():
    if importlib.util.find_spec("comfy_api") is not None:
        pytest.skip("comfy_api is importable in this environment")
    assert not hasattr(pack, "comfy_entrypoint")
    assert v3_entrypoint(pack.NODES) is None


def test_v3_nodes_mirror_the_v1_inputs_and_run(comfy_api):
    entrypoint = v3_entrypoint(pack.NODES)
    classes = asyncio.run(entrypoint().get_node_list())
    assert [c.define_schema().node_id for c in classes] == [n.node_id for n in pack.NODES]
    for cls, node in zip(classes, pack.NODES, strict=True):
        schema = cls.define_schema()
        assert issubclass(cls, comfy_api.io.ComfyNode) and schema.display_name == node.display_name
        v1 = pack.NODE_CLASS_MAPPINGS[node.node_id].INPUT_TYPES()
        assert [i.id for i in schema.inputs] == [*v1["required"], *v1.get("optional", {})]
        assert [o.io_type for o in schema.outputs] == list(pack.NODE_CLASS_MAPPINGS[node.node_id].RETURN_TYPES)
    pipe_types = {i.io_type for c in classes for i in c.define_schema().inputs if i.io_type == "DIFCACHE_PIPE"}
    assert pipe_types == {"DIFCACHE_PIPE"}
    apply = classes[0].define_schema().inputs
    assert apply[1].kwargs["options"] == ["always_compute", "fora", "taylorseer"] and apply[2].kwargs["min"] == -1
    out = classes[0].execute(model=S.make_patcher("wan"), method="taylorseer", interval=-1, order=-1, warmup=-1,
                             start_percent=0.0, end_percent=1.0)  # fmt: skip
    assert S.sample(out.args[0], "wan", steps=4).shape == S.inputs("wan")[0].shape


def test_an_incompatible_comfy_api_falls_back_to_v1(comfy_api, caplog):
    del comfy_api.io.Custom
    assert v3_entrypoint(pack.NODES) is None and "using V1 nodes" in caplog.text


# ---------------------------------------------------------------------------------------------- custom_nodes entry
def _load_entry(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_entry_point_exports_v1_without_comfy_api():
    entry = _load_entry("difcache_custom_nodes_v1")
    assert entry.NODE_CLASS_MAPPINGS is pack.NODE_CLASS_MAPPINGS and not hasattr(entry, "comfy_entrypoint")


def test_entry_point_exports_only_v3_when_available(comfy_api, monkeypatch):
    entry = _load_entry("difcache_custom_nodes_v3")
    assert callable(entry.comfy_entrypoint) and not hasattr(entry, "NODE_CLASS_MAPPINGS")
    monkeypatch.setenv("DIFCACHE_COMFY_V1", "1")
    assert hasattr(_load_entry("difcache_custom_nodes_forced"), "NODE_CLASS_MAPPINGS")


# ---------------------------------------------------------------------------------------------- workflows
def _widget_count(spec):
    inputs = {**spec["required"], **spec.get("optional", {})}
    widgets = [v for v in inputs.values() if isinstance(v[0], list) or v[0] in WIDGETS]
    return len(widgets) + sum(1 for v in widgets if len(v) > 1 and v[1].get("control_after_generate"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_is_consistent_with_the_nodes(path):
    wf = json.loads(path.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        assert link_id in nodes[src]["outputs"][src_slot]["links"] and nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert nodes[src]["outputs"][src_slot]["type"] == nodes[dst]["inputs"][dst_slot]["type"] == kind
    for node in (n for n in wf["nodes"] if n["type"] in pack.NODE_CLASS_MAPPINGS):
        cls = pack.NODE_CLASS_MAPPINGS[node["type"]]
        spec = cls.INPUT_TYPES()
        inputs = {**spec["required"], **spec.get("optional", {})}
        sockets = [(k, v[0]) for k, v in inputs.items() if not isinstance(v[0], list) and v[0] not in WIDGETS]
        assert [(i["name"], i["type"]) for i in node["inputs"]] == sockets
        assert all(i["link"] is not None for i in node["inputs"])
        assert [o["type"] for o in node["outputs"]] == list(cls.RETURN_TYPES)
        assert len(node["widgets_values"]) == _widget_count(spec)
        values = iter(node["widgets_values"])
        for name, v in inputs.items():
            if not (isinstance(v[0], list) or v[0] in WIDGETS):
                continue
            value = next(values)
            if isinstance(v[0], list):
                assert value in v[0], (name, value)
            elif v[0] in ("INT", "FLOAT"):
                assert v[1]["min"] <= value <= v[1]["max"], (name, value)
            if len(v) > 1 and v[1].get("control_after_generate"):
                assert next(values) in ("fixed", "increment", "decrement", "randomize")


def test_every_node_has_an_example_workflow():
    used = {n["type"] for path in WORKFLOWS for n in json.loads(path.read_text())["nodes"]}
    assert set(pack.NODE_CLASS_MAPPINGS) <= used


def test_stand_in_models_use_comfyui_class_names():
    """The adapters are keyed by these names; the stand-ins must not drift from them."""
    names = {type(S.make_patcher(f).model.diffusion_model).__name__ for f in ("flux", "wan", "unet")}
    assert names == {"Flux", "WanModel", "UNetModel"} <= set(pack.registered_comfy_adapters())
    blocks = {type(m).__name__ for f in ("flux", "wan", "unet") for m in S.make_patcher(f).model.modules()}
    assert {"DoubleStreamBlock", "SingleStreamBlock", "WanAttentionBlock", "BasicTransformerBlock"} <= blocks
    assert torch.is_tensor(S.inputs("flux")[0])


@pytest.mark.parametrize("how", ["registered_as_difcache", "custom_nodes_on_sys_path"])
def test_the_pack_loads_even_in_a_folder_named_difcache(tmp_path, how):
    """Loaders that register a custom-node folder under its own name (or put custom_nodes on sys.path) would make
    a folder called ``difcache`` shadow the real package; the entry point steps aside and all nodes load."""
    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / "difcache").symlink_to(ROOT, target_is_directory=True)
    src = pathlib.Path(difcache.__file__).resolve().parents[1]
    script = f"""
import importlib.util, sys
sys.path.insert(0, {str(src)!r})
if {how!r} == "custom_nodes_on_sys_path":
    sys.path.insert(0, {str(custom_nodes)!r})
spec = importlib.util.spec_from_file_location("difcache", {str(custom_nodes / "difcache" / "__init__.py")!r},
                                              submodule_search_locations=[{str(custom_nodes / "difcache")!r}])
pack = importlib.util.module_from_spec(spec)
sys.modules["difcache"] = pack  # what such a loader does before running the module
spec.loader.exec_module(pack)
import difcache
assert hasattr(difcache, "apply_cache"), difcache
print(len(pack.NODE_CLASS_MAPPINGS))
"""
    env = {**os.environ, "DIFCACHE_COMFY_V1": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == str(len(NODES))
