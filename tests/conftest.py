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


@pytest.fixture
def hub(tmp_path, tiny_models, monkeypatch):
    """The stand-in hub serving the tiny Llama as org/tiny, org/gated (token hf_granted accepted its licence) and
    org/private, with huggingface_hub pointed at it and a cache of this test's own."""
    from huggingface_hub import constants

    from hub_server import HubServer

    with HubServer() as server:
        for name, options in {"org/tiny": {}, "org/gated": {"gated": True}, "org/private": {"private": True}}.items():
            server.add_model(name, tiny_models["tiny-llama"], tokens=("hf_granted",), **options)
        hf_home = tmp_path / "hf"
        for key, value in {"HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(hf_home),
                           "HF_HUB_CACHE": str(hf_home / "hub")}.items():
            monkeypatch.setenv(key, value)
        for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_CACHE"):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read at import, from the session's offline flag
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
        yield server
