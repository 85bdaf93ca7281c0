"""The documentation site: its result pages are what results/ gives, and it builds strictly."""

import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_generated_pages_are_what_the_results_give(tmp_path):
    # docs/reproductions/*.md and docs/performance.md are written by `python -m experiments
    # report --docs docs` from results/; a page edited by hand, or results added without
    # regenerating, fails here
    from experiments.docs import write_docs

    results = tmp_path / "results"
    shutil.copytree(ROOT / "results", results)
    # the main job's local output (results/digits, which git ignores) is no published page
    (results / "digits" / "split-digits" / "task" / "naive").mkdir(parents=True, exist_ok=True)
    shutil.copy(next((ROOT / "results").rglob("seed*.json")),
                results / "digits" / "split-digits" / "task" / "naive" / "seed0.json")
    write_docs(tmp_path / "docs", results)
    fresh = {p.relative_to(tmp_path / "docs") for p in (tmp_path / "docs").rglob("*.md")}
    committed = {p.relative_to(ROOT / "docs")
                 for p in (ROOT / "docs" / "reproductions").rglob("*.md")}
    assert committed | {Path("performance.md")} == fresh  # no page without its results
    for rel in sorted(fresh):
        assert (ROOT / "docs" / rel).read_text() == (tmp_path / "docs" / rel).read_text(), \
            f"docs/{rel} is stale: python -m experiments report --docs docs --readme README.md"
        for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", (ROOT / "docs" / rel).read_text()):
            assert (ROOT / "docs" / rel).parent.joinpath(image).exists(), image


def test_each_pages_rerun_command_makes_the_runs_it_stands_for():
    # the command a page prints for a result, parsed by the CLI as a reader would run it,
    # must give that result's run id: a preset default changed later (as --reinit was for
    # benzing-permuted-mnist) must show up as a flag in the older runs' commands
    from experiments.cli import _configs, _parser
    from experiments.docs import rerun_flags
    from experiments.report import load_results

    checked = 0
    for folder in sorted(p for p in (ROOT / "results").iterdir() if p.is_dir()):
        if folder.name in ("bench_overhead", "estimators", "family"):  # their own commands
            continue
        for r in load_results(folder):
            cfg = r["config"]
            method = cfg["method"] if cfg.get("stream", "tasks") == "tasks" else \
                r["run_id"].split("/")[2]
            argv = ["run", *" ".join(rerun_flags(cfg, folder.name)).split(), "--scenario",
                    cfg["scenario"], "--method", method, "--seeds", str(cfg["seed"])]
            assert [c.run_id() for c in _configs(_parser().parse_args(argv))] == [r["run_id"]], \
                (folder.name, argv)
            checked += 1
    assert checked > 100


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    pytest.importorskip("latex2mathml")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "not included in the \"nav\"" not in done.stderr, done.stderr  # every page reachable
    return out


