"""Calibration profiles: what ``calibrate()`` learned about one model, as readable JSON.

A profile is only valid for the layout it was measured on (model class and unit names, hashed into a
fingerprint) and for its number of steps; loading it for anything else is an error that says so. Hand-edited
or truncated files fail with the name of the bad field.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from difcache.errors import DifcacheError

_REQUIRED = {
    "method": str,
    "model_class": str,
    "fingerprint": str,
    "num_steps": int,
    "data": dict,
    "config": dict,
    "version": int,
    "difcache_version": str,
}


@dataclass(frozen=True)
class Profile:
    """Args:
    method: the method it calibrates (``"bac"``, ``"ertacache"``, ``"teacache"``).
    model_class: class name of the denoiser it was measured on.
    fingerprint: ``Layout.fingerprint`` of that denoiser.
    num_steps: denoising steps of the calibration runs.
    data: the method's learned values (schedules, coefficients), JSON-serialisable.
    config: the method config used for calibration.
    """

    VERSION: ClassVar[int] = 1

    method: str
    model_class: str
    fingerprint: str
    num_steps: int
    data: dict[str, Any] = field(repr=False)
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    version: int = 1
    difcache_version: str = ""

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path_or_profile: str | os.PathLike | Profile) -> Profile:
        if isinstance(path_or_profile, Profile):
            return path_or_profile
        try:
            with open(path_or_profile) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise DifcacheError(f"No profile at {path_or_profile}; make one with difcache.calibrate(...).") from None
        except json.JSONDecodeError as err:
            raise DifcacheError(f"Profile {path_or_profile} is not valid JSON ({err}); recalibrate.") from None
        return cls.from_dict(raw, source=str(path_or_profile))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "profile") -> Profile:
        if not isinstance(raw, dict):
            raise DifcacheError(f"{source}: expected a JSON object, got {type(raw).__name__}.")
        for name, kind in _REQUIRED.items():
            if name not in raw:
                raise DifcacheError(f"{source}: missing field `{name}`; recalibrate with difcache.calibrate(...).")
            if not isinstance(raw[name], kind) or (kind is int and isinstance(raw[name], bool)):
                raise DifcacheError(
                    f"{source}: field `{name}` must be {kind.__name__}, got {type(raw[name]).__name__}."
                )
        if raw["version"] > cls.VERSION:
            raise DifcacheError(f"{source}: profile version {raw['version']} is newer than this difcache reads.")
        if raw["num_steps"] < 1:
            raise DifcacheError(f"{source}: field `num_steps` must be >= 1, got {raw['num_steps']}.")
        unknown = sorted(set(raw) - set(_REQUIRED))
        if unknown:
            raise DifcacheError(f"{source}: unknown field(s) {unknown}.")
        return cls(**raw)

    def check(self, method: str, model_class: str, fingerprint: str) -> None:
        """Raise unless this profile was made for ``method`` on a model with this layout."""
        if self.method != method:
            raise DifcacheError(f"This profile calibrates {self.method!r}, not {method!r}.")
        if self.fingerprint != fingerprint:
            raise DifcacheError(
                f"This profile was calibrated on a {self.model_class} with a different layout "
                f"(fingerprint {self.fingerprint}, this model {model_class} has {fingerprint}); "
                "recalibrate on this model."
            )

    def check_steps(self, num_steps: int | None) -> None:
        if num_steps is not None and num_steps != self.num_steps:
            raise DifcacheError(
                f"This {self.method} profile was calibrated for {self.num_steps} steps, but the pipeline runs "
                f"{num_steps}; call the pipeline with num_inference_steps={self.num_steps} or recalibrate."
            )
