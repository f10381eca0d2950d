"""The page's Markdown subset (align/label/markdown.py): hand-written cases, and no input ever yields
markup other than the renderer's own attribute-free tags."""

from __future__ import annotations

import random
import re

import pytest

from align.label.markdown import TAGS, render


@pytest.mark.parametrize(
    "text, want",
    [
        ("plain", "<p>plain</p>"),
        (
            "**bold** and *it* and __b2__ and _i2_",
            "<p><strong>bold</strong> and <em>it</em> and <strong>b2</strong> and <em>i2</em></p>",
        ),
        ("a `x < y` b", "<p>a <code>x &lt; y</code> b</p>"),
        ("`**not bold**`", "<p><code>**not bold**</code></p>"),
        ("one\ntwo\n\nthree", "<p>one<br>two</p><p>three</p>"),
        ("- a\n- **b**\n  c", "<ul><li>a</li><li><strong>b</strong> c</li></ul>"),
        ("Steps:\n1. x\n2) y", "<p>Steps:</p><ol><li>x</li><li>y</li></ol>"),
        (
            "```python\nif a < b:\n    print('*x*')\n```\nafter",
            "<pre><code>if a &lt; b:\n    print(&#x27;*x*&#x27;)</code></pre><p>after</p>",
        ),
        ("~~~\nunclosed <b>", "<pre><code>unclosed &lt;b&gt;</code></pre>"),
        ("snake_case_name, 2*3*4", "<p>snake_case_name, 2*3*4</p>"),
        ("window.__x = 1; window.__y", "<p>window.__x = 1; window.__y</p>"),
        ("<script>alert(1)</script>", "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>"),
        ('<img src=x onerror="alert(1)">', "<p>&lt;img src=x onerror=&quot;alert(1)&quot;&gt;</p>"),
        ("[link](javascript:alert(1))", "<p>[link](javascript:alert(1))</p>"),
        ("# Title", "<p># Title</p>"),
        ("", ""),
    ],
)
def test_render_by_hand(text, want):
    assert render(text) == want


def test_no_input_makes_foreign_markup():
    allowed = re.compile(r"</?(%s)>" % "|".join(TAGS))
    pieces = ["<", ">", "&", '"', "'", "*", "**", "_", "`", "```", "~~~", "-", "1.", "\n", "\n\n", " ", "script",
              "onerror=", "a", "<script>", "</code>", "<p>", "&lt;", "javascript:"]  # fmt: skip
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
        out = allowed.sub("", render(text))
        assert "<" not in out and ">" not in out, (text, render(text))
        # Every & in the output starts an entity the escaping wrote.
        assert re.fullmatch(r"([^&]|&(amp|lt|gt|quot|#x27);)*", out, re.S), (text, out)
