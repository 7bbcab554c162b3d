"""Step tracking from per-call counters and the scheduler, never from timestep values."""

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, HeunDiscreteScheduler
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_utils import ModelMixin

from difcache.engine.steps import StepTracker


class Denoiser(ModelMixin, CacheMixin):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.seen = []

    def forward(self, hidden_states, timestep=None):
        self.seen.append(self._difcache_step_tracker.info)
        return self.proj(hidden_states)


class Plain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, hidden_states, timestep=None):
        self.seen.append(self._difcache_step_tracker.info)
        return hidden_states


def _loop(model, scheduler, steps, branches=(None,), begin=None, x_shape=(1, 3, 4)):
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    if begin is not None:
        scheduler.set_begin_index(begin)
        timesteps = timesteps[begin:]
    x = torch.zeros(x_shape)
    for t in timesteps:
        for name in branches:
            if name is None:
                out = model(x, timestep=t)
            else:
                with model.cache_context(name):
                    out = model(x, timestep=t)
        x = scheduler.step(out, t, x).prev_sample


def test_scheduler_mode_sequential_cfg_one_step_two_branches():
    model, sched = Denoiser(), FlowMatchEulerDiscreteScheduler()
    tracker = StepTracker.attach(model, sched)
    _loop(model, sched, 4, branches=("cond", "uncond"))
    assert [(i.step, i.branch, i.call_in_step) for i in model.seen] == [
        (s, b, c) for s in range(4) for c, b in enumerate(("cond", "uncond"))
    ]
    assert {i.num_steps for i in model.seen} == {4}
    tracker.detach()


def test_scheduler_mode_new_call_resets_and_counts_runs():
    model, sched = Denoiser(), DDIMScheduler()
    runs = []
    tracker = StepTracker.attach(model, sched)
    tracker.on_new_run(lambda: runs.append(tracker.run))
    _loop(model, sched, 3)
    _loop(model, sched, 5)
    assert runs == [0, 1]
    assert [i.step for i in model.seen] == [0, 1, 2, 0, 1, 2, 3, 4]
    assert [i.num_steps for i in model.seen] == [3] * 3 + [5] * 5
    tracker.detach()


def test_heun_repeated_timesteps_are_distinct_steps():
    model, sched = Denoiser(), HeunDiscreteScheduler()
    tracker = StepTracker.attach(model, sched)
    _loop(model, sched, 3)
    assert [i.step for i in model.seen] == list(range(len(sched.timesteps)))
    tracker.detach()


def test_img2img_begin_index_offsets_steps():
    model, sched = Denoiser(), FlowMatchEulerDiscreteScheduler()
    tracker = StepTracker.attach(model, sched)
    _loop(model, sched, 6, begin=2)
    assert [i.step for i in model.seen] == [2, 3, 4, 5]
    tracker.detach()


def test_detach_restores_scheduler_methods_and_forward():
    model, sched = Denoiser(), DDIMScheduler()
    tracker = StepTracker.attach(model, sched)
    tracker.detach()
    assert "step" not in vars(sched) and "set_timesteps" not in vars(sched)
    assert not hasattr(model, "_difcache_step_tracker")
    assert model._diffusers_hook._hook_order == []


def test_attach_is_shared_and_refcounted():
    model = Plain()
    a = StepTracker.attach(model)
    b = StepTracker.attach(model)
    assert a is b
    a.detach()
    assert hasattr(model, "_difcache_step_tracker")
    b.detach()
    assert not hasattr(model, "_difcache_step_tracker")


def test_module_mode_cache_context_groups_branches_and_diffusers_reset_ends_run():
    model = Denoiser()
    tracker = StepTracker.attach(model)
    for _ in range(2):
        _loop(model, DDIMScheduler(), 3, branches=("cond", "uncond"))
        model._reset_stateful_cache()  # what DiffusionPipeline.maybe_free_model_hooks does after each call
    assert [(i.run, i.step, i.branch) for i in model.seen] == [
        (r, s, b) for r in range(2) for s in range(3) for b in ("cond", "uncond")
    ]
    tracker.detach()


def test_module_mode_without_context_new_run_when_timestep_rises_or_shape_changes():
    model = Plain()
    tracker = StepTracker.attach(model)
    _loop(model, DDIMScheduler(), 3)
    _loop(model, DDIMScheduler(), 2)
    _loop(model, DDIMScheduler(), 2, x_shape=(2, 3, 4))
    assert [(i.run, i.step, i.branch) for i in model.seen] == [
        (0, 0, "call0"), (0, 1, "call0"), (0, 2, "call0"), (1, 0, "call0"), (1, 1, "call0"), (2, 0, "call0"),
        (2, 1, "call0"),
    ]  # fmt: skip
    tracker.detach()


def test_info_cleared_outside_forward():
    model = Plain()
    tracker = StepTracker.attach(model)
    model(torch.zeros(1, 3, 4), timestep=torch.tensor([10.0]))
    assert tracker.info is None
    tracker.detach()


def test_unwrap_keeps_a_wrapper_added_on_top():
    model, sched = Denoiser(), DDIMScheduler()
    tracker = StepTracker.attach(model, sched)
    inner = sched.step
    calls = []

    def foreign(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    sched.step = foreign
    tracker.detach()
    assert sched.step is foreign  # the later layer survives; ours became a pass-through
    sched.set_timesteps(2)
    x = torch.zeros(1, 3, 4)
    for t in sched.timesteps:
        x = sched.step(x, t, x).prev_sample
    assert len(calls) == 2 and tracker.step == 0
