"""A tracking store of its own in ``tmp_path`` for every test (never the user's or a team server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from detforge.tracking.store import Store, open_store


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    """The embedded store in ``tmp_path/.detforge``, also the default of CLI commands run in the test."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DETFORGE_WORKDIR", str(tmp_path))
    return open_store(root=tmp_path / ".detforge")
