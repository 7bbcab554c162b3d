"""Generation: settings parsing, sample files, resumption (existing samples are skipped), manifests, FLOPs stats."""

import json

import pytest
import torch
from accelerate import PartialState

from difcache.errors import DifcacheError
from difcache.eval.generate import (
    UNCACHED,
    SampleStore,
    batches_of,
    generate,
    load_sample,
    make_items,
    parse_setting,
    save_sample,
    setting_summary,
    settings_from_cli,
)
from difcache.eval.samplers import Sampler, load_sampler


@pytest.fixture(autouse=True)
def _one_thread():
    """The machine is shared: more threads than free cores makes these runs 40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _counting_sampler(calls: list[list[int]]) -> Sampler:
    """A fast stand-in: noise from each item's seed; records which items each call made."""

    def run(items):
        calls.append([item.index for item in items])
        return torch.stack([torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i.seed)) for i in items])

    return Sampler("test", "counting test sampler", None, "image", "none", run, settings={"steps": 1})


def test_parse_settings():
    assert parse_setting("uncached") is UNCACHED
    fora = parse_setting("fora:interval=3,warmup=2")
    assert (fora.method, dict(fora.overrides)) == ("fora", {"interval": 3, "warmup": 2})
    assert fora.slug == "fora-interval=3+warmup=2"
    erta = parse_setting("ertacache:profile=runs/dit-ertacache.json")
    assert (erta.method, dict(erta.overrides)) == ("ertacache", {"profile": "runs/dit-ertacache.json"})
    settings = settings_from_cli(["taylorseer", "taylorseer"], ["fora:interval=2"])
    assert [s.label for s in settings] == ["uncached", "taylorseer", "fora:interval=2"]
    with pytest.raises(DifcacheError, match="registered"):
        parse_setting("nosuchcache")
    with pytest.raises(DifcacheError, match="key=value"):
        parse_setting("fora:interval")
    with pytest.raises(DifcacheError, match="does not exist"):
        parse_setting("missing-config.json")


def test_json_config_file(tmp_path):
    path = tmp_path / "slow-fora.json"
    path.write_text(json.dumps({"method": "fora", "interval": 4}))
    setting = parse_setting(str(path))
    assert (setting.label, setting.method, dict(setting.overrides)) == ("slow-fora", "fora", {"interval": 4})


def test_sample_files_round_trip(tmp_path):
    image = torch.rand(3, 10, 12)
    save_sample(tmp_path / "a.png", image)
    loaded = load_sample(tmp_path / "a.png")
    assert loaded.dtype == torch.uint8 and loaded.shape == (3, 10, 12)
    assert torch.equal(loaded, (image * 255).round().to(torch.uint8))
    video = torch.rand(5, 3, 6, 4)
    save_sample(tmp_path / "v.png", video)
    assert torch.equal(load_sample(tmp_path / "v.png"), (video * 255).round().to(torch.uint8))
    assert not list(tmp_path.glob(".*tmp"))  # written atomically


def test_batches_do_not_depend_on_processes():
    items = make_items(10, seed=5, conditions=[0, 1, 2])
    assert [i.seed for i in items] == list(range(5, 15))
    assert [i.condition for i in items][:4] == [0, 1, 2, 0]
    assert [[i.index for i in b] for b in batches_of(items, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_resumption_skips_existing_samples(tmp_path):
    state = PartialState(cpu=True)
    calls: list[list[int]] = []
    sampler = _counting_sampler(calls)
    items = make_items(10)
    first = generate(sampler, [UNCACHED], items, tmp_path, batch_size=4, state=state, progress=False)
    assert first["uncached"].generated == 10 and calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    store = SampleStore(tmp_path, UNCACHED)
    before = {item.index: store.path(item).stat().st_mtime_ns for item in items}
    kept = load_sample(store.path(items[4]))

    calls.clear()
    again = generate(sampler, [UNCACHED], items, tmp_path, batch_size=4, state=state, progress=False)
    assert calls == [] and again["uncached"].generated == 0 and again["uncached"].skipped == 10

    store.path(items[5]).unlink()  # a lost sample: its batch is made again, only the missing file is written
    calls.clear()
    third = generate(sampler, [UNCACHED], items, tmp_path, batch_size=4, state=state, progress=False)
    assert calls == [[4, 5, 6, 7]] and third["uncached"].generated == 1
    assert store.path(items[4]).stat().st_mtime_ns == before[4]
    assert torch.equal(load_sample(store.path(items[4])), kept)
    assert torch.equal(load_sample(store.path(items[5])), (sampler.run([items[5]])[0] * 255).round().to(torch.uint8))

    # More samples later: only the new ones are made.
    calls.clear()
    generate(sampler, [UNCACHED], make_items(12), tmp_path, batch_size=4, state=state, progress=False)
    assert calls == [[8, 9, 10, 11]]


def test_changed_settings_are_refused(tmp_path):
    state = PartialState(cpu=True)
    sampler = _counting_sampler([])
    generate(sampler, [UNCACHED], make_items(4), tmp_path, batch_size=2, state=state, progress=False)
    with pytest.raises(DifcacheError, match="batch_size"):
        generate(sampler, [UNCACHED], make_items(4), tmp_path, batch_size=3, state=state, progress=False)


def test_cached_generation_records_flops_and_restores_the_pipeline(tmp_path):
    state = PartialState(cpu=True)
    sampler = load_sampler("random:dit", steps=6)
    items = make_items(4, conditions=[0, 1])
    settings = settings_from_cli(["fora"], ["always_compute"])
    generate(sampler, settings, items, tmp_path, batch_size=2, state=state, progress=False)
    fora = setting_summary(SampleStore(tmp_path, settings[1]), items)
    assert fora["ideal_speedup"] > 1.2 and fora["decisions"]["reuse"] > 0
    assert setting_summary(SampleStore(tmp_path, settings[0]), items)["ideal_speedup"] == 1.0
    assert setting_summary(SampleStore(tmp_path, settings[2]), items)["ideal_speedup"] == pytest.approx(1.0)
    assert getattr(sampler.pipe.transformer, "_difcache_cache", None) is None  # every cache was removed
    # always_compute changes nothing: the same files as the uncached baseline.
    for item in items:
        base = load_sample(SampleStore(tmp_path, settings[0]).path(item))
        assert torch.equal(load_sample(SampleStore(tmp_path, settings[2]).path(item)), base)
