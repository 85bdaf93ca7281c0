"""mkdocs hook: the site's maths as MathML, which browsers render without a script.

``pymdownx.arithmatex`` (generic mode) marks maths written ``\\( ... \\)`` or ``\\[ ... \\]``
in the pages and in docstrings; this hook turns each into MathML with ``latex2mathml``, so the
built site shows maths offline, with no MathJax or KaTeX to load. An expression it cannot
convert stops the build with the page and the expression named.
"""

from __future__ import annotations

import html
import re

from latex2mathml.converter import convert

_MATHS = re.compile(r'<(span|div) class="arithmatex">(.*?)</\1>', re.S)


def _to_mathml(match: re.Match, page: str) -> str:
    tex = html.unescape(match.group(2)).strip()
    block = tex.startswith(("\\[", "$$"))
    inner = tex[2:-2].strip()
    try:
        return convert(inner, display="block" if block else "inline")
    except Exception as exc:  # noqa: BLE001 - any converter failure names the expression
        raise ValueError(f"{page}: cannot render the maths {tex!r}: {exc}") from exc


def on_page_content(html_text: str, page, **kwargs) -> str:
    return _MATHS.sub(lambda m: _to_mathml(m, page.file.src_path), html_text)
