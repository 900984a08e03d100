"""Shared fixtures: a per-session tool home (demo models cached between runs), no network, paths to ../shared/data."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

# Demo models are built once and kept between test runs; runs' state is per session. No test reaches the hub.
TEST_HOME = REPO / ".pytest_cache" / "tuner-home"
os.environ["XDG_CACHE_HOME"] = str(TEST_HOME / "cache")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"


@pytest.fixture(autouse=True, scope="session")
def _state_home(tmp_path_factory):
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail("../shared/data is not beside this checkout: the tests that read real data need it")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """The three demo models (Llama, Mistral, Mixtral architectures), built once and cached on disk."""
    from engine.models.demo import DEMO_MODELS, demo_model_path

    return {name: demo_model_path(name) for name in DEMO_MODELS}


@pytest.fixture
def sleeper():
    """A harmless process that is not ours: a stand-in for a run's trainer, or one nothing of ours may signal."""
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()
