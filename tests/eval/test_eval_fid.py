"""End-to-end FID runs (``scripts/eval_fid.py``'s code) on tiny models, and its errors for bad inputs."""

import json
import math

import pytest
import torch

from difcache.eval.runs import fid_parser, main_fid, run_fid
from difcache.models import available


@pytest.fixture(autouse=True)
def _one_thread():
    """The machine is shared: more threads than free cores makes these runs many times slower."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # run_fid sets --threads (1)


def _run(argv, lines=None):
    return run_fid(fid_parser().parse_args(argv), log=(lines.append if lines is not None else lambda _: None))


def test_fid_run_on_random_stand_in_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", "random:dit", "--method", "fora", "always_compute", "--config", "taylorseer:interval=3",
            "--num-samples", "8", "--batch-size", "4", "--steps", "6", "--features", "random", "--out", str(out),
            "--no-progress"]  # fmt: skip
    lines: list[str] = []
    report = _run(argv, lines)
    rows = {r["label"]: r for r in report["rows"]}
    assert list(rows) == ["uncached", "fora", "always_compute", "taylorseer:interval=3"]
    assert report["meta"]["features"] == "random" and "RANDOM" in report["notes"][0]
    assert any("RANDOM" in line for line in lines)  # the run says which extractor it used
    base, fora, same = rows["uncached"], rows["fora"], rows["always_compute"]
    assert base["psnr"] is None and base["fid_vs_uncached"] is None and math.isfinite(base["fid"])
    # always_compute is bit-identical to uncached: infinite PSNR, SSIM 1, no distance to the uncached samples.
    assert math.isinf(same["psnr"]) and same["ssim"] == pytest.approx(1.0)
    assert same["fid_vs_uncached"] == pytest.approx(0.0, abs=1e-4) and same["fid"] == pytest.approx(base["fid"])
    for row in (fora, rows["taylorseer:interval=3"]):
        assert row["ideal_speedup"] > 1.2 and 10 < row["psnr"] < 80 and 0 < row["ssim"] < 1
        assert row["fid_vs_uncached"] > 0
    assert len(list((out / "samples").glob("*/*.png"))) == 4 * 8
    saved = json.loads((out / "fid.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))
    markdown = (out / "fid.md").read_text()
    assert "| fora |" in markdown and "| FID vs uncached |" in markdown and "RANDOM" in markdown

    # Resumed: nothing is generated again and every metric is the same.
    lines.clear()
    again = _run(argv, lines)
    assert any("0 generated, 8 already there" in line for line in lines)
    assert json.dumps(again["rows"]) == json.dumps(report["rows"])

    # Other seeds into the same folder would mix samples: refused, naming the field.
    assert main_fid([*argv, "--seed", "1"]) == 2
    assert "seed: 0 then, 1 now" in capsys.readouterr().err


def test_reference_folder_and_clip(tmp_path):
    from PIL import Image
    from test_eval_metrics import _tiny_clip

    reference = tmp_path / "real"
    reference.mkdir()
    g = torch.Generator().manual_seed(0)
    for k in range(6):
        array = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(array).save(reference / f"{k}.png")
    clip = tmp_path / "clip"
    clip.mkdir()
    _tiny_clip(clip)
    report = _run(["--model", "random:dit", "--method", "fora", "--num-samples", "4", "--batch-size", "4",
                   "--steps", "4", "--features", "random", "--reference", str(reference), "--clip", str(clip),
                   "--out", str(tmp_path / "run"), "--no-progress"])  # fmt: skip
    assert "images in" in report["notes"][1]
    for row in report["rows"]:
        assert math.isfinite(row["fid"]) and row["clip"] is not None and row["clip"] >= 0


@pytest.mark.skipif(
    not {"dit", "classifier"} <= set(available()),
    reason="bundled weights missing (dit.safetensors / classifier.safetensors): train with scripts/train_bundled.py",
)
def test_fid_on_the_bundled_dit_with_bundled_features(tmp_path):
    lines: list[str] = []
    report = _run(["--model", "dit", "--method", "taylorseer", "--num-samples", "16", "--batch-size", "8",
                   "--steps", "12", "--features", "auto", "--out", str(tmp_path), "--no-progress"], lines)  # fmt: skip
    assert report["meta"]["features"] in ("bundled", "inception")
    if report["meta"]["features"] == "bundled":
        assert any("Inception unavailable" in line for line in lines)
    base, cached = report["rows"]
    assert math.isfinite(base["fid"]) and math.isfinite(cached["fid"]) and cached["ideal_speedup"] > 1.2
    assert 10 < cached["psnr"] < 80 and cached["fid_vs_uncached"] > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "nosuch"], "Unknown --model"),
        (["--model", "random:dit", "--prompts", "/nonexistent/prompts.txt"], "does not exist"),
        (["--model", "random:dit", "--reference", "/nonexistent/real"], "not a folder"),
        (["--model", "random:dit", "--clip", "/nonexistent/clip"], "--clip"),
        (["--model", "random:unet", "--class-labels", "1"], "unconditional"),
        (["--model", "random:dit", "--method", "nosuch"], "registered"),
        (["--model", "random:video"], "eval_vbench.py"),
        (["--model", "random:dit", "--config", "fora:interval"], "key=value"),
        (["--model", "random:dit", "--method", "ertacache"], "needs a profile"),
    ],
)
def test_bad_inputs_fail_with_the_fix(tmp_path, capsys, extra, message):
    common = ["--num-samples", "2", "--steps", "2", "--features", "none", "--out", str(tmp_path), "--no-progress"]
    code = main_fid([*extra, *common])
    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_inception_weights_fail_clearly(tmp_path, capsys):
    from difcache.eval.features import inception_status

    if inception_status()[0]:
        pytest.skip("Inception weights and torch-fidelity are present here")
    code = main_fid(["--model", "random:dit", "--num-samples", "2", "--batch-size", "2", "--steps", "2",
                     "--features", "inception", "--out", str(tmp_path), "--no-progress"])  # fmt: skip
    assert code == 2
    assert "Inception FID is unavailable" in capsys.readouterr().err