def _prose(html_text):
    """The page's text outside code, tags removed: what a reader sees as running text."""
    html_text = re.sub(r"<(pre|code|script|style)\b.*?</\1>", " ", html_text, flags=re.S)
    html_text = re.sub(r"<math\b.*?</math>", " ", html_text, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", html_text))


def test_the_site_builds_strictly_and_renders_every_role_and_formula(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 20
    mathml = 0
    for page in pages:
        raw = page.read_text()
        mathml += raw.count("<math ")
        text = _prose(raw)
        where = page.relative_to(site)
        # reStructuredText roles and maths that no renderer touched
        assert not re.search(r":(math|class|meth|func|mod|attr|data|exc):`", text), where
        for delimiter in ("\\(", "\\)", "\\[", "\\]", "$$", "``"):
            assert delimiter not in text, (where, delimiter, text[text.find(delimiter) - 80:
                                                                    text.find(delimiter) + 80])
        assert "--8<--" not in text, where  # a snippet that was not included
    assert mathml > 50  # the guide's maths, as MathML (no script: it renders offline)
    assert "MathJax" not in (site / "index.html").read_text()


def test_each_saved_benchmark_run_is_a_section_of_the_performance_page(site):
    # a saved output that ends in a table must not swallow the next one's heading
    page = (site / "performance" / "index.html").read_text()
    for saved in sorted((ROOT / "results" / "bench_overhead").glob("*.txt")):
        assert re.search(rf'<h2 id="{re.escape(saved.stem)}"', page), saved.stem


def test_copied_blocks_of_the_docs_are_current():
    # getting-started copies the README's quick start and changelog.md the CHANGELOG, so that
    # each reads whole on a code host; `report --docs docs` refreshes them
    from experiments.report import readme_copies

    copies = {page.relative_to(ROOT / "docs").as_posix(): readme_copies(page, ROOT)
              for page in (ROOT / "docs").rglob("*.md")}
    assert [c[0] for c in copies["getting-started.md"]] == ["README.md#install",
                                                            "README.md#quickstart"]
    assert [c[0] for c in copies["changelog.md"]] == ["CHANGELOG.md"]
    for page, blocks in copies.items():
        for path, body, current in blocks:
            assert body == current, f"docs/{page}'s copy of {path} is stale: python -m " \
                                    "experiments report --docs docs --readme README.md"


def test_every_public_name_is_in_the_api_reference(site):
    import avalanche_si
    from avalanche_si import amp, consolidation, estimators, functional, lightning

    reference = " ".join(p.read_text() for p in (site / "reference").rglob("*.html"))
    names = set(avalanche_si.__all__) - {"__version__"}
    for module in (amp, consolidation, estimators, functional, lightning):
        names |= set(module.__all__)
    for cls in (avalanche_si.SIPlugin, avalanche_si.SynapticIntelligence):
        names |= {f"{cls.__name__}.{n}" for n, v in vars(cls).items()
                  if not n.startswith("_") and not n.startswith(("before_", "after_"))
                  and n not in ("supports_distributed",)}
    missing = sorted(n for n in names
                     if not re.search(r'id="avalanche_si\.[\w.]*\b' + re.escape(n) + '"',
                                      reference))
    assert not missing, f"not in the API reference: {missing}"
    page = (site / "reference" / "plugin" / "index.html").read_text()
    assert "consolidate_now" in page and "si_lambda" in page  # built from the docstrings
    assert "_delegated(" not in page and "doctest" not in reference


def _python_blocks(text):
    """The page's python blocks, less those copied from elsewhere (the README's quick start,
    which the README's own test runs)."""
    text = re.sub(r"<!-- copy of \S+ -->.*?<!-- end of copy -->", "", text, flags=re.S)
    return re.findall(r"```python\n(.*?)```", text, re.S)


SNIPPET_PAGES = sorted(
    p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")
    if _python_blocks(p.read_text())
    and p.name not in ("own-loop.md", "lightning.md"))  # each run with its output checked below


@pytest.mark.parametrize("page", SNIPPET_PAGES)
def test_every_snippet_of_the_docs_runs_as_written(page, tmp_path, monkeypatch):
    # the page's python blocks in order, in one namespace, as a reader goes through the page;
    # a page that says it continues from Getting started's setup runs that first
    monkeypatch.chdir(tmp_path)  # checkpoints and wandb runs land here
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    text = (ROOT / "docs" / page).read_text()
    blocks = _python_blocks(text)
    namespace = {"__name__": "docs"}
    uses = [name for name in ("model", "optimizer", "benchmark")
            if any(re.search(rf"\b{name}\b", b) for b in blocks)
            and not any(re.search(rf"^{name} = ", b, re.M) for b in blocks)]
    if uses:
        assert "getting-started.md#your-own-strategy" in text, \
            f"docs/{page} uses {uses} without saying where they come from"
        setup = _python_blocks((ROOT / "docs" / "getting-started.md").read_text())[0]
        exec(compile(setup, "docs/getting-started.md (setup)", "exec"), namespace)
    for k, block in enumerate(blocks):
        exec(compile(block, f"docs/{page} (block {k + 1})", "exec"), namespace)


@pytest.mark.parametrize("page", ["guide/own-loop.md", "guide/lightning.md"])
def test_guide_examples_run_as_written(page, capsys):
    # every python block of the page, each on its own, as a reader would paste it
    if page == "guide/lightning.md":
        pytest.importorskip("lightning")
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / page).read_text(), re.S)
    assert blocks
    for k, block in enumerate(blocks):
        exec(compile(block, f"docs/{page} (block {k + 1})", "exec"), {"__name__": "docs"})
    out = capsys.readouterr().out
    assert "consolidations: 5, accuracy per task:" in out, out
    acc = [float(a) for a in out.split("accuracy per task:")[1].split()[:5]]
    assert min(acc) > 0.5  # SI kept every task above chance


