"""The runtime of one applied cache: it executes a :class:`~difcache.core.Plan` on a denoiser.

Everything that needs Python state happens *before* each denoiser call, when the step tracker announces it
(:mod:`difcache.engine.steps`): the runtime reads the policy's decision for every unit (a table built once per
run for static policies), checks that a forecast is possible (the unit has stored outputs, their values are
finite, an fp16 forecast cannot overflow), asks the forecaster for the weights, and writes all of it into each
unit's :class:`~difcache.core.Slot`. During the call the scopes' hooks only read their slot, so a compiled
denoiser sees Python data that guards cheaply and is equal for every step of a kind; counters, FLOPs and memory
are folded in afterwards from a record of what each call was told to do.

The values of stored outputs are checked with one host read per step, before the next call (``_collect``):
``max |x|`` of every output kept since, read together. A unit whose outputs are not finite is recomputed
instead of forecast (counted as ``nonfinite_fallbacks``).

Dynamic policies (TeaCache, first-block cache) decide while the call runs, from a signal the unit's first hook
computes: :meth:`CacheRuntime.decide_live` is the one place where that host decision is taken, once per step
(outside any compiled graph: a graph break there, by design). Later calls of the same step (the other CFG
branch) follow the step's decision.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from difcache.adapters.layout import Layout
from difcache.core import Action, Combination, Live, Plan, Slot, StepInfo
from difcache.engine.flops import measure_flops, measure_flops_without_running
from difcache.engine.hooks import register
from difcache.engine.stats import CacheStats, UnitStats
from difcache.engine.steps import StepTracker, shape_key
from difcache.engine.store import Entry, FeatureStore
from difcache.errors import Uncopyable
from difcache.policies.base import schedule_table

ROOT_HOOK = "difcache_cache_root"
_FP16_MAX = 65504.0
_WEIGHTS_CACHE = 512

# FLOPs per (model, input shapes, units): they do not change while the weights' shapes don't, so a cache that
# is removed and applied again (benchmarks do this every round) does not measure them again.
_FLOPS_MEMO: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, tuple[int, list[int]]]] = (
    weakref.WeakKeyDictionary()
)


@dataclass
class CallRecord:
    """What one announced call was told to do; the root hook marks it done and notes the input shapes."""

    info: StepInfo
    actions: list[int]
    done: bool = False
    shape: tuple = ()
    call: tuple | None = field(default=None, repr=False)  # (args, kwargs) of a compiled call, for its FLOPs


class CacheRootHook(ModelHook):
    """On the denoiser: measures FLOPs on the first full call of each input shape, closes the call's record."""

    def __init__(self, runtime: CacheRuntime) -> None:
        super().__init__()
        self.runtime = runtime

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        rt = self.runtime
        compiling = torch.compiler.is_compiling()
        if compiling:
            rt.live.compiled = True  # later calls are prepared for compiled graphs (no aliased inputs)
            output = self.fn_ref.original_forward(*args, **kwargs)
        else:
            output = rt.measured_call(self.fn_ref.original_forward, args, kwargs)
        rt.live.active = False
        record = rt.current
        if record is not None:
            record.done = True
            record.shape = shape_key(args, kwargs)
            if compiling:
                record.call = (args, kwargs)
            rt.current = None
        return output


