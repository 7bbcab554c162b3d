"""A fixed set of skipped steps, the same for every unit: calibrated reuse sets (ERTACache).

ERTACache (Peng et al., arXiv 2508.21091) selects the steps to reuse offline, once for all prompts, so at run
time the decision is a table lookup: ``skip_action`` on the selected steps, compute everywhere else. The set
was selected for one step count; running another count is an error that says which count to use, because
step ``i`` of a 30-step run is not step ``i`` of a 50-step run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from difcache.engine.actions import Action
from difcache.errors import DifcacheError


@dataclass(frozen=True)
class StepSetSchedule:
    """Args:
    skip: ``skip[i]`` is whether step ``i`` is skipped; its length is the step count it was made for.
    skip_action: what a skipped step does (REUSE for ERTACache).
    """

    skip: tuple[bool, ...]
    skip_action: Action = Action.REUSE
    dynamic: ClassVar[bool] = False

    def decide(self, step: int, num_steps: int | None, unit: int) -> Action:
        if num_steps is not None and num_steps != len(self.skip):
            raise DifcacheError(
                f"This reuse set was calibrated for {len(self.skip)} steps, but the pipeline runs {num_steps}; "
                f"call the pipeline with num_inference_steps={len(self.skip)} or recalibrate."
            )
        return self.skip_action if step < len(self.skip) and self.skip[step] else Action.COMPUTE
