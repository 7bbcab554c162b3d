"""What users do every day keeps working or fails loudly, never silently wrong (one test per case, on the real
pipeline classes), and a load test: many calls of one cached pipeline with random batch sizes, resolutions,
step counts, CFG and interruptions, each equal to a fresh cache's output for the same call."""

from __future__ import annotations

import copy
import gc
import json
import pickle
import random
import threading
import warnings

import diffusers as d
import pytest
import torch

import difcache
from difcache.cli import main
from difcache.models.tiny import tiny, tiny_call_kwargs


def _images(out) -> torch.Tensor:
    return torch.as_tensor(out.images if hasattr(out, "images") else out.frames)


def _flux(**kwargs):
    pipe = tiny("flux")
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------ silent
def test_swapping_the_scheduler_keeps_caching_and_says_where_steps_came_from():
    pipe = tiny("dit")
    pipe.set_progress_bar_config(disable=True)
    with difcache.apply_cache(pipe, "fora", interval=2) as handle:
        pipe(**tiny_call_kwargs("dit", num_inference_steps=10))
        before = handle.stats().ideal_speedup
        handle.reset_stats()
        pipe.scheduler = d.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe(**tiny_call_kwargs("dit", num_inference_steps=10))
        pipe(**tiny_call_kwargs("dit", num_inference_steps=10))
        stats = handle.stats()
    assert stats.ideal_speedup == pytest.approx(before, rel=0.01) and stats.runs == 2
    assert "DPMSolverMultistepScheduler" in stats.steps_source


def test_a_second_pipeline_sharing_the_denoiser_is_cached_too():
    pipe = _flux()
    other = d.FluxPipeline(**{**pipe.components, "scheduler": d.FlowMatchEulerDiscreteScheduler()})
    other.set_progress_bar_config(disable=True)
    with difcache.apply_cache(pipe, "fora", interval=2) as handle:
        first = _images(pipe(**tiny_call_kwargs("flux", num_inference_steps=8)))
        handle.reset_stats()
        second = _images(other(**tiny_call_kwargs("flux", num_inference_steps=8)))
        stats = handle.stats()
    assert stats.ideal_speedup > 1.5 and "calling pipeline" in stats.steps_source
    assert torch.equal(first, second)  # same components, same seed: the same cached result


def test_a_second_thread_mid_run_is_refused_with_a_clear_error():
    pipe = _flux()
    other = d.FluxPipeline(**{**pipe.components, "scheduler": d.FlowMatchEulerDiscreteScheduler()})
    other.set_progress_bar_config(disable=True)
    errors: list[BaseException] = []

    def run_other():
        try:
            other(**tiny_call_kwargs("flux", num_inference_steps=4))
        except difcache.DifcacheError as err:
            errors.append(err)

    def at_step(p, step, t, kwargs):
        if step == 1:  # the first pipeline is mid-run: start the second in another thread and wait for it
            thread = threading.Thread(target=run_other)
            thread.start()
            thread.join()
        return kwargs

    with difcache.apply_cache(pipe, "fora", interval=2):
        expected = _images(pipe(**tiny_call_kwargs("flux", num_inference_steps=6)))
        got = _images(pipe(**tiny_call_kwargs("flux", num_inference_steps=6), callback_on_step_end=at_step))
    assert len(errors) == 1 and "another thread" in str(errors[0])
    assert torch.equal(got, expected)  # the first pipeline's run is unaffected


def test_warmup_longer_than_the_run_warns():
    pipe = tiny("dit")
    pipe.set_progress_bar_config(disable=True)
    with difcache.apply_cache(pipe, "taylorseer", warmup=20), pytest.warns(UserWarning, match="nothing is cached"):
        pipe(**tiny_call_kwargs("dit", num_inference_steps=8))


def test_teacache_profile_for_another_indicator_or_with_bad_coefficients_is_refused(tmp_path):
    pipe = _flux()
    profile = difcache.calibrate(pipe, "teacache", [tiny_call_kwargs("flux", num_inference_steps=8)], 8)
    with pytest.raises(difcache.DifcacheError, match="indicator='modulated_input'.*first_block_residual"):
        difcache.apply_cache(pipe, "teacache", profile=profile, indicator="first_block_residual")
    for bad in ([float("nan"), 1.0], [], ["x"], None):
        raw = json.loads(json.dumps(profile.__dict__))
        if bad is None:
            del raw["data"]["coefficients"]
        else:
            raw["data"]["coefficients"] = bad
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(raw))
        with pytest.raises(difcache.DifcacheError, match="data.coefficients"):
            difcache.apply_cache(pipe, "teacache", profile=path)
    with pytest.raises(difcache.DifcacheError, match="is a directory"):
        difcache.apply_cache(pipe, "teacache", profile=tmp_path)


def _poison_at(module: torch.nn.Module, call: int):
    """Make ``module``'s output non-finite on its ``call``-th call."""
    count = {"n": -1}

    def hook(m, args, output):
        count["n"] += 1
        if count["n"] == call:
            return torch.full_like(output, float("nan"))
        return output

    return module.register_forward_hook(hook)


@pytest.mark.parametrize(
    ("method", "settings", "module"),
    [
        ("fora", {"interval": 3}, lambda t: t.transformer_blocks[0].ff),
        ("delta_dit", {"interval": 3, "num_cached_blocks": 1}, lambda t: t.transformer_blocks[1].ff),
    ],
)
def test_reuse_methods_recompute_instead_of_replaying_a_non_finite_output(method, settings, module):
    pipe = tiny("dit")
    pipe.set_progress_bar_config(disable=True)
    with difcache.apply_cache(pipe, method, **settings) as handle:
        hook = _poison_at(module(pipe.transformer), 0)  # the first (computed) call
        pipe(**tiny_call_kwargs("dit", num_inference_steps=8))
        hook.remove()
        stats = handle.stats()
    assert stats.totals()["nonfinite_fallbacks"] >= 1 and stats.totals()["reuse"] == 0


