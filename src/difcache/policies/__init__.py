"""Policies: when each unit is recomputed."""

from difcache.policies.base import StaticPolicy, schedule_string, schedule_table
from difcache.policies.interval import AlwaysCompute, FORASchedule, TaylorSeerSchedule

__all__ = ["AlwaysCompute", "FORASchedule", "StaticPolicy", "TaylorSeerSchedule", "schedule_string", "schedule_table"]
