"""What a policy can decide for one unit at one step."""

from __future__ import annotations

import enum


class Action(enum.IntEnum):
    """COMPUTE runs the unit; REUSE returns its last computed output; FORECAST extrapolates from its history."""

    COMPUTE = 0
    REUSE = 1
    FORECAST = 2
