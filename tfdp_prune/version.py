"""The library version: one place, read by the package, pyproject.toml and checkpoint records."""

__version__ = "0.1.0"
