"""Fixtures of the rollout tests: `checks`, the Engine-contract checks both engine test modules run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def checks():
    # --import-mode=importlib puts no test directory on sys.path: load the helper module by path.
    path = Path(__file__).with_name("rollout_checks.py")
    spec = importlib.util.spec_from_file_location("rollout_checks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
