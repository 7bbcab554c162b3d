"""Configs: validated at construction, naming the field and range; family presets; round trip."""

import dataclasses

import pytest

import difcache
from difcache.methods.registry import _METHODS, resolve_config


@pytest.mark.parametrize(
    ("cls", "field", "value", "message"),
    [
        (difcache.TaylorSeerConfig, "interval", 0, "interval must be in [1, 1000]"),
        (difcache.TaylorSeerConfig, "order", 5, "order must be in [0, 4]"),
        (difcache.TaylorSeerConfig, "order", -1, "order must be in [0, 4]"),
        (difcache.TaylorSeerConfig, "warmup", -1, "warmup must be in [0, 1000]"),
        (difcache.FORAConfig, "interval", 0, "interval must be in [1, 1000]"),
    ],
)
def test_bad_values_name_field_and_range(cls, field, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cls(**{field: value})


def test_bool_is_not_an_int():
    with pytest.raises(TypeError, match="interval must be an int"):
        difcache.TaylorSeerConfig(interval=True)


def test_a_switch_takes_only_a_bool():
    with pytest.raises(TypeError, match=r"TaylorSeerConfig.lite must be True or False, got 1"):
        difcache.TaylorSeerConfig(lite=1)


def test_family_presets_from_official_code():
    assert difcache.TaylorSeerConfig.for_family("flux") == difcache.TaylorSeerConfig(6, 1, 3)
    assert difcache.TaylorSeerConfig.for_family("wan") == difcache.TaylorSeerConfig(5, 1, 1)
    assert difcache.TaylorSeerConfig.for_family("hunyuanvideo") == difcache.TaylorSeerConfig(5, 1, 1)
    assert difcache.TaylorSeerConfig.for_family("dit") == difcache.TaylorSeerConfig(4, 4, 2)


def test_overrides_are_validated_and_unknown_names_listed():
    assert resolve_config("taylorseer", "flux", {"interval": 3}).interval == 3
    with pytest.raises(ValueError, match="order must be"):
        resolve_config("taylorseer", "flux", {"order": 9})
    with pytest.raises(TypeError, match="no field"):
        resolve_config("fora", "dit", {"intervall": 3})


def test_unknown_method_lists_available():
    with pytest.raises(difcache.DifcacheError, match="Unknown method .*registered: .*taylorseer"):
        resolve_config("nope", "flux", {})


@pytest.mark.parametrize("name", sorted(_METHODS))
def test_every_config_round_trips_through_dict(name):
    config = _METHODS[name].config_cls()
    data = config.to_dict()
    assert data["method"] == name and data["version"] == type(config).VERSION
    fields = {f.name: data[f.name] for f in dataclasses.fields(config)}
    assert type(config)(**fields) == config


def test_list_methods_has_descriptions():
    methods = difcache.list_methods()
    assert {"fora", "taylorseer"} <= set(methods)
    assert all(isinstance(d, str) and d for d in methods.values())
