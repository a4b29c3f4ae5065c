"""The package's version, in one place below everything (pyproject.toml's static version is the same)."""

__version__ = "0.1.0"
