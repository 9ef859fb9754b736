"""What the tests share, as fixture modules under ``tests/fixtures/`` (servers, releases, commands, training
data, container images) and stand-in servers under ``tests/standins/`` (KFP, Kubernetes, the Data Collective,
a misbehaving S3 proxy). Test modules import plain helpers from them (``from fixtures.releases import MINI``;
tests/ is on sys.path)."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "fixtures.s3",
    "fixtures.releases",
    "fixtures.training",
    "fixtures.containers",
    "fixtures.checkpoints",
]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``hostile_long`` (the long hypothesis profile) run only when asked: ``-m hostile_long``."""
    if "hostile_long" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="the long property profile: run with -m hostile_long")
    for item in items:
        if "hostile_long" in item.keywords:
            item.add_marker(skip)