def _site_checker():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_site", ROOT / "tools" / "check_site.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    exe, why = module.find_browser()
    if exe is None:
        pytest.skip(f"no browser check: {why}")
    return module, exe


def test_the_browser_check_sees_each_kind_of_problem(tmp_path):
    # the check below must be able to fail: a page with one of each problem, in Material's
    # markup, and a clean page
    checker, exe = _site_checker()
    wide = "<td>" + "a_long_cell_value " * 40 + "</td>"
    (tmp_path / "bad.html").write_text(f"""<!doctype html><html><head>
<link rel="stylesheet" href="https://fonts.googleapis.com/css?family=Roboto">
<style>article {{ width: 600px }} .md-typeset__scrollwrap, pre > code {{ overflow: auto;
display: block }} td {{ white-space: nowrap }} code {{ word-break: break-all }}</style>
</head><body>
<article class="md-content__inner"><h1>Bad</h1>
<p>raw maths: \\(\\omega_k\\) and $$x$$</p>
<div class="md-typeset__scrollwrap"><table><tr>{wide}</tr></table></div>
<pre><code>{"x" * 400}</code></pre>
<table><tr><td style="min-width: 900px">unwrapped</td></tr></table>
<div style="width: 2000px">a banner wider than the window</div>
<p style="width: 120px">some words <code>clamp="total_and_more"</code></p>
<img src="data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' width='2000' height='10'/%3E" style="width: 300px">
<script>console.error("broken"); undefinedFunction();</script>
</article></body></html>""")
    (tmp_path / "good.html").write_text("""<!doctype html><html><body>
<article class="md-content__inner"><h1>Good</h1><p>plain <code>code</code></p></article>
</body></html>""")
    found = checker.check(tmp_path, exe)
    assert found["good.html"] == []
    kinds = {p["kind"] for p in found["bad.html"]}
    assert kinds >= {"outside request", "console error", "script error", "raw maths",
                     "wide table", "wide code block", "code span broken",
                     "figure too small", "sticks out", "page scrolls sideways"}, found["bad.html"]


def test_every_page_reads_offline_at_laptop_width(site):
    # every built page in Chromium at 1280 px, offline: no outside request, no console
    # error, no raw maths, no table or code block wider than the column, no code span broken
    # inside a word, no figure squeezed to illegibility (tools/check_site.py)
    checker, exe = _site_checker()
    found = checker.check(site, exe)
    assert len(found) > 30
    assert not any(found.values()), checker.report(found)


@pytest.mark.parametrize("module", [
    "avalanche_si.engine", "avalanche_si.plugin", "avalanche_si.lightning",
    "avalanche_si.consolidation", "avalanche_si.functional", "avalanche_si.amp",
    "avalanche_si.wandb_logger", "avalanche_si.estimators.base", "avalanche_si.estimators.path",
    "avalanche_si.estimators.si", "avalanche_si.estimators.delta_params",
    "avalanche_si.estimators.siu", "avalanche_si.estimators.sib", "avalanche_si.estimators.sos",
    "avalanche_si.estimators.onaf"])
def test_every_public_member_on_the_reference_pages_has_a_docstring(module):
    # the API pages list every public name and method: each says what it does (a hook of an
    # adapter says what SI does there; an estimator's override, its formula)
    import importlib
    import inspect

    if module == "avalanche_si.lightning":
        pytest.importorskip("lightning")
    mod = importlib.import_module(module)
    missing = []
    for name in getattr(mod, "__all__", ()):
        obj = getattr(mod, name)
        if not inspect.getdoc(obj):
            missing.append(name)
        if inspect.isclass(obj):
            for attr, value in vars(obj).items():
                fn = value.fget if isinstance(value, property) else value
                if isinstance(fn, (staticmethod, classmethod)):
                    fn = fn.__func__
                if not attr.startswith("_") and callable(fn) and not (fn.__doc__ or "").strip():
                    missing.append(f"{name}.{attr}")
    assert not missing, f"{module}: no docstring for {', '.join(missing)}"
