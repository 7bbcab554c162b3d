"""Profiles: what ``calibrate()`` or ``autotune()`` learned about one model, as readable, versioned JSON.

A profile is only valid for the layout it was measured on (model class and unit names, hashed into a
fingerprint), for its number of steps and, when it records one, for its scheduler class; loading it for
anything else is an error that says so and names the fix. Hand-edited or truncated files fail with the name of
the bad field: methods read their data through the typed getters (:meth:`Profile.numbers`, :meth:`Profile.ints`,
...), the one place where profile fields are checked.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from difcache.adapters.layout import Layout
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
_OPTIONAL = {"scheduler": str}
_REMEDY = {"autotune": "re-run difcache.autotune(...)"}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Profile:
    """Args:
    method: the method it configures (``"bac"``, ``"ertacache"``, ``"teacache"``, ``"autotune"``).
    model_class: class name of the denoiser it was measured on.
    fingerprint: ``Layout.fingerprint`` of that denoiser.
    num_steps: denoising steps of the calibration runs.
    data: the method's learned values (schedules, coefficients), JSON-serialisable.
    config: the method config used for calibration.
    scheduler: class name of the scheduler it was measured with ("" when it does not depend on it).
    """

    VERSION: ClassVar[int] = 2

    method: str
    model_class: str
    fingerprint: str
    num_steps: int
    data: dict[str, Any] = field(repr=False)
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    version: int = 2
    difcache_version: str = ""
    scheduler: str = ""

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        try:
            with open(path, "w") as f:
                json.dump(asdict(self), f, indent=1)
                f.write("\n")
        except OSError as err:
            raise DifcacheError(f"Cannot write the profile to {path}: {err.strerror}; choose another path.") from None

    @classmethod
    def load(cls, path_or_profile: str | os.PathLike | Profile) -> Profile:
        if isinstance(path_or_profile, Profile):
            return path_or_profile
        if not isinstance(path_or_profile, str | os.PathLike):
            raise DifcacheError(
                f"A profile is a path or a difcache.Profile, got {type(path_or_profile).__name__}."
            )
        try:
            with open(path_or_profile) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise DifcacheError(
                f"No profile at {path_or_profile}; make one with difcache.calibrate(...) or difcache.autotune(...)."
            ) from None
        except IsADirectoryError:
            raise DifcacheError(f"{path_or_profile} is a directory; pass the profile's .json file.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DifcacheError(f"Profile {path_or_profile} is not valid JSON ({err}); make it again.") from None
        except OSError as err:
            raise DifcacheError(f"Cannot read the profile {path_or_profile}: {err.strerror}.") from None
        return cls.from_dict(raw, source=str(path_or_profile))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "profile") -> Profile:
        if not isinstance(raw, dict):
            raise DifcacheError(f"{source}: expected a JSON object, got {type(raw).__name__}.")
        for name, kind in {**_REQUIRED, **_OPTIONAL}.items():
            if name not in raw:
                if name in _OPTIONAL:
                    continue
                raise DifcacheError(f"{source}: missing field `{name}`; make the profile again.")
            if not isinstance(raw[name], kind) or (kind is int and isinstance(raw[name], bool)):
                raise DifcacheError(
                    f"{source}: field `{name}` must be {kind.__name__}, got {type(raw[name]).__name__}."
                )
        if raw["version"] > cls.VERSION:
            raise DifcacheError(
                f"{source}: profile version {raw['version']} is newer than this difcache reads ({cls.VERSION}); "
                "upgrade difcache or make the profile again with this version."
            )
        if raw["num_steps"] < 1:
            raise DifcacheError(f"{source}: field `num_steps` must be >= 1, got {raw['num_steps']}.")
        unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
        if unknown:
            raise DifcacheError(f"{source}: unknown field(s) {unknown}.")
        return cls(**raw)

    # ------------------------------------------------------------------ is it for this model?
    @classmethod
    def for_model(cls, source: str | os.PathLike | Profile | None, method: str, layout: Layout, usage: str) -> Profile:
        """The profile ``source`` (a path or a profile), checked to be for ``method`` on ``layout``'s model;
        ``None`` raises with ``usage``, the call that makes one."""
        if source is None:
            raise DifcacheError(f"{method} needs a profile: {usage}")
        profile = cls.load(source)
        profile.check(method, type(layout.model).__name__, layout.fingerprint)
        return profile

    def check(self, method: str, model_class: str, fingerprint: str, scheduler: str | None = None) -> None:
        """Raise unless this profile was made for ``method`` on a model with this layout (and scheduler)."""
        if self.method != method:
            raise DifcacheError(f"This profile configures {self.method!r}, not {method!r}.")
        if self.fingerprint != fingerprint:
            raise DifcacheError(
                f"This profile was made on a {self.model_class} with a different layout "
                f"(fingerprint {self.fingerprint}, this model {model_class} has {fingerprint}); "
                f"{self.remedy} on this model."
            )
        if scheduler and self.scheduler and scheduler != self.scheduler:
            raise DifcacheError(
                f"This {self.method} profile was made with a {self.scheduler}, but the pipeline's scheduler is a "
                f"{scheduler}; {self.remedy} with this scheduler."
            )

    def check_steps(self, num_steps: int | None) -> None:
        if num_steps is not None and num_steps != self.num_steps:
            raise DifcacheError(
                f"This {self.method} profile was made for {self.num_steps} steps, but the pipeline runs "
                f"{num_steps}; call the pipeline with num_inference_steps={self.num_steps} or {self.remedy}."
            )

    @property
    def remedy(self) -> str:
        return _REMEDY.get(self.method, "recalibrate with difcache.calibrate(...)")

    # ------------------------------------------------------------------ typed reads of data fields
    def bad(self, name: str, why: str) -> DifcacheError:
        """The error for a malformed ``data`` field."""
        return DifcacheError(f"{self.method} profile: field `data.{name}` {why}; {self.remedy}.")

    def value(self, name: str) -> Any:
        if name not in self.data:
            raise self.bad(name, "is missing")
        return self.data[name]

    def choice(self, name: str, choices: Sequence[str]) -> str:
        value = self.value(name)
        if value not in choices:
            raise self.bad(name, f"must be one of {list(choices)}, got {value!r}")
        return value

    def matching(self, name: str, choices: Sequence[str], asked: str) -> str:
        """``data.name`` (one of ``choices``), which must be what the config asks for: the profile's numbers
        only mean something for the setting they were measured with."""
        value = self.choice(name, choices)
        if value != asked:
            raise DifcacheError(
                f"This {self.method} profile was made with {name}={value!r}, but {name}={asked!r} was asked for; "
                f"apply it with {name}={value!r}, or {self.remedy} with {name}={asked!r}."
            )
        return value

    def numbers(
        self, name: str, length: int | None = None, lo: float | None = None, hi: float | None = None,
        allow_none: bool = False,
    ) -> list[float | None]:  # fmt: skip
        """A list of finite numbers (``None`` entries allowed when ``allow_none``), of ``length`` if given."""
        values = self.value(name)
        return self._numbers(name, values, length, lo, hi, allow_none)

    def _numbers(
        self, name: str, values: Any, length: int | None, lo: float | None, hi: float | None, allow_none: bool
    ) -> list[float | None]:
        span = "" if lo is None and hi is None else f" in [{lo}, {hi}]".replace("None", "...")
        shape = f"a list of {length}" if length is not None else "a non-empty list of"
        if not isinstance(values, list) or (length is not None and len(values) != length) or not values:
            raise self.bad(name, f"must be {shape} finite numbers{span}")
        out: list[float | None] = []
        for v in values:
            if v is None and allow_none:
                out.append(None)
                continue
            if not _finite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
                raise self.bad(name, f"must be {shape} finite numbers{span}, got {v!r}")
            out.append(float(v))
        return out

    def ints(self, name: str, lo: int, hi: int) -> list[int]:
        """A list of ints in ``[lo, hi]`` (may be empty)."""
        values = self.value(name)
        if not isinstance(values, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi for v in values
        ):
            raise self.bad(name, f"must be a list of ints in [{lo}, {hi}]")
        return list(values)

    def matrices(self, name: str, count: int, size: int) -> list[list[list[float]]]:
        """``count`` square ``size x size`` matrices of finite numbers."""
        values = self.value(name)
        if not isinstance(values, list) or len(values) != count:
            raise self.bad(name, f"must be a list of {count} [{size} x {size}] matrices")
        out = []
        for i, matrix in enumerate(values):
            if not isinstance(matrix, list) or len(matrix) != size:
                raise self.bad(f"{name}[{i}]", f"must be a {size} x {size} matrix")
            out.append([self._numbers(f"{name}[{i}]", row, size, None, None, False) for row in matrix])
        return out  # type: ignore[return-value]