def test_teacache_recomputes_instead_of_replaying_a_non_finite_residual():
    # A non-finite model output would make TeaCache's own indicator non-finite (it then computes anyway), so the
    # stored residual is corrupted directly, as a non-finite value the indicator cannot see would be.
    pipe = _flux()
    with difcache.apply_cache(pipe, "teacache", threshold=5.0) as handle:
        store = handle._runtime.store

        def corrupt(p, step, t, kwargs):
            for entries in store._slots.values():
                for entry in entries:
                    entry.peak = float("nan")
            return kwargs

        pipe(**tiny_call_kwargs("flux", num_inference_steps=8), callback_on_step_end=corrupt)
        stats = handle.stats()
    assert stats.totals()["nonfinite_fallbacks"] >= 1 and stats.totals()["reuse"] == 0


def test_bare_module_one_step_calls_are_runs_of_their_own():
    pipe = tiny("dit")
    model = pipe.transformer
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 999])
    labels = torch.tensor([0, 1])
    with difcache.apply_cache(model, "fora", interval=2) as handle:
        first = model(x, timestep=t, class_labels=labels).sample
        second = model(x, timestep=t, class_labels=labels).sample
        stats = handle.stats()
    assert stats.runs == 2 and torch.equal(first, second) and stats.totals()["reuse"] == 0


# ------------------------------------------------------------------------------------------------ loud
def test_copying_or_pickling_a_cached_model_says_why_and_leaves_the_original_intact(tmp_path):
    pipe = _flux()
    handle = difcache.apply_cache(pipe, "fora")
    with pytest.raises(difcache.DifcacheError, match="cannot be copied or pickled.*state_dict"):
        copy.deepcopy(pipe.transformer)
    with pytest.raises(difcache.DifcacheError, match="cannot be copied or pickled"):
        pickle.dumps(pipe.transformer)
    with pytest.raises(difcache.DifcacheError, match="cannot be copied or pickled"):
        torch.save(pipe.transformer, tmp_path / "model.pt")
    torch.save(pipe.transformer.state_dict(), tmp_path / "weights.pt")  # the weights save as ever
    handle.remove()
    copy.deepcopy(pipe.transformer)  # uncached: copies as any module
    difcache.apply_cache(pipe, "fora").remove()  # and can be cached again


def test_teacache_calibration_with_an_indicator_the_model_lacks_fails_before_running():
    pipe = tiny("dit")
    with pytest.raises(difcache.DifcacheError, match="takes none"):
        difcache.calibrate(pipe, "teacache", [tiny_call_kwargs("dit")], 4, indicator="timestep_embedding")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--set", "intervall=3"], "no field"),
        (["demo", "--steps", "0"], "must be an integer >= 1"),
        (["bench", "--variants", "nosuch"], "Unknown method 'nosuch'"),
        (["bench", "--variants", "diffusers-nosuch"], "unknown alternative"),
        (["bench", "--variants", "taylorseer:interval=0"], "interval must be"),
        (["calibrate", "--method", "bac", "--out", "/proc/no/such/profile.json"], "cannot write"),
    ],
)
def test_cli_user_errors_are_one_line_and_exit_2(argv, message, capsys, tmp_path):
    if argv[0] in ("demo", "bench"):
        argv = [*argv, "--out", str(tmp_path / "out")]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_cli_refuses_an_unwritable_out_before_any_work(capsys):
    assert main(["bench", "--out", "/proc/difcache-bench"]) == 2
    assert "cannot write" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ load
def _random_call(rng: random.Random):
    """A function making the kwargs of one random call (fresh generators each time it is called)."""
    setting = dict(cfg=rng.random() < 0.5, batch_size=rng.choice([1, 2]), num_inference_steps=rng.choice([3, 5, 8]),
                   seed=rng.randrange(1000))  # fmt: skip
    size = rng.choice([16, 32])
    return lambda: {**tiny_call_kwargs("flux", **setting), "height": size, "width": size}


class _Interrupt(Exception):
    pass


def _stress(calls: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    cached, fresh = _flux(), _flux()
    handle = difcache.apply_cache(cached, "taylorseer", interval=2, warmup=1)
    sizes = []
    for i in range(calls):
        make = _random_call(rng)
        kwargs = make()
        interrupt = rng.random() < 0.15
        if interrupt:  # a pipeline call that dies part-way (an exception in a callback)
            def stop(p, step, t, k):
                if step == 1:
                    raise _Interrupt
                return k

            with pytest.raises(_Interrupt):
                cached(**kwargs, callback_on_step_end=stop)
            continue
        got = _images(cached(**kwargs))
        with difcache.apply_cache(fresh, "taylorseer", interval=2, warmup=1):
            expected = _images(fresh(**make()))
        assert torch.equal(got, expected), f"call {i}: {kwargs['num_inference_steps']} steps differ from a fresh cache"
        gc.collect()
        sizes.append(handle._runtime.store.nbytes())
    handle.remove()
    # Nothing outlives its run: the store only ever holds the current run's features.
    assert max(sizes) <= 4 * 2**20


def test_load_many_random_calls_match_a_fresh_cache():
    _stress(calls=24)


@pytest.mark.slow
def test_load_hundreds_of_random_calls_match_a_fresh_cache():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _stress(calls=300, seed=1)
