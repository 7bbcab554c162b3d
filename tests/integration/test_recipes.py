"""Every recipe in pipelines/ runs its --tiny path (same code as for the real model, tiny random weights)."""

import importlib
import sys
from pathlib import Path

import pytest

RECIPES = sorted(p.stem for p in (Path(__file__).parents[2] / "pipelines").glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_tiny_path_runs_and_caches(name, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[2] / "pipelines"))
    module = importlib.import_module(name)
    result = module.RECIPE and module.run(module.RECIPE, ["--tiny", "--steps", "8"])
    stats = result["stats"]
    assert stats.calls > 0
    if stats.method != "teacache":  # dynamic: on random weights whether it skips depends on the draw
        assert stats.ideal_speedup > 1.05
    assert result["output"].isfinite().all()
    sys.modules.pop(name, None)


def test_every_family_has_a_recipe():
    from difcache.models.tiny import FAMILIES

    assert set(FAMILIES) <= set(RECIPES)
