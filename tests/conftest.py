import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.environ.get("QUANT_SHARED_DIR") or os.path.join(os.path.dirname(ROOT), "shared")


@pytest.fixture(scope="session")
def shared():
    if not os.path.isdir(SHARED):
        pytest.fail(f"offline data folder not found at {SHARED}: set QUANT_SHARED_DIR")
    return SHARED


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # the hub is unreachable here; tests must never wait on it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
