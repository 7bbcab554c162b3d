"""The step tracker's external source and the mapping from ComfyUI's sigma schedule to step indices."""

import types

import pytest
import torch

from difcache.comfy.run import ComfyRun, branch_key
from difcache.engine.steps import StepTracker
from difcache.errors import DifcacheError


class Plain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, hidden_states, timestep=None):
        self.seen.append(self._difcache_step_tracker.info)
        return hidden_states


def test_external_run_steps_come_only_from_set_step():
    model = Plain()
    tracker = StepTracker.attach(model)
    runs = []
    tracker.on_new_run(lambda: runs.append(tracker.run))
    tracker.begin_external_run(num_steps=4)
    assert runs == [0]
    x = torch.zeros(1, 3, 4)
    for step, branch in [(0, "a"), (0, "b"), (2, "a")]:
        tracker.set_step(step, branch, call_in_step=1)
        model(x, timestep=torch.tensor([1.0 - step / 4]))
    model(x, timestep=torch.tensor([5.0]))  # a rising timestep would start a run in module mode; not here
    assert [(i.run, i.step, i.branch, i.num_steps, i.call_in_step) for i in model.seen[:3]] == [
        (0, 0, "a", 4, 1), (0, 0, "b", 4, 1), (0, 2, "a", 4, 1)
    ]  # fmt: skip
    assert model.seen[3] is None and tracker.info is None and runs == [0]
    tracker.end_external_run()
    model(x, timestep=torch.tensor([1.0]))  # back to counting calls: a new run, step 0
    assert (model.seen[-1].run, model.seen[-1].step) == (1, 0) and runs == [0, 1]
    tracker.detach()
    assert not hasattr(model, "_difcache_step_tracker")


def test_set_step_outside_an_external_run_says_what_to_do():
    tracker = StepTracker.attach(Plain())
    with pytest.raises(DifcacheError, match="begin_external_run"):
        tracker.set_step(0, "cond")
    tracker.detach()


def test_scheduler_calls_are_ignored_during_an_external_run():
    from diffusers import FlowMatchEulerDiscreteScheduler

    model, scheduler = Plain(), FlowMatchEulerDiscreteScheduler()
    tracker = StepTracker.attach(model, scheduler)
    tracker.begin_external_run(num_steps=3)
    scheduler.set_timesteps(7)  # would reset the run and set num_steps=7
    tracker.set_step(1, "a")
    scheduler.step(torch.zeros(1, 3, 4), scheduler.timesteps[0], torch.zeros(1, 3, 4))  # would advance the step
    assert (tracker.run, tracker.step, tracker.num_steps) == (0, 1, 3)
    tracker.end_external_run()
    tracker.detach()


def _run(sigmas):
    run = ComfyRun(Plain(), torch.tensor(sigmas))
    return run


def test_sigma_to_step_exact_intermediate_and_monotone():
    run = _run([1.0, 0.75, 0.5, 0.25, 0.0])
    assert run.num_steps == 4 and run.schedule == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert [run.step_of(s) for s in (1.0, 0.75, 0.5, 0.25)] == [0, 1, 2, 3]
    assert run.step_of(0.75 * (1 + 5e-5)) == 1  # float noise within the tolerance
    assert run.step_of(0.6) == 1  # dpm_2-style midpoint belongs to the step whose interval holds it
    assert run.step_of(1.3) == 0 and run.step_of(0.1) == 3
    run._step = 3  # the run has reached step 3: an intermediate sigma never maps back
    assert run.step_of(0.6) == 3
    run.close()


def test_before_call_publishes_step_branch_and_call_count():
    model = Plain()
    run = ComfyRun(model, torch.tensor([1.0, 0.5, 0.0]))
    seen = []
    x = torch.zeros(2, 4, 4, 4)
    for sigma in (1.0, 1.0, 0.5):  # step 0 in two calls (split conds), then step 1
        options = {"sigmas": torch.full((2,), sigma), "cond_or_uncond": [1, 0], "uuids": ["u", "c"]}
        run.before_call(x, options)
        seen.append(run.tracker.info)
    assert [(i.step, i.call_in_step, i.num_steps) for i in seen] == [(0, 0, 2), (0, 1, 2), (1, 0, 2)]
    assert seen[0].branch == "1:u,0:c|(2, 4, 4, 4)" and run.calls == 3
    assert seen[1].branch == seen[0].branch + "#1"  # a second evaluation in the step keeps its own features
    assert seen[2].branch == seen[0].branch
    run.close()
    assert not hasattr(model, "_difcache_step_tracker") and "forward" not in vars(model)


def test_sample_sigmas_replace_the_outer_schedule():
    run = _run([1.0, 0.0])
    run.before_call(
        torch.zeros(1, 4), {"sample_sigmas": torch.tensor([1.0, 0.8, 0.6, 0.0]), "sigmas": torch.tensor([0.6])}
    )
    assert run.tracker.info.step == 2 and run.tracker.info.num_steps == 3
    run.close()


def test_branch_keys_separate_conds_shapes_and_windows():
    x1, x2 = torch.zeros(1, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    cond = {"cond_or_uncond": [0], "uuids": ["c"]}
    batched = {"cond_or_uncond": [1, 0], "uuids": ["u", "c"]}
    window = types.SimpleNamespace(index_list=[0, 1, 2])
    keys = {
        branch_key(x1, cond),
        branch_key(x2, batched),
        branch_key(x2, {**cond}),
        branch_key(x1, {**cond, "context_window": window}),
        branch_key(x1, {}),
    }
    assert len(keys) == 5
    assert branch_key(x1, cond) == branch_key(x1, dict(cond))
