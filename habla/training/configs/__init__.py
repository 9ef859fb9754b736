"""The training configs shipped with habla: NeMo-style YAML files in this folder, selected by name.

Light on purpose (no omegaconf): ``habla train --help`` lists them.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).parent


def available() -> list[str]:
    """Names of the shipped configs (``tiny_ctc_char``, ...)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def find(name: str) -> Path | None:
    """The YAML file of a shipped config, or None."""
    path = CONFIG_DIR / f"{name}.yaml"
    return path if name in available() and path.is_file() else None
