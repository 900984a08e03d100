"""Fixtures of the integration tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def home(tmp_path, tiny_models, monkeypatch):
    """A state directory of its own, so the index holds only this test's runs."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path
