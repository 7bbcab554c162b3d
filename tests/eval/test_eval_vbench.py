"""The VBench run (``scripts/eval_vbench.py``'s code): VBench's layout, offline metrics labelled as not VBench."""

import importlib.util
import math

import pytest
import torch
from PIL import Image, ImageSequence

from difcache.errors import DifcacheError
from difcache.eval.samplers import load_sampler
from difcache.eval.vbench import main, run, vbench_items, vbench_parser
from difcache.models import available


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the run sets --threads (1)


def test_video_run_writes_vbench_layout_and_offline_metrics(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a circle moving left\n\na cross spinning\n")
    argv = ["--model", "random:video", "--method", "taylorseer", "--prompts", str(prompts), "--videos-per-prompt", "2",
            "--steps", "4", "--batch-size", "2", "--features", "random", "--out", str(tmp_path / "run"),
            "--no-progress"]  # fmt: skip
    report = run(vbench_parser().parse_args(argv), log=lambda _: None)
    base, cached = report["rows"]
    assert base["psnr"] is None and 0 < base["temporal_flickering"] <= 1
    assert math.isfinite(cached["psnr"]) and 0 < cached["ssim"] <= 1 and cached["frame_fid_vs_uncached"] > 0
    assert cached["ideal_speedup"] > 1.2
    assert sum("not VBench" in note for note in report["notes"]) >= 3

    suffix = "mp4" if importlib.util.find_spec("av") else "gif"
    for setting in ("uncached", "taylorseer"):
        folder = tmp_path / "run" / "vbench" / setting
        names = sorted(p.name for p in folder.iterdir())
        expected = [f"{p}-{i}.{suffix}" for p in ("a circle moving left", "a cross spinning") for i in (0, 1)]
        assert names == sorted(expected)
    if suffix == "gif":
        with Image.open(tmp_path / "run" / "vbench" / "uncached" / "a cross spinning-1.gif") as gif:
            frames = list(ImageSequence.Iterator(gif))
            assert len(frames) == 8 and gif.size == (16, 16)
    commands = (tmp_path / "run" / "vbench" / "commands.sh").read_text()
    assert commands.count("vbench evaluate") == 2 * len(vbench_parser().parse_args(argv).dimensions)
    assert "--mode custom_input" in commands and "--dimension temporal_flickering" in commands
    assert (tmp_path / "run" / "vbench.md").read_text().count("not VBench") >= 3


def test_vbench_names_and_prompt_mapping():
    sampler = load_sampler("random:video", steps=2)
    items = vbench_items(sampler, ["a square / box", "2"], videos_per_prompt=3, seed=10)
    assert [i.stem for i in items[:4]] == ["a square _ box-0", "a square _ box-1", "a square _ box-2", "2-0"]
    assert [i.seed for i in items] == list(range(10, 16))
    assert items[0].condition == sampler.class_names.index("square") and items[3].condition == 2
    with pytest.raises(DifcacheError, match="exactly one of its classes"):
        vbench_items(sampler, ["a dog running"], 1, 0)
    with pytest.raises(DifcacheError, match="duplicate"):
        vbench_items(sampler, ["a circle", "a circle"], 1, 0)


def test_run_vbench_without_vbench_installed_says_how(tmp_path, capsys):
    if importlib.util.find_spec("vbench") is not None:
        pytest.skip("vbench is installed here")
    code = main(["--model", "random:video", "--run-vbench", "--features", "none", "--out", str(tmp_path)])
    assert code == 2 and "own environment" in capsys.readouterr().err


@pytest.mark.skipif("video" not in available(), reason="bundled weights missing (video.safetensors): "
                    "train with scripts/train_bundled.py video")  # fmt: skip
def test_bundled_video_model(tmp_path):
    report = run(vbench_parser().parse_args(["--model", "video", "--method", "taylorseer", "--num-prompts", "2",
                                             "--videos-per-prompt", "1", "--steps", "10", "--features", "none",
                                             "--out", str(tmp_path), "--no-progress"]), log=lambda _: None)  # fmt: skip
    base, cached = report["rows"]
    assert 0 < base["temporal_flickering"] <= 1 and 10 < cached["psnr"] < 80