class CacheRuntime(Uncopyable):
    """Executes a :class:`~difcache.core.Plan` on ``layout.model`` (see the module docstring).

    The interface the scopes' hooks use is ``slots`` and :meth:`decide_live` (:class:`~difcache.core.UnitRuntime`).
    """

    def __init__(self, method: str, layout: Layout, plan: Plan, source: Any = None) -> None:
        self.layout = layout
        self.plan = plan
        self.model: torch.nn.Module = layout.model
        units = plan.scope.units
        self.live = Live()
        self.slots: tuple[Slot, ...] = tuple(Slot(u, self.live) for u in range(len(units)))
        self.store = FeatureStore(plan.forecaster.history)
        self.stats = CacheStats(method, units=[UnitStats(u.name, u.kind) for u in units], notes=dict(plan.notes))
        self.current: CallRecord | None = None
        self._records: list[CallRecord] = []
        # (branch, step) under which each unit's next handed-in output is stored; None: a later forecast won't read it
        self._unresolved: list[Entry] = []
        self._table: list[list[Action]] | None = None
        self._table_key: tuple | None = None
        self._last_skip: list[int] = []
        self._policy_state = plan.policy.new_state() if plan.policy.dynamic else None
        self._live_decisions: dict[int, tuple[tuple[int, int], Action]] = {}
        self._weights: dict[tuple[Combination, torch.device], torch.Tensor] = {}
        self._unmeasured: dict[tuple, tuple[tuple, dict]] = {}  # input shapes -> a compiled call's arguments
        self._pending_flops: list[CallRecord] = []  # finished calls whose shapes' FLOPs are not measured yet
        self._unit_modules = [u.modules for u in units]
        self._unit_key = tuple(u.name for u in units)
        self._warned: set[int] = set()
        self._removers: list[Callable[[], None]] = []
        self.tracker = StepTracker.attach(self.model, source)
        self.scheduler = self.tracker._schedulers[0] if self.tracker._schedulers else None
        self._removers.append(self.tracker.on_new_run(self._on_new_run))
        self._removers.append(self.tracker.on_call(self._prepare))

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
        self.live.active = False
        self.tracker.detach()
        HookRegistry.check_if_exists_or_initialize(self.model).invalidate_child_registries_cache()

    # ------------------------------------------------------------------ before each call (eager)
    def _on_new_run(self) -> None:
        self._collect()
        self.store.clear()
        self.stats.runs += 1
        self._table_key = None
        self._live_decisions.clear()
        self.live.active = False
        for slot in self.slots:
            slot.fresh = slot.peak = None
            slot.entries = ()
            slot.skip = False
        if self.plan.policy.dynamic:
            self._policy_state = self.plan.policy.new_state()

    def _prepare(self, info: StepInfo) -> None:
        """Arm every unit's slot for the announced call (see the module docstring)."""
        self._collect()
        step = info.step - info.start
        actions = self._actions(info, step)
        record = CallRecord(info, actions)
        keep = self._keep_row(step, len(actions))
        for unit, slot in enumerate(self.slots):
            slot.fresh = None
            action = actions[unit]
            slot.skip = action != Action.COMPUTE and self._arm_skip(slot, info.branch, step)
            if not slot.skip:
                actions[unit] = Action.COMPUTE
            slot.keep_as = (info.branch, step) if keep[unit] and not slot.skip else None
        self.live.active = True
        self.current = record
        self._records.append(record)

    def _actions(self, info: StepInfo, step: int) -> list[int]:
        policy = self.plan.policy
        n = len(self.slots)
        if policy.dynamic:
            key = (info.run, info.step)
            return [d[1] if (d := self._live_decisions.get(u)) and d[0] == key else Action.COMPUTE for u in range(n)]
        total = None if info.num_steps is None else info.num_steps - info.start
        if total is None:
            return [policy.decide(step, None, u) for u in range(n)]
        table = self._table_for(info.run, total)
        return list(table[step]) if step < len(table) else [Action.COMPUTE] * n

    def _table_for(self, run: int, total: int) -> list[list[Action]]:
        if self._table_key != (run, total):
            self._table_key = (run, total)
            self._table = schedule_table(self.plan.policy, total, len(self.slots))
            self._last_skip = [
                max((s for s in range(total) if self._table[s][u] != Action.COMPUTE), default=-1)
                for u in range(len(self.slots))
            ]
            never = getattr(self.plan.policy, "never_skips", False)
            if max(self._last_skip, default=0) < 0 and not never and total not in self._warned and total > 1:
                self._warned.add(total)
                warnings.warn(
                    f"difcache {self.stats.method}: the schedule computes every unit at every step of this "
                    f"{total}-step run, so nothing is cached (is the warm-up or the interval longer than the run, or "
                    "did calibration find no step to skip?); lower `warmup`/`interval`, run more steps, or calibrate "
                    "with a looser threshold.",
                    stacklevel=2,
                )
        return self._table  # type: ignore[return-value]

    def _keep_row(self, step: int, n: int) -> list[bool]:
        """Whether each unit's output computed at ``step`` can still be read by a later forecast in this run."""
        if self.plan.policy.dynamic or self._table_key is None:
            return [True] * n
        return [step < last for last in self._last_skip]

    def _arm_skip(self, slot: Slot, branch: str, step: int) -> bool:
        """Fill ``slot`` for a forecast at ``step``; False when none is possible (the unit is computed instead)."""
        unit = slot.unit
        entries = self.store.entries(branch, unit)
        if not entries:
            return False
        combination = self.plan.forecaster.combination(step, tuple(e.step for e in entries), unit)
        if combination is None:
            return False
        used = entries[: len(combination.coefficients)]
        peaks = [e.peak for e in used]
        if not all(p is None or math.isfinite(p) for p in peaks):  # type: ignore[arg-type]
            self.store.drop(branch, unit)
            self.stats.units[unit].nonfinite_fallbacks += 1
            return False
        first = next((t for t in used[0].leaves if t is not None), None)
        fp16 = first is not None and first.dtype == torch.float16
        if fp16 and combination.peak_bound([p or 0.0 for p in peaks]) > _FP16_MAX:  # type: ignore[misc]
            self.stats.units[unit].nonfinite_fallbacks += 1
            return False
        # Always as many entries as the forecaster keeps (zero weights on the padding): a compiled graph then
        # sees one structure for every forecast, however many outputs are stored yet (eager skips the zeros).
        padding = self.plan.forecaster.history - len(used)
        if padding > 0:
            # Compiled graphs also guard on which inputs alias each other: pad with copies, not the entry itself.
            fill = [_copy(used[-1]) if self.live.compiled else used[-1] for _ in range(padding)]
            used = used + fill
            combination = replace(combination, coefficients=combination.coefficients + (0.0,) * padding)
        slot.entries = tuple(e.leaves for e in used)
        slot.combination = combination
        slot.weights = None if first is None else self._weights_tensor(combination, first.device)
        slot.affine = (combination.scale is not None, combination.bias is not None)
        return True

    def _weights_tensor(self, combination: Combination, device: torch.device) -> torch.Tensor:
        key = (combination, device)
        tensor = self._weights.get(key)
        if tensor is None:
            if len(self._weights) >= _WEIGHTS_CACHE:
                self._weights.clear()
            tensor = self._weights[key] = combination.as_tensor(device)
        return tensor

    # ------------------------------------------------------------------ the live decision (dynamic policies)
    @torch.compiler.disable
    def decide_live(self, slot: Slot, signal: Callable[[], torch.Tensor | None]) -> None:
        """Take this step's decision for ``slot``'s unit from ``signal()`` (once per step) and arm the slot."""
        info = self.tracker.info
        record = self.current
        if info is None or record is None or not self.live.active:
            return
        unit = slot.unit
        key = (info.run, info.step)
        decided = self._live_decisions.get(unit)
        if decided is not None and decided[0] == key:
            return  # an earlier call of this step decided; _prepare armed the slot from it
        action = self.plan.policy.decide_live(self._policy_state, info, signal())
        self._live_decisions[unit] = (key, action)
        if action != Action.COMPUTE and self._arm_skip(slot, info.branch, info.step - info.start):
            slot.skip = True
            record.actions[unit] = action
            slot.keep_as = None

    # ------------------------------------------------------------------ after calls
    def measured_call(self, forward: Callable, args: tuple, kwargs: dict) -> Any:
        """Run ``forward``; the first full call of each input shape runs under a FLOP counter (eager only)."""
        record = self.current
        if record is None or any(record.actions):
            return forward(*args, **kwargs)
        memo = _FLOPS_MEMO.setdefault(self.model, {})
        key = (shape_key(args, kwargs), self._unit_key)
        if key in memo:
            return forward(*args, **kwargs)
        # Compiled regions (regional compilation) cannot run under the counter: this one call runs them eagerly.
        with torch.compiler.set_stance("force_eager"):
            output, total, per_unit = measure_flops(self._unit_modules, lambda: forward(*args, **kwargs))
        memo[key] = (total, per_unit)
        return output

    def _collect(self) -> None:
        """Store what KEEP calls handed in, read their peaks (one host read), fold finished calls into stats."""
        for unit, slot in enumerate(self.slots):
            if slot.fresh is None:
                continue
            if slot.keep_as is not None:
                branch, step = slot.keep_as
                entry = Entry(slot.fresh, step, slot.peak)
                self.store.push(branch, unit, entry)
                if isinstance(entry.peak, torch.Tensor):
                    self._unresolved.append(entry)
            slot.fresh = slot.peak = slot.keep_as = None
        if self._unresolved:
            _resolve_peaks(self._unresolved)
            self._unresolved.clear()
        if self._records:
            self._fold(self._records)
            self._records = [r for r in self._records if r is self.current and not r.done]
        nbytes = self.store.nbytes()
        self.stats.store_bytes = nbytes
        self.stats.peak_store_bytes = max(self.stats.peak_store_bytes, nbytes)
        self.stats.steps_source = self.tracker.source

    def _fold(self, records: list[CallRecord]) -> None:
        memo = _FLOPS_MEMO.get(self.model, {})
        for record in records:
            if not record.done:
                continue
            self.stats.calls += 1
            units = self.stats.units
            for unit, action in enumerate(record.actions):
                if action == Action.COMPUTE:
                    units[unit].compute += 1
                elif action == Action.REUSE:
                    units[unit].reuse += 1
                else:
                    units[unit].forecast += 1
            measured = memo.get((record.shape, self._unit_key))
            if measured is None:
                if record.call is not None:
                    self._unmeasured.setdefault(record.shape, record.call)
                self._pending_flops.append(record)
                continue
            self._count_flops(record, measured)
            record.call = None

    def _count_flops(self, record: CallRecord, measured: tuple[int, list[int]]) -> None:
        total, per_unit = measured
        self.stats.full_flops += total
        self.stats.skipped_flops += sum(f for f, a in zip(per_unit, record.actions, strict=True) if a)
        if all(u.flops_share == 0.0 for u in self.stats.units) and total:
            for unit, flops in zip(self.stats.units, per_unit, strict=True):
                unit.flops_share = flops / total

    def sync_stats(self) -> CacheStats:
        """Fold everything finished into ``self.stats`` (measuring compiled calls' FLOPs now) and return it."""
        self._collect()
        memo = _FLOPS_MEMO.setdefault(self.model, {})
        for shape, (args, kwargs) in list(self._unmeasured.items()):
            key = (shape, self._unit_key)
            if key not in memo:
                try:
                    memo[key] = measure_flops_without_running(self.model, self._unit_modules, args, kwargs)
                except Exception as err:  # noqa: BLE001  (the cache works; only the FLOP count is unavailable)
                    warnings.warn(f"difcache could not count this model's FLOPs ({err}).", stacklevel=2)
                    continue
            del self._unmeasured[shape]
        still = []
        for record in self._pending_flops:
            measured = memo.get((record.shape, self._unit_key))
            if measured is None:
                still.append(record)
            else:
                self._count_flops(record, measured)
                record.call = None
        self._pending_flops = still
        self.stats.flops_measured = not still
        return self.stats

    def reset_stats(self) -> None:
        self._collect()
        self._pending_flops = []
        self.stats = CacheStats(
            self.stats.method,
            units=[UnitStats(u.name, u.kind, flops_share=u.flops_share) for u in self.stats.units],
            notes=self.stats.notes,
            steps_source=self.stats.steps_source,
        )


def _copy(entry: Entry) -> Entry:
    return Entry([None if t is None else t.clone() for t in entry.leaves], entry.step, entry.peak)


def _resolve_peaks(entries: list[Entry]) -> None:
    """Replace the entries' peak tensors by floats with one host read per device."""
    by_device: dict[torch.device, list[Entry]] = {}
    for entry in entries:
        by_device.setdefault(entry.peak.device, []).append(entry)  # type: ignore[union-attr]
    for group in by_device.values():
        values = torch.stack([e.peak for e in group]).tolist()  # type: ignore[misc]
        for entry, value in zip(group, values, strict=True):
            entry.peak = value
