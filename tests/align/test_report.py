"""The run report of the tiny config: built, self-contained, and every image loads in a real browser."""

import base64
import re
from pathlib import Path

import pytest

from align.config import load_config
from align.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[2]
FAST = [
    "stages=[sft,rm_helpful,rm_safety]",
    "sft.train.max_steps=3",
    "sft.test_size=4",
    "rm_helpful.train.max_steps=2",
    "rm_safety.train.max_steps=2",
]


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
    assert "held-out answer loss" in page and "(n=4)" in page  # the opening table: SFT's effect with its n
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(imgs) >= 5
    for b64 in imgs:
        assert base64.b64decode(b64).startswith(b"\x89PNG")
    assert "http://" not in page and "https://" not in page  # readable offline


@pytest.mark.slow
def test_every_image_loads_in_headless_chromium(report, tmp_path, chromium):
    page = chromium.new_page(viewport={"width": 1200, "height": 900})
    page.goto(report.as_uri())
    sizes = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert len(sizes) >= 5
    assert all(done and width > 0 for done, width in sizes), sizes


def test_headline_gives_each_stage_its_effect_with_interval():
    from align.report import headline

    sft = {
        "heldout/loss_before": 1.5,
        "heldout/loss_after": 1.4,
        "heldout/loss_change": -0.1,
        "heldout/loss_change_lo": -0.15,
        "heldout/loss_change_hi": -0.05,
        "heldout/n": 40,
        "heldout/within_noise": False,
    }
    assert headline("sft", sft) == ("held-out answer loss 1.500 &rarr; 1.400: change -0.100 [-0.150, -0.050] (n=40)")
    ppo = {
        "eval/reward_heldout_change": 0.02,
        "eval/reward_heldout_change_lo": -0.01,
        "eval/reward_heldout_change_hi": 0.05,
        "eval/heldout_n": 8,
        "eval/within_noise": True,
        "kl/ref_final": 0.4,
    }
    assert headline("ppo", ppo) == (
        "held-out reward +0.020 [-0.010, +0.050] (n=8) <b>within noise</b>; KL to the reference 0.400"
    )
    ppo.update({"kl/ref_final": -0.02, "kl/ref_final_k3": 0.031})  # k1 below 0 on a batch; k3 never
    assert headline("ppo", ppo).endswith("; KL to the reference 0.031 (k3; k1 -0.020)")
    gatt = {
        "gatt/recall_before/turn2": 0.1,
        "gatt/recall_after/turn2": 0.3,
        "gatt/recall_after/turn2_lo": 0.2,
        "gatt/recall_after/turn2_hi": 0.4,
        "gatt/recall_after/turn2_n": 200,
        "gatt/recall_after/turn2/emoji": 0.5,
    }
    assert headline("gatt", gatt) == "recall turn 2: 10% &rarr; 30% [20, 40] (n=200)"
    ev = {
        "eval/ppo/lc_winrate_helpful_vs_sft": 0.4,
        "eval/ppo/lc_winrate_helpful_vs_sft_lo": 0.3,
        "eval/ppo/lc_winrate_helpful_vs_sft_hi": 0.5,
        "eval/ppo/winrate_helpful_vs_sft": 0.6,
    }
    assert headline("eval", ev) == "ppo: LC win 40% [30, 50] (raw 60%)"
    rm = {"eval/rm/accuracy": 0.6, "eval/rm/accuracy/ci_low": 0.5, "eval/rm/accuracy/ci_high": 0.7, "eval/rm/n": 300}
    for c, acc in (("safety", 0.667), ("helpfulness", 0.5)):
        rm |= {f"eval/{c}/rm/accuracy": acc, f"eval/{c}/rm/accuracy/ci_low": acc - 0.08}
        rm |= {f"eval/{c}/rm/accuracy/ci_high": acc + 0.07, f"eval/{c}/rm/n": 150}
        rm |= {f"eval/{c}/rm/length/balanced_accuracy": acc - 0.01}
    line = headline("reward", rm)  # one entry per held-out category; the overall eval/rm/* is not one
    assert line.startswith("helpfulness: accuracy ") and "; safety: accuracy " in line and line.count("accuracy ") == 2
    assert "length-balanced 49.0%" in line and "length-balanced 65.7%" in line and "(n=150)" in line
    assert headline("sft", {}) == "" and headline("ppo", {"eval/reward_heldout_change": 1.0}) == ""
