"""A real finished run, trained once per session on the tiny Llama, and copies of it for tests to change."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.cli import main


@pytest.fixture(scope="session")
def finished_run(tiny_models, tmp_path_factory) -> Path:
    """20 steps, loss logged every 5, checkpoints at 10 and 20; its own state directory, so the index holds only it."""
    home = tmp_path_factory.mktemp("tui-home")
    run_dir = home / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_STATE_HOME", str(home / "state"))
        code = main(["train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--output_dir",
                     str(run_dir), "--max_steps", "20", "--logging_steps", "5", "--save_steps", "10"])
    assert code == 0
    return run_dir


@pytest.fixture
def state_home(finished_run, monkeypatch) -> Path:
    """The state directory the finished run was indexed in, for tests that find it by reference."""
    home = finished_run.parent / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    return home


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    """A copy of the finished run that a test may append to or rewrite."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))
