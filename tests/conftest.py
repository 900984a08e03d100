"""Shared fixtures: a per-session tool home (demo models cached between runs), no network, a LLaMA-Factory-style data
folder of our own; and the rule for tests/shared, the suite against the third-party files in ../shared/data: it runs
only when asked for by path (`python3 -m pytest tests/shared`, as .ci/run does where that folder exists), and a run
without it says so in one summary line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
SHARED_SUITE = REPO / "tests" / "shared"

# Demo models are built once and kept between test runs; runs' state is per session. No test reaches the hub.
TEST_HOME = REPO / ".pytest_cache" / "tuner-home"
# DeepSpeed JIT-builds its CPU comm op on first use (about two minutes on two cores): build it where torch keeps
# extensions for every process of this user, not under TEST_HOME, so each new checkout does not build it again.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch_extensions"
    / f"py{sys.version_info.major}{sys.version_info.minor}-torch{version('torch')}"))  # set, torch adds no version
os.environ["XDG_CACHE_HOME"] = str(TEST_HOME / "cache")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
# One thread per torch process: the suite runs one test per core (pytest-xdist) and most tests start training
# processes of their own; two threads each would contend for the cores (measured: test_train.py 208 s -> 131 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")
for _size in ("COLUMNS", "LINES"):  # output is wrapped to these; a test that wants a width sets it
    os.environ.pop(_size, None)
# Tests type commands as at a terminal, where Ctrl-C reaches them. A suite started in the background of a script
# (`python3 -m pytest &`) inherits SIGINT ignored, and every command it started would ignore Ctrl-C too (as it should
# there): `tuner download` interrupted would then run to its end.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# Python's full garbage collections walk every object alive, and torch, transformers, peft, trl and textual leave
# millions once imported: walking them took a sixth of the TUI tests' CPU. After a test that imported a good many
# modules, what is alive then is frozen (gc.freeze: the collector skips it from then on); and cycles are looked for
# less often (a test's garbage without cycles is freed at once all the same).
_modules_when_frozen = 0


def pytest_sessionstart(session):
    import gc

    gc.set_threshold(10_000, 10, 100)


def pytest_runtest_logfinish(nodeid, location):
    global _modules_when_frozen
    if len(sys.modules) - _modules_when_frozen > 300:
        import gc

        gc.collect()
        gc.freeze()
        _modules_when_frozen = len(sys.modules)


@pytest.fixture(autouse=True, scope="session")
def _state_home(tmp_path_factory):
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))


def _asks_for_the_shared_suite(config) -> bool:
    here = config.invocation_params.dir
    for arg in config.args:
        path = (here / arg.split("::")[0]).resolve()
        if path == SHARED_SUITE or SHARED_SUITE in path.parents:
            return True
    return False


def pytest_configure(config):
    if _asks_for_the_shared_suite(config) and not SHARED_DATA.is_dir():
        raise pytest.UsageError(f"tests/shared reads the third-party files of {SHARED_DATA}, which is not beside this "
                                "checkout: run it where that folder exists (as CI does), or run the default suite")


def pytest_ignore_collect(collection_path, config):
    if collection_path.resolve() == SHARED_SUITE and not _asks_for_the_shared_suite(config):
        return True
    return None


def _has_a_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu check the CUDA paths: left out (deselected, and named in the summary) where there is no GPU."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu and not _has_a_gpu():
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


def pytest_terminal_summary(terminalreporter, config):
    if not _has_a_gpu():
        terminalreporter.write_line("tests marked gpu (the CUDA attention paths): not run: no CUDA device here (the "
                                    "default run includes them on a machine with one)")
    if _asks_for_the_shared_suite(config):
        return
    why = ("it runs on its own: python3 -m pytest tests/shared (as .ci/run does)" if SHARED_DATA.is_dir()
           else f"{SHARED_DATA} is not beside this checkout (CI runs it where it is)")
    terminalreporter.write_line(f"tests/shared (checks against LLaMA-Factory's real data and published chat "
                                f"templates): not run: {why}")


@pytest.fixture(scope="session")
def llamafactory_data(tmp_path_factory) -> Path:
    """A folder laid out as LLaMA-Factory's data/: its registry's entry shapes and small files of our own."""
    from llamafactory_layout import write_llamafactory_data

    return write_llamafactory_data(tmp_path_factory.mktemp("llamafactory") / "data")


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """The three demo models (Llama, Mistral, Mixtral architectures), built once and cached on disk."""
    from engine.models.demo import DEMO_MODELS, demo_model_path

    return {name: demo_model_path(name) for name in DEMO_MODELS}


@pytest.fixture
def home(tmp_path, tiny_models, monkeypatch):
    """A state directory of its own, so the index holds only this test's runs."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path


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
