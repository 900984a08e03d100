"""The suite against third-party files beside the checkout (../shared/data: LLaMA-Factory's real registry and demo
data, published chat templates). tests/conftest.py runs it only when asked for by path, and only where it exists."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
for suite in ("unit", "integration"):  # its tests reuse those suites' tiny tokenizers, configs and helpers
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / suite))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA
