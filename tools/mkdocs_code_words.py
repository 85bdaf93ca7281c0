"""mkdocs hook: an inline code span without a space (``clamp="total"``, ``--out``, a path)
gets the class ``word``, which the site's stylesheet keeps on one line at laptop widths.

Material lets inline code break anywhere, so a narrow table column showed ``clamp="tota`` /
``l"``; keeping every span on one line instead would stop long type annotations from wrapping
at their spaces. Only the spans that are one word are marked; on a phone they may break again
(``docs/stylesheets/extra.css``).
"""

from __future__ import annotations

import re

# <code>text</code> with no tag, no whitespace inside, not in a <pre> block (those are
# <pre><code ...> with attributes or a highlighted <span>, never a bare one-word <code>)
_WORD = re.compile(r"<code>([^<\s]+)</code>")


def on_page_content(html_text: str, page, **kwargs) -> str:
    return _WORD.sub(r'<code class="word">\1</code>', html_text)
