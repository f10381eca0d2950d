import os
import signal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# The Ctrl-C tests send SIGINT to programs they start, as a terminal would. A test run started in the
# background by a non-interactive shell (`make test &`) inherits SIGINT *ignored*; every program it
# starts would inherit that too, and Python installs no KeyboardInterrupt handler for an ignored
# SIGINT, so those tests would hang. Take Python's own handler back: the programs started from here
# then begin with the default disposition, as in a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

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


CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def chromium():
    """A headless Chromium browser (Debian's `chromium`, driven by playwright's sync API; nothing downloads
    a browser), closed after the test; the test is skipped where chromium is absent."""
    import shutil

    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.skip("no chromium (Debian package `chromium`; scripts/install_browser.sh installs it where it can)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
