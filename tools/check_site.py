"""Open every page of the built docs site in a real browser, offline, as a reader sees it.

    python tools/check_site.py            # builds the site into a temporary folder first
    python tools/check_site.py site/      # or checks a site already built

Each page is loaded from a server on 127.0.0.1 in headless Chromium at 1280 x 900 px (or
``--width``), and the check fails on:

- a request to any other host (fonts, scripts, images from a CDN): the site must work offline;
- a console error or an uncaught script error;
- raw maths: TeX (``\\(``, ``$$``, ``\\frac{``...) in the running text, outside code;
- a table or code block wider than the content column (it scrolls sideways), anything else
  that sticks out of the column, or a page that scrolls sideways;
- an inline code span without a space that wraps onto a second line (``clamp="tota`` / ``l"``);
- a figure shown at less than half its width in pixels (its labels become illegible).

It needs Playwright for Python (``pip install playwright``; no browser download) and a
Chromium on the machine (Debian: ``apt-get install chromium``; or name one with
``$CHROMIUM``). Where either is missing it says so and exits 0, having checked nothing:
``tests/test_docs.py`` runs it in the suite where both exist and skips otherwise.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 1280, 900
SHRINK = 2.0  # an image shown at less than 1/SHRINK of its pixel width is too small to read

# Runs in the page; returns the problems it sees, each {kind, where, detail}.
_INSPECT = r"""
() => {
  const out = [];
  const article = document.querySelector("article.md-content__inner") || document.body;
  const column = article.getBoundingClientRect();
  const describe = (el) => {
    const h = [...document.querySelectorAll("h1, h2, h3")]
      .filter(x => x.compareDocumentPosition(el) & Node.DOCUMENT_POSITION_FOLLOWING).pop();
    return (h ? h.textContent.replace("¶", "").trim() + ": " : "")
      + el.textContent.trim().replace(/\s+/g, " ").slice(0, 60);
  };
  // tables (Material wraps each in a scrolling div) and code blocks
  for (const el of article.querySelectorAll(".md-typeset__scrollwrap, pre > code")) {
    if (el.scrollWidth > el.clientWidth + 1)
      out.push({kind: el.tagName === "CODE" ? "wide code block" : "wide table",
                where: describe(el),
                detail: `${el.scrollWidth} px in ${el.clientWidth} px`});
  }
  // anything else that sticks out of the content column
  for (const el of article.querySelectorAll("img, table, pre, .doc-signature, math, code")) {
    const r = el.getBoundingClientRect();
    // (an inline code span that wraps may hang its right padding over the edge: not content)
    const slack = 1 + (el.tagName === "CODE" ? parseFloat(getComputedStyle(el).paddingRight) : 0);
    if (r.width > 0 && r.right > column.right + slack && !el.closest(".md-typeset__scrollwrap, pre"))
      out.push({kind: "sticks out", where: describe(el),
                detail: `${Math.round(r.right - column.right)} px past the column`});
  }
  // inline code without a space, broken across lines
  for (const el of article.querySelectorAll("code")) {
    if (el.closest("pre")) continue;
    const text = el.textContent;
    if (!/\s/.test(text) && el.getClientRects().length > 1)
      out.push({kind: "code span broken", where: describe(el), detail: text.slice(0, 60)});
  }
  // the page itself scrolling sideways
  if (document.documentElement.scrollWidth > window.innerWidth + 1)
    out.push({kind: "page scrolls sideways", where: "",
              detail: `${document.documentElement.scrollWidth} px in ${window.innerWidth} px`});
  // figures squeezed below legibility
  for (const img of article.querySelectorAll("img")) {
    if (img.naturalWidth && img.clientWidth && img.naturalWidth > SHRINK * img.clientWidth)
      out.push({kind: "figure too small", where: img.getAttribute("src"),
                detail: `${img.naturalWidth} px shown at ${img.clientWidth} px`});
  }
  // TeX that no renderer touched, in the running text
  const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT, {
    acceptNode: n => n.parentElement.closest("pre, code, math, script, style")
      ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT});
  const tex = /\\\(|\\\)|\\\[|\\\]|\$\$|\\[a-zA-Z]{2,}(?![a-zA-Z])/;
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const m = n.textContent.match(tex);
    if (m) out.push({kind: "raw maths", where: describe(n.parentElement),
                     detail: n.textContent.trim().slice(0, 60)});
  }
  return out;
}
""".replace("SHRINK", repr(SHRINK))

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def find_browser() -> tuple[str | None, str]:
    """The Chromium to use and, when there is none, why."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None, "Playwright for Python is not installed (pip install playwright)"
    exe = os.environ.get("CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p),
        None)
    if exe is None:
        return None, "no Chromium on this machine (apt-get install chromium, or set $CHROMIUM)"
    return exe, ""


def build_site(into: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(into)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"mkdocs build failed:\n{done.stderr[-3000:]}")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _offline(problems: list[dict]):
    """A route handler: requests to 127.0.0.1 go through, any other is recorded and refused."""
    def route(r):
        url = r.request.url
        if url.startswith(("data:", "blob:")) or urlsplit(url).hostname == "127.0.0.1":
            return r.continue_()
        problems.append({"kind": "outside request", "where": url,
                         "detail": r.request.resource_type})
        return r.abort()
    return route


def _console_errors(problems: list[dict]):
    def on_console(message):
        if message.type == "error" and "net::ERR_FAILED" not in message.text:
            problems.append({"kind": "console error", "where": "", "detail": message.text[:200]})
    return on_console


def check(site: Path, browser_exe: str, width: int = WIDTH) -> dict[str, list[dict]]:
    """Every page's problems at a window ``width`` px wide, by page path (an empty list for a
    clean page)."""
    from playwright.sync_api import sync_playwright

    site = Path(site)
    pages = sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html")
                   if p.name != "404.html")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}/"
    found: dict[str, list[dict]] = {}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_exe, args=_FLAGS)
            context = browser.new_context(viewport={"width": width, "height": HEIGHT})
            for path in pages:
                problems: list[dict] = []
                page = context.new_page()
                page.route("**/*", _offline(problems))
                page.on("console", _console_errors(problems))
                page.on("pageerror", lambda e, problems=problems: problems.append(
                    {"kind": "script error", "where": "", "detail": str(e)[:200]}))
                page.goto(base + path, wait_until="load")
                page.wait_for_load_state("networkidle")
                problems += page.evaluate(_INSPECT)
                found[path] = problems
                page.close()
            browser.close()
    finally:
        server.shutdown()
    return found


def report(found: dict[str, list[dict]], width: int = WIDTH) -> str:
    lines = []
    for path, problems in found.items():
        for p in problems:
            lines.append(f"{path}: {p['kind']}: {p['where']} ({p['detail']})")
    bad = sum(1 for p in found.values() if p)
    lines.append(f"{len(found)} pages at {width} px, {bad} with problems, "
                 f"{sum(map(len, found.values()))} problems in all")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/check_site.py",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("site", nargs="?", help="a built site (default: build one now)")
    ap.add_argument("--width", type=int, default=WIDTH,
                    help=f"the window's width in px (default {WIDTH}, a laptop's)")
    args = ap.parse_args(argv)
    exe, why = find_browser()
    if exe is None:
        print(f"skipped, nothing checked: {why}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(args.site) if args.site else Path(tmp)
        if not args.site:
            build_site(site)
        found = check(site, exe, args.width)
    print(report(found, args.width))
    return 1 if any(found.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
