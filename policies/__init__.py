"""Bundled policies (YAML data; the schema lives in monitor/policy.py, see README.md here)."""

from importlib.resources import files
from pathlib import Path


def bundled_policy(name: str = "default") -> Path:
    """Path of a bundled policy file, e.g. `default` or `strict`."""
    return Path(str(files(__name__).joinpath(f"{name}.yaml")))
