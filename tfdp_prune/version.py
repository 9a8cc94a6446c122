"""The library version: one place, read by the package, setup.py and checkpoint records."""

__version__ = "0.1.0"
