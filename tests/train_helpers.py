"""Helpers of the training/evaluation tests: test data on disk and in S3, running the ``habla`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RELEASE = REPO / "data" / "mini-es-v25" / "es"
BIN = Path(sys.executable).parent
HABLA = str(BIN / "habla")
TORCHRUN = str(BIN / "torchrun")


def write_manifest(entries: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def cli_env(**extra: str) -> dict[str, str]:
    """Environment of a ``habla`` subprocess: this checkout first on the path, one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_habla(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [HABLA, *args], capture_output=True, text=True, env=env or cli_env(), timeout=timeout, check=False
    )
