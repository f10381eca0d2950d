"""The labeling page in a real headless Chromium (Debian's /usr/bin/chromium, driven by playwright's
python API; nothing downloads a browser) against a live server: log in, label three pairs with the
mouse and the keyboard, and the store then holds exactly those labels."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCREENSHOTS = ROOT / "runs"  # copies of the screenshots, to look at after a run

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
def test_label_three_pairs_with_mouse_and_keyboard(store, live_server, tmp_path, chromium):
    from playwright.sync_api import expect

    token = store.add_labeler("ann")
    store.add_labeler("bob")
    store.create_round(PAIRS, labels_per_pair=1, assign_to=["ann"])
    ids = [p["id"] for p in store.round_pairs(1)]
    shot = tmp_path / "label_page.png"

    page = chromium.new_page(viewport={"width": 1280, "height": 860})
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

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOTS / "label_screenshot.png")
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


LONG_ANSWER = """Here is a **safe** way to list files, with *no* surprises:

```python
import os

for name in sorted(os.listdir(".")):
    if name.endswith(".py") and "<" not in name:
        print(name)
```

Steps:
1. Open a terminal.
2. Run the script with `python list.py`.
3. Read the output.

- works on **Linux**
- and on *macOS*
""" + "\n".join(f"Extra line {i} of a long answer." for i in range(40))

HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">Plain answer with <b>tags</b>.'


@pytest.mark.timeout(300)
def test_markdown_system_prompt_script_as_text_undo_and_admin_view(store, live_server, chromium):
    from playwright.sync_api import expect

    token = store.add_labeler("ann")
    root = store.add_labeler("root", admin=True)
    pairs = [
        {
            "prompt": [
                {"role": "system", "content": "You are a terse assistant. Answer in **Markdown**."},
                {"role": "user", "content": "How do I list the Python files here?"},
            ],
            "response_a": LONG_ANSWER,
            "response_b": HOSTILE,
            "category": "helpfulness",
        },
        {
            "prompt": [{"role": "user", "content": "Name a prime."}],
            "response_a": "7",
            "response_b": "8",
            "category": "helpfulness",
        },
    ]
    store.create_round(pairs, labels_per_pair=1, assign_to=["ann"])
    ids = [p["id"] for p in store.round_pairs(1)]
    ann = store.authenticate(token)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    page.goto(live_server.url + "/")
    page.fill("#token", token)
    page.click("#login-btn")
    work = page.locator("#work")
    expect(work).to_have_attribute("data-pair-id", str(ids[0]))

    # Markdown: a code block, an ordered and an unordered list, bold and italic, inline code.
    a = page.locator("#resp-a")
    expect(a.locator("pre code")).to_contain_text('if name.endswith(".py") and "<" not in name:')
    expect(a.locator("ol > li")).to_have_count(3)
    expect(a.locator("ul > li")).to_have_count(2)
    expect(a.locator("strong").first).to_have_text("safe")
    expect(a.locator("em").first).to_have_text("no")
    expect(a.locator("li code")).to_have_text("python list.py")
    # The long answer scrolls inside its box; the page does not grow with it.
    height, scroll = a.evaluate("el => [el.clientHeight, el.scrollHeight]")
    assert height <= 420 < scroll

    # The system prompt is shown first, marked, and rendered.
    system = page.locator("#prompt .turn.system")
    expect(system).to_have_count(1)
    expect(system.locator(".role")).to_have_text("system prompt")
    expect(system.locator("strong")).to_have_text("Markdown")

    # A <script> and an onerror handler in an answer are text: shown, never run, no element made.
    b = page.locator("#resp-b")
    expect(b).to_contain_text("<script>window.__pwned = 1</script>")
    expect(b).to_contain_text("<b>tags</b>")
    assert b.locator("script, img, b").count() == 0
    page.wait_for_timeout(300)  # time for an image error handler to fire, had an image been made
    assert page.evaluate("window.__pwned") is None
    page.screenshot(path=str(SCREENSHOTS / "label_markdown.png"), full_page=False)

    # Label pair 1 (A, better), then undo with the key: pair 1 comes back with that label filled in.
    for key in ("1", "w", "Enter"):
        page.keyboard.press(key)
    expect(work).to_have_attribute("data-pair-id", str(ids[1]))
    assert [lab["pair_id"] for lab in store.labels_of(ann.id)] == [ids[0]]
    page.keyboard.press("u")
    expect(work).to_have_attribute("data-pair-id", str(ids[0]))
    expect(page.locator("#choose-a")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#rate-better")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#status")).to_contain_text(f"removed your label of pair {ids[0]}")
    expect(page.locator("#progress")).to_have_text("0 / 2 labeled")
    assert store.labels_of(ann.id) == []

    # Change of mind: B, significantly better; then pair 2 is a tie; then the undo button takes the tie back.
    for key in ("2", "q", "Enter"):
        page.keyboard.press(key)
    expect(work).to_have_attribute("data-pair-id", str(ids[1]))
    page.keyboard.press("t")
    page.keyboard.press("Enter")
    expect(page.locator("#done")).to_be_visible()
    page.click("#undo")
    expect(page.locator("#status")).to_contain_text(f"removed your label of pair {ids[1]}")
    expect(work).to_be_visible()
    expect(work).to_have_attribute("data-pair-id", str(ids[1]))
    expect(page.locator("#choose-tie")).to_have_attribute("aria-pressed", "true")
    page.keyboard.press("Enter")
    expect(page.locator("#done")).to_be_visible()
    got = [(lab["pair_id"], lab["choice"], lab["rating"]) for lab in store.labels_of(ann.id)]
    assert got == [(ids[0], "b", "significantly_better"), (ids[1], "tie", None)]

    # The admin view: progress and quality of round 1, for an admin's token only.
    admin = chromium.new_page(viewport={"width": 1100, "height": 700})
    admin.goto(live_server.url + "/admin")
    admin.fill("#token", token)
    admin.click("#login-btn")
    expect(admin.locator("#error")).to_contain_text("403")
    admin.click("#logout")
    admin.fill("#token", root)
    admin.click("#login-btn")
    card = admin.locator('[data-round="1"]')
    expect(card.locator(".progress")).to_contain_text("2 of 2 pairs complete (1 labels each); 2 labels, 0 skips")
    expect(card.locator("table.labelers tr")).to_have_count(2)
    expect(card.locator("table.labelers tr").nth(1)).to_contain_text("ann")
    admin.screenshot(path=str(SCREENSHOTS / "label_admin.png"), full_page=True)
