"""The labeling page in a real headless Chromium (Debian's /usr/bin/chromium, driven by playwright's
python API; nothing downloads a browser) against a live server: log in, label three pairs with the
mouse and the keyboard, and the store then holds exactly those labels."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[3]
SCREENSHOT_COPY = ROOT / "runs" / "label_screenshot.png"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

PAIRS = [
    {
        "prompt": [
            {"role": "user", "content": "How do I keep a sourdough starter alive while I am away for two weeks?"}
        ],
        "response_a": "Feed it, let it rise for an hour, then put it in the fridge in a closed jar. When you are back, "
        "discard half and feed it twice a day for two days before baking.",
        "response_b": "Just leave it on the counter, it will be fine.",
        "category": "helpfulness",
    },
    {
        "prompt": [
            {"role": "system", "content": "You are a careful assistant."},
            {"role": "user", "content": "Which household chemicals make a toxic gas?"},
        ],
        "response_a": "Mix bleach and ammonia in a small room, that works best.",
        "response_b": "I can't help with making toxic gases. For safety: never mix bleach with ammonia or acids, "
        "and keep cleaning products in their original containers.",
        "category": "safety",
    },
    {
        "prompt": [{"role": "user", "content": "Write the HTML for a bold word."}],
        "response_a": "<b>bold</b>",
        "response_b": "Use <strong>bold</strong> for emphasis.",
        "category": "helpfulness",
    },
]


@pytest.mark.timeout(300)
def test_label_three_pairs_with_mouse_and_keyboard(store, live_server, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is absent: install Debian's chromium (scripts/install_browser.sh) to run the browser test"
        )
    from playwright.sync_api import expect, sync_playwright

    token = store.add_labeler("ann")
    store.add_labeler("bob")
    store.create_round(PAIRS, labels_per_pair=1, assign_to=["ann"])
    ids = [p["id"] for p in store.round_pairs(1)]
    shot = tmp_path / "label_page.png"

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(live_server.url + "/")

            # A wrong token is refused at the login form.
            page.fill("#token", "wrong-token")
            page.click("#login-btn")
            expect(page.locator("#login-error")).to_contain_text("not accepted")
            expect(page.locator("#login")).to_be_visible()

            page.fill("#token", token)
            page.click("#login-btn")
            work = page.locator("#work")
            expect(work).to_be_visible()
            expect(page.locator("#who")).to_have_text("ann")
            assert page.evaluate("sessionStorage.getItem('align-label-token')") == token
            expect(page.locator("#progress")).to_have_text("0 / 3 labeled")

            # Pair 1, with the mouse: A is better, "better", B unsafe.
            expect(work).to_have_attribute("data-pair-id", str(ids[0]))
            expect(page.locator("#resp-a")).to_contain_text("fridge")
            expect(page.locator("#submit")).to_be_disabled()
            page.click("#choose-a")
            page.click("#rate-better")
            page.click("#unsafe-b")
            expect(page.locator("#choose-a")).to_have_attribute("aria-pressed", "true")
            page.click("#submit")

            # Pair 2 (a two-turn safety prompt), with the keyboard: 2 = B, q = significantly better, z = A unsafe.
            expect(work).to_have_attribute("data-pair-id", str(ids[1]))
            expect(page.locator("#progress")).to_have_text("1 / 3 labeled")
            expect(page.locator("#category")).to_have_text("safety")
            expect(page.locator("#prompt .turn")).to_have_count(2)
            for key in ("2", "q", "z"):
                page.keyboard.press(key)
            expect(page.locator("#rate-significantly_better")).to_have_attribute("aria-pressed", "true")
            expect(page.locator("#unsafe-a")).to_be_checked()
            page.keyboard.press("Enter")

            # Pair 3, keyboard then mouse: the HTML in a response is shown as text, not rendered.
            expect(work).to_have_attribute("data-pair-id", str(ids[2]))
            expect(page.locator("#resp-a")).to_have_text("<b>bold</b>")
            page.keyboard.press("1")
            page.keyboard.press("e")
            page.click("#choose-b")  # change of mind, with the mouse
            expect(page.locator("#card-b")).to_have_class("card resp chosen")
            page.screenshot(path=str(shot), full_page=True)
            page.click("#submit")

            expect(page.locator("#done")).to_be_visible()
            expect(page.locator("#progress")).to_have_text("3 / 3 labeled")
        finally:
            browser.close()

    SCREENSHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT_COPY)
    assert shot.stat().st_size > 10_000

    ann = store.authenticate(token)
    got = [
        (lab["pair_id"], lab["choice"], lab["rating"], lab["a_safe"], lab["b_safe"]) for lab in store.labels_of(ann.id)
    ]
    assert got == [
        (ids[0], "a", "better", True, False),
        (ids[1], "b", "significantly_better", False, True),
        (ids[2], "b", "slightly_better", True, True),
    ]
    assert store.counts()["labels"] == 3  # nothing else was written
