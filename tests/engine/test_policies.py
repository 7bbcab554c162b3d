"""Schedules reproduce the official code's patterns."""

from difcache.core import Action
from difcache.policies import FORASchedule, TaylorSeerSchedule, schedule_string, schedule_table


def test_taylorseer_flux_defaults_match_official_cal_type():
    # Official FLUX cal_type: full while step < first_enhance (3), then full when the counter reaches N-1 (N=6).
    expected = "CCC" + "FFFFFC" * 3 + "FF"
    assert schedule_string(TaylorSeerSchedule(6, 3), 23) == expected


def test_taylorseer_warmup_one():
    assert schedule_string(TaylorSeerSchedule(5, 1), 12) == "CFFFFCFFFFCF"


def test_taylorseer_interval_one_computes_everything():
    assert set(schedule_string(TaylorSeerSchedule(1, 0), 10)) == {"C"}


def test_fora_anchors_on_descending_index_so_last_step_is_full():
    # boost_infer_static: full when the descending index i (T-1..0) is divisible by N, and at the first step.
    pattern = schedule_string(FORASchedule(3), 10)
    descending = [9 - s for s in range(10)]
    expected = "".join("C" if s == 0 or i % 3 == 0 else "R" for s, i in zip(range(10), descending, strict=True))
    assert pattern == expected
    assert pattern[-1] == "C" and pattern[0] == "C"


def test_fora_unknown_step_count_falls_back_to_ascending():
    policy = FORASchedule(3)
    assert [policy.decide(s, None, 0) for s in range(7)] == [
        Action.COMPUTE, Action.REUSE, Action.REUSE, Action.COMPUTE, Action.REUSE, Action.REUSE, Action.COMPUTE,
    ]  # fmt: skip


def test_table_is_steps_by_units():
    table = schedule_table(TaylorSeerSchedule(2, 1), 5, 3)
    assert len(table) == 5 and all(len(row) == 3 for row in table)
    assert all(isinstance(a, Action) for row in table for a in row)
