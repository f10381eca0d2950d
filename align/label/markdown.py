"""A small, safe Markdown subset -> HTML, for the labeling page's answers and prompts.

The whole text is HTML-escaped FIRST (``& < > " '``), then a few constructs are turned into tags
this module writes itself, none with an attribute: so whatever an answer contains (``<script>``,
``<img onerror=...>``, a ``javascript:`` link) reaches the page as text, never as markup.

Supported: fenced code blocks (``` or ~~~, the info string dropped) -> ``<pre><code>``; unordered
(``-``, ``*``, ``+``) and ordered (``1.`` / ``1)``) lists -> ``<ul>`` / ``<ol>`` of ``<li>``;
paragraphs (blank-line separated; a single newline inside one -> ``<br>``); inline ```code```,
``**bold**`` / ``__bold__`` and ``*italic*`` / ``_italic_`` (underscores not inside a word, so
``obj.__dict__`` and ``snake_case`` stay as they are). Anything else (headings, links,
tables, raw HTML) stays as the literal text it is.
"""

from __future__ import annotations

import html
import re

TAGS = ("p", "br", "pre", "code", "ul", "ol", "li", "strong", "em")  # every tag `render` can write

_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_UL = re.compile(r"^\s{0,3}[-*+]\s+(.*)$")
_OL = re.compile(r"^\s{0,3}\d{1,9}[.)]\s+(.*)$")
_CODE = re.compile(r"`([^`\n]+)`")
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*|(?<!\w)__(?=\S)(.+?)(?<=\S)__(?!\w)")
_ITALIC = re.compile(r"(?<![\w*])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![\w*])|(?<!\w)_(?=[^\s_])(.+?)(?<=[^\s_])_(?!\w)")


def _emphasis(text: str) -> str:
    text = _BOLD.sub(lambda m: f"<strong>{m.group(1) or m.group(2)}</strong>", text)
    return _ITALIC.sub(lambda m: f"<em>{m.group(1) or m.group(2)}</em>", text)


def inline(text: str) -> str:
    """Inline code, bold and italic of an already escaped line (code spans are left as they are)."""
    out, last = [], 0
    for m in _CODE.finditer(text):
        out.append(_emphasis(text[last : m.start()]))
        out.append(f"<code>{m.group(1)}</code>")
        last = m.end()
    out.append(_emphasis(text[last:]))
    return "".join(out)


def render(text: str) -> str:
    """The HTML of ``text`` (Markdown subset above); safe to put in a page with innerHTML."""
    lines = html.escape(text, quote=True).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out: list[str] = []
    para: list[str] = []
    items: list[str] = []
    kind = ""  # the list being collected: "ul", "ol" or ""

    def flush() -> None:
        nonlocal kind
        if para:
            out.append("<p>" + "<br>".join(inline(x) for x in para) + "</p>")
            para.clear()
        if items:
            out.append(f"<{kind}>" + "".join(f"<li>{inline(x)}</li>" for x in items) + f"</{kind}>")
            items.clear()
            kind = ""

    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:
            flush()
            mark = fence.group(1)
            body = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(mark):
                body.append(lines[i])
                i += 1
            out.append("<pre><code>" + "\n".join(body) + "</code></pre>")
            i += 1  # past the closing fence (an unclosed fence runs to the end)
            continue
        ul, ol = _UL.match(line), _OL.match(line)
        if ul or ol:
            if para or kind != ("ul" if ul else "ol"):
                flush()
            kind = "ul" if ul else "ol"
            items.append((ul or ol).group(1))
        elif not line.strip():
            flush()
        elif items and line.startswith((" ", "\t")):
            items[-1] += " " + line.strip()  # a continuation line of the last item
        else:
            if items:
                flush()
            para.append(line)
        i += 1
    flush()
    return "".join(out)
