"""The run report of the tiny config: built, self-contained, and every image loads in a real browser."""
import base64
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from align.config import load_config
from align.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[2]
FAST = ["stages=[sft,rm_helpful,rm_safety]", "sft.train.max_steps=3", "rm_helpful.train.max_steps=2",
        "rm_safety.train.max_steps=2"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report") / "run"
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={run_dir}", *FAST])
    run_pipeline(cfg)
    return run_dir / "report.html"


@pytest.mark.slow
def test_report_shows_every_stage_with_plots_and_tables(report):
    page = report.read_text()
    for name in ("sft", "rm_helpful", "rm_safety"):
        assert f'id="{name}"' in page
    assert "Accuracy (%) by rating level" in page  # the RM's Table 28 layout
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(imgs) >= 5
    for b64 in imgs:
        assert base64.b64decode(b64).startswith(b"\x89PNG")
    assert "http://" not in page and "https://" not in page  # readable offline


@pytest.mark.slow
def test_every_image_loads_in_headless_chromium(report, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium (Debian package `chromium`; `make test` installs it where it can)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(report.as_uri())
        sizes = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert len(sizes) >= 5
    assert all(done and width > 0 for done, width in sizes), sizes
