import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (a checkout without ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    from align.models import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def tiny_tok(tiny_dir):
    from align.models import load_tokenizer

    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    from align.models import embedded_model_dir

    return embedded_model_dir()
