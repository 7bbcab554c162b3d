"""difcache's version (read by ``pyproject.toml`` and written into profiles)."""

__version__ = "0.1.0"
