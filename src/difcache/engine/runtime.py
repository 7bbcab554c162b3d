"""The runtime of one applied cache: plan, step tracker, feature store, stats and the decision table."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.hooks import HookRegistry

from difcache.adapters.layout import Layout
from difcache.engine.actions import Action
from difcache.engine.hooks import ROOT_HOOK, CacheRootHook, register
from difcache.engine.plan import Plan
from difcache.engine.stats import CacheStats, UnitStats
from difcache.engine.steps import StepInfo, StepTracker
from difcache.engine.store import FeatureStore


class CacheRuntime:
    """Executes a :class:`Plan` on a denoiser.

    Static policies are turned into a ``table[step][unit]`` of Python ints when a run starts; per-unit hooks
    only index it. The table also tells whether a unit will be skipped again later in the run, so outputs
    that no forecast will read are not stored.
    """

    def __init__(self, method: str, layout: Layout, plan: Plan, scheduler: object | None = None) -> None:
        self.layout = layout
        self.plan = plan
        self.model: torch.nn.Module = layout.model
        self.scheduler = scheduler  # the pipeline's scheduler, or None for a bare denoiser (read by plan extras)
        self.store = FeatureStore(plan.forecaster)
        self.stats = CacheStats(method, units=[UnitStats(u.name, u.kind) for u in plan.scope.units])
        self.unit_flops: list[int] = [0] * len(plan.scope.units)
        # counts[action][unit]: plain lists on the hot path, folded into stats when they are read.
        self.counts: list[list[int]] = [[0] * len(plan.scope.units) for _ in Action]
        self.row: list[Action] = []
        self.row_info: StepInfo | None = None
        self._table: list[list[Action]] = []
        self._last_skip: list[int] = []
        self._table_key: tuple | None = None
        self.policy_state = plan.policy.new_state() if plan.policy.dynamic else None
        self._live: dict[int, tuple[tuple[int, int], Action]] = {}  # unit -> ((run, step), decision)
        self._removers: list[Callable[[], None]] = []
        self.tracker = StepTracker.attach(self.model, scheduler)
        self._removers.append(self.tracker.on_new_run(self._on_new_run))

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        try:
            self._removers += self.plan.scope.install(self)
            self._removers.append(register(self.model, CacheRootHook(self), ROOT_HOOK))
            for extra in self.plan.extras:
                self._removers.append(extra(self))
        except Exception:
            self.remove()
            raise
        HookRegistry.check_if_exists_or_initialize(self.model).invalidate_child_registries_cache()

    def remove(self) -> None:
        for remove in reversed(self._removers):
            remove()
        self._removers.clear()
        self.store.clear()
        self.tracker.detach()
        HookRegistry.check_if_exists_or_initialize(self.model).invalidate_child_registries_cache()

    # ------------------------------------------------------------------ decisions
    def _on_new_run(self) -> None:
        self.store.clear()
        self.stats.runs += 1
        self._table_key = None
        self._live.clear()
        if self.plan.policy.dynamic:
            self.policy_state = self.plan.policy.new_state()

    def decide(self, info: StepInfo, unit: int, signal: Callable[[], torch.Tensor | None]) -> Action:
        """The action for ``unit`` in this call: a table lookup for static policies; for dynamic ones, one
        decision per step taken on the step's first call (sequential CFG branches follow it)."""
        policy = self.plan.policy
        if not policy.dynamic:
            return (self.row if self.row_info is info else self.refresh_row(info))[unit]
        key = (info.run, info.step)
        cached = self._live.get(unit)
        if cached is not None and cached[0] == key:
            return cached[1]
        action = policy.decide_live(self.policy_state, info, signal())
        self._live[unit] = (key, action)
        return action

    def refresh_row(self, info: StepInfo) -> list[Action]:
        """The decisions of every unit for the call described by ``info`` (built once per call)."""
        if self._table_key != (info.run, info.num_steps):
            self._build_table(info)
        if info.step < len(self._table):
            self.row = self._table[info.step]
        else:
            self.row = [self.plan.policy.decide(info.step, info.num_steps, u) for u in range(len(self.counts[0]))]
        self.row_info = info
        return self.row

    def sync_stats(self) -> CacheStats:
        """Fold the hot-path counters into ``self.stats`` and return it."""
        for stats, compute, reuse, forecast in zip(self.stats.units, *self.counts, strict=True):
            stats.compute, stats.reuse, stats.forecast = compute, reuse, forecast
        return self.stats

    def reset_stats(self) -> None:
        self.counts = [[0] * len(self.counts[0]) for _ in Action]
        self.stats = CacheStats(
            self.stats.method, units=[UnitStats(u.name, u.kind, flops_share=u.flops_share) for u in self.stats.units]
        )

    def needs_update(self, step: int, unit: int) -> bool:
        """Whether the output computed at ``step`` can still be read by a later forecast in this run."""
        return not self._table or step < self._last_skip[unit]

    def _build_table(self, info: StepInfo) -> None:
        self._table_key = (info.run, info.num_steps)
        n_units = len(self.plan.scope.units)
        if info.num_steps is None:
            self._table, self._last_skip = [], [0] * n_units
            return
        policy = self.plan.policy
        self._table = [[policy.decide(s, info.num_steps, u) for u in range(n_units)] for s in range(info.num_steps)]
        self._last_skip = [
            max((s for s in range(info.num_steps) if self._table[s][u] != Action.COMPUTE), default=-1)
            for u in range(n_units)
        ]

    # ------------------------------------------------------------------ accounting
    def on_flops_measured(self, total: int, per_unit: list[int]) -> None:
        for stats, flops in zip(self.stats.units, per_unit, strict=True):
            stats.flops_share = flops / total if total else 0.0

    def after_call(self) -> None:
        nbytes = self.store.nbytes()
        self.stats.store_bytes = nbytes
        self.stats.peak_store_bytes = max(self.stats.peak_store_bytes, nbytes)
