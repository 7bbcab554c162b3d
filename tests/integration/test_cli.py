"""The ``difcache`` command end to end on tiny inputs: ``list``, ``bench`` (difcache and the alternatives in one
process, JSON/Markdown/Pareto written, FID and peak memory reported), ``calibrate`` and ``demo``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from difcache.bench.alternatives import ALTERNATIVES
from difcache.bench.run import BenchTarget, alternative_variant, difcache_variant, run_bench
from difcache.cli import _parse_setting, main
from difcache.models import CLASSES, available, bundled, make_images


def test_parse_setting_reads_python_literals():
    assert _parse_setting("taylorseer:interval=4,order=2") == ("taylorseer", {"interval": 4, "order": 2})
    assert _parse_setting("bac:profile='p.json',forecast=taylor") == (
        "bac",
        {"profile": "p.json", "forecast": "taylor"},
    )
    # commas inside brackets belong to the value: tuples such as TeaCache's coefficients can be given
    assert _parse_setting("teacache:coefficients=(1.0,0.0),threshold=0.1") == (
        "teacache",
        {"coefficients": (1.0, 0.0), "threshold": 0.1},
    )
    with pytest.raises(ValueError, match="expected key=value"):
        _parse_setting("taylorseer:interval")


def test_list_names_methods_and_alternatives(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("taylorseer", "deepcache", "ertacache", "bac", "diffusers-magcache", "cache-dit-dbcache"):
        assert name in out


def test_bench_on_a_tiny_family_writes_every_report(tmp_path):
    code = main([
        "bench", "--model", "tiny:dit", "--steps", "6", "--seeds", "0", "--repeats", "1", "--out", str(tmp_path),
        "--variants", "fora:interval=2", "taylorseer:interval=2,warmup=1", "diffusers-fbc:threshold=0.2",
    ])  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["label"]: r for r in report["rows"]}
    assert set(rows) == {"fora interval=2", "taylorseer interval=2,warmup=1", "diffusers-fbc threshold=0.2"}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["measured_speedup"] > 0 and row["psnr"] > 10 and row["peak_mib"] > 0
    assert rows["fora interval=2"]["ideal_speedup"] > 1.2
    assert rows["fora interval=2"]["engine_efficiency"] is not None  # difcache rows get an oracle
    assert rows["diffusers-fbc threshold=0.2"]["engine_efficiency"] is None
    assert report["uncached_peak_mib"] > 0 and report["fid_samples"] == 0  # tiny families have no FID
    assert "| uncached |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "pareto_ideal.png").exists() and (tmp_path / "pareto_measured.png").exists()


def test_unknown_bench_model_is_a_clear_error(capsys):
    assert main(["bench", "--model", "nope", "--variants", "fora"]) == 2
    assert "dit, unet, video or tiny:<family>" in capsys.readouterr().err


def _shapes_target(fid: bool) -> BenchTarget:
    """The bundled DiT architecture with random weights: a custom pipeline class, as users write them."""
    torch.manual_seed(0)
    pipe = bundled.dit_pipeline(bundled.build("dit").eval())
    pipe.set_progress_bar_config(disable=True)
    size = pipe.transformer.config.sample_size

    def call(seed: int, n: int = 2) -> torch.Tensor:
        labels = [(seed + k) % len(CLASSES) for k in range(n)]
        return pipe(labels, num_inference_steps=6, generator=torch.Generator().manual_seed(seed)).images

    def calibration_calls(n: int) -> list[dict]:
        return [{"class_labels": [i % len(CLASSES)], "generator": torch.Generator().manual_seed(1000 + i)}
                for i in range(n)]  # fmt: skip

    return BenchTarget(
        "random shapes DiT", pipe, call, 6, (0,),
        (lambda n: call(7, n)) if fid else None,
        (lambda n: (make_images(n, size=size, seed=1)[0] + 1) / 2) if fid else None,
        calibration_calls=calibration_calls,
    )  # fmt: skip


@pytest.mark.skipif(not ALTERNATIVES["cache-dit-dbcache"].available(), reason="cache-dit is not installed")
def test_cache_dit_runs_on_a_custom_pipeline_through_its_transformer_adapter():
    report = run_bench(
        _shapes_target(fid=False), [alternative_variant("cache-dit-dbcache", threshold=0.5, warmup=1)], repeats=1
    )
    (row,) = report["rows"]
    assert row["status"] == "ok", row["status"]
    assert row["psnr"] > 10
    assert row["ideal_speedup"] >= 1.0


def test_diffusers_hooks_restart_every_call_on_a_pipeline_without_cache_mixin():
    """DiT has no CacheMixin, so diffusers never resets its hooks; the bench must, or call 2 reuses call 1."""
    from difcache.bench.run import _resetting

    target = _shapes_target(fid=False)
    remove = ALTERNATIVES["diffusers-taylorseer"].apply(target.pipe, {"interval": 2, "warmup": 1}, target.steps)
    try:
        first, stale = target.call(0), target.call(0)
        fresh = _resetting(target, remove).call(0)
    finally:
        remove()
    assert not torch.equal(first, stale)  # without the reset the second call starts mid-schedule
    assert torch.equal(first, fresh)


@pytest.mark.skipif("classifier" not in available(), reason="bundled classifier weights missing")
def test_bench_fid_uses_the_bundled_classifier():
    report = run_bench(_shapes_target(fid=True), [difcache_variant("fora", interval=3)], repeats=1, fid_samples=8)
    (row,) = report["rows"]
    assert report["fid_samples"] == 8
    assert math.isfinite(report["uncached_fid"]) and math.isfinite(row["fid"])
    assert row["fid"] != report["uncached_fid"]  # the cached samples differ, so does their FID


def test_calibrate_command_writes_a_profile(tmp_path, monkeypatch):
    import difcache.bench.targets as targets

    monkeypatch.setattr(targets, "build_target", lambda name, steps, seeds: _shapes_target(fid=False))
    out = tmp_path / "teacache.json"
    assert main(["calibrate", "--model", "dit", "--method", "teacache", "--steps", "6", "--calls", "2",
                 "--out", str(out)]) == 0  # fmt: skip
    profile = json.loads(out.read_text())
    assert profile["method"] == "teacache"


@pytest.mark.skipif(not {"dit", "unet"} <= set(available()), reason="bundled weights missing")
def test_demo_writes_side_by_side_pictures_and_reports(tmp_path, capsys):
    assert main(["demo", "--steps", "6", "--seeds", "0", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "measured" in out and "ideal" in out and "PSNR" in out
    for name in ("dit", "unet"):
        assert (tmp_path / f"demo_{name}.png").stat().st_size > 1000


@pytest.mark.skipif(not {"dit", "unet"} <= set(available()), reason="bundled weights missing")
def test_demo_runs_autotuned_profiles(tmp_path, capsys, monkeypatch):
    import difcache.demo

    monkeypatch.setattr(difcache.demo, "AUTOTUNE_SECONDS", 0.0)  # the first shortlisted candidate only
    assert main(["demo", "--steps", "8", "--seeds", "0", "--autotune", "1.5", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("autotune 1.5x (") == 2 and "ideal" in out  # both models ran a tuned profile
    assert (tmp_path / "demo_unet.png").stat().st_size > 1000


def test_structural_settings_get_their_own_pareto_curve():
    from difcache.bench.run import curve_of

    assert curve_of("taylorseer", {"interval": 3, "order": 2}) == "difcache:taylorseer"
    assert curve_of("taylorseer", {"interval": 3, "lite": False}) == "difcache:taylorseer"
    assert curve_of("taylorseer", {"interval": 3, "lite": True}) == "difcache:taylorseer lite=True"
    first_block = curve_of("teacache", {"indicator": "first_block_residual"})
    assert first_block == "difcache:teacache indicator=first_block_residual"


def test_pareto_points_keep_finite_psnr_and_draw_identical_outputs_above_them():
    from difcache.bench.run import pareto_points

    rows = [{"status": "ok", "group": "g", "ideal_speedup": s, "psnr": p} for s, p in ((1.0, float("inf")),
            (1.3, 63.1), (2.0, 40.0))] + [{"status": "failed: x", "group": "g", "ideal_speedup": None, "psnr": None}]
    groups, cap = pareto_points(rows, "ideal_speedup")
    assert cap == 70 and groups == {"g": [(1.0, 70), (1.3, 63.1), (2.0, 40.0)]}  # 63.1 is not clipped
    assert pareto_points(rows[1:], "ideal_speedup")[1] is None  # no identical output, nothing to explain


def test_markdown_rows_pads_short_rows():
    from difcache.bench.run import markdown_rows

    assert markdown_rows(["a", "b"], [["1"], ["2", "3"]]) == "| a | b |\n|---|---|\n| 1 |  |\n| 2 | 3 |"


def test_a_curve_is_drawn_through_its_frontier():
    from difcache.bench.run import frontier

    points = [(1.0, 50.0), (2.0, 40.0), (2.0, 45.0), (3.0, 30.0), (2.5, 46.0), (1.5, 44.0)]
    assert frontier(points) == [(1.0, 50.0), (2.5, 46.0), (3.0, 30.0)]  # each beaten by one faster and better


def test_matched_comparison_takes_the_best_difcache_row_at_least_as_fast():
    from difcache.bench.run import markdown_table, matched_comparison

    def row(label, group, ideal, psnr, status="ok"):
        return {"label": label, "group": group, "ideal_speedup": ideal, "psnr": psnr, "status": status,
                "measured_speedup": None, "oracle_speedup": None, "engine_efficiency": None, "ssim": None,
                "store_mib": None}  # fmt: skip

    report = {"target": "t", "steps": 2, "seeds": [0], "repeats": 1, "uncached_seconds": 1.0, "threads": 1,
              "torch": "x", "rows": [
                  row("ours slow", "difcache:a", 1.5, 40.0), row("ours fast", "difcache:b", 3.0, 31.0),
                  row("alt mid", "alt", 2.0, 35.0), row("alt slow", "alt", 1.4, 39.0),
                  row("alt fastest", "alt", 5.0, 20.0), row("alt broken", "alt", None, None, "failed: x"),
                  row("alt same", "alt", 3.0, 31.0)]}  # fmt: skip
    result = {c["label"]: c for c in matched_comparison(report)}
    assert set(result) == {"alt mid", "alt slow", "alt fastest", "alt same"}
    assert result["alt same"]["tie"] and not result["alt same"]["beaten"]
    assert result["alt slow"]["difcache"]["label"] == "ours slow" and result["alt slow"]["beaten"]
    assert result["alt mid"]["difcache"]["label"] == "ours fast" and not result["alt mid"]["beaten"]
    assert result["alt fastest"]["difcache"] is None and not result["alt fastest"]["beaten"]
    assert "| alt mid | 2.00× | 35.00 | ours fast | 3.00× | 31.00 | **no** |" in markdown_table(report)


def test_autotune_command_writes_a_profile_and_its_figure(tmp_path, capsys):
    out = tmp_path / "tiny-dit.json"
    assert main(["autotune", "--model", "tiny:dit", "--speedup", "1.5", "--steps", "6", "--calls", "1",
                 "--seconds", "0", "--out", str(out)]) == 0  # fmt: skip
    profile = json.loads(out.read_text())
    assert profile["method"] == "autotune" and profile["num_steps"] == 6
    assert profile["data"]["ideal_speedup"] >= 1.5
    printed = capsys.readouterr().out
    assert f'profile="{out}"' in printed
    if "matplotlib" in printed or out.with_suffix(".png").exists():
        assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize("speedup", ["1", "0.5", "x"])
def test_autotune_command_refuses_a_bad_speedup_in_one_line(speedup, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["autotune", "--speedup", speedup, "--out", "x.json"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_bench_autotune_compares_with_each_curve_at_equal_work(tmp_path):
    code = main([
        "bench", "--model", "tiny:dit", "--steps", "6", "--seeds", "0", "--repeats", "1", "--out", str(tmp_path),
        "--autotune", "1.5", "--calls", "1", "--variants", "diffusers-taylorseer:interval=2,warmup=1",
        "taylorseer:interval=3,warmup=1",
    ])  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["label"]: r for r in report["rows"]}
    tuned = rows["autotune 1.5x"]
    assert tuned["status"] == "ok" and tuned["ideal_speedup"] >= 1.5
    assert tuned["setting"]["tuned_seconds"] > 0 and tuned["setting"]["chosen"]
    assert tuned["measured_speedup"] is not None and tuned["engine_efficiency"] is not None  # timed in stage 2
    (margins,) = report["autotune"]["margins"]
    for best in margins["margins"].values():
        if best is not None:
            assert rows[best["label"]]["ideal_speedup"] >= tuned["ideal_speedup"]
            assert best["margin"] == pytest.approx(tuned["psnr"] - rows[best["label"]]["psnr"])
    assert "autotune against each curve" in (tmp_path / "bench.md").read_text()


def test_autotune_margins_take_each_curves_best_row_at_the_same_or_less_work():
    from difcache.bench.run import autotune_margins

    def row(label, group, ideal, psnr):
        return {"label": label, "group": group, "ideal_speedup": ideal, "psnr": psnr, "status": "ok",
                "measured_speedup": None}  # fmt: skip

    report = {"rows": [
        row("tuned", "difcache:autotune", 3.0, 40.0),
        row("a slow", "alt", 2.5, 45.0),  # more work: not a competitor
        row("a fast", "alt", 3.2, 37.0), row("a faster", "alt", 4.0, 33.0),
        row("b fast", "difcache:taylorseer", 3.0, 38.5),
        row("c slow", "other", 2.0, 50.0),
    ]}  # fmt: skip
    (result,) = autotune_margins(report)
    assert result["margins"]["alt"]["label"] == "a fast" and result["margins"]["alt"]["margin"] == pytest.approx(3.0)
    assert result["margins"]["difcache:taylorseer"]["margin"] == pytest.approx(1.5)
    assert result["margins"]["other"] is None
