"""Test layout: one folder per part of difcache (engine, methods, sparse attention, ComfyUI, evaluation) and
``integration/`` for end-to-end runs on the real pipeline classes. ``tests/`` and ``tests/comfy`` are on
``sys.path`` (``pyproject.toml``), so shared helpers are plain imports: ``from helpers import FluxLoop``,
``import comfy_standins``. Slow tests carry ``@pytest.mark.slow`` and are left out unless ``-m slow``."""
