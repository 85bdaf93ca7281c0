"""The documentation site: its result pages are what results/ gives, and it builds strictly."""

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


def test_mkdocs_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "plugin" / "index.html").exists()
    page = (tmp_path / "site" / "reference" / "plugin" / "index.html").read_text()
    assert "consolidate_now" in page and "si_lambda" in page  # built from the docstrings


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
