"""The README's promises: its commands are what CI runs, its example runs."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_blocks():
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_cmd = next(b.strip() for b in _bash_blocks() if "pytest" in b)
    assert test_cmd in (ROOT / ".ci" / "run").read_text()
    assert 'export AVALANCHE_SI_DATA' in (ROOT / ".ci" / "run").read_text()


def test_readme_gives_exactly_two_commands_for_a_fresh_machine():
    section = README.split("## Two commands for a fresh machine", 1)[1].split("\n## ", 1)[0]
    main_cmd, test_cmd = (b.strip() for b in re.findall(r"```bash\n(.*?)```", section, re.S))
    assert main_cmd.startswith("pip install -c constraints.txt") and main_cmd.endswith(
        "python -m experiments")
    assert test_cmd.startswith("pip install -c constraints.txt") and test_cmd.endswith(
        "python -m pytest")


def test_package_does_not_import_experiments():
    for path in (ROOT / "src" / "avalanche_si").rglob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+experiments", path.read_text(), flags=re.M), path


def test_constraints_pin_the_local_torch():
    text = (ROOT / "constraints.txt").read_text()
    assert "torch==2.14.1" in text and "torchvision==0.29.1" in text


def test_readme_headline_is_the_current_copy_of_the_results():
    # the README's headline table is results/headline.md, which the docs generator computes
    # from the runs (refresh both with `report --docs docs --readme README.md`)
    from experiments.docs import headline
    from experiments.report import readme_copies

    assert headline(ROOT / "results") == (ROOT / "results" / "headline.md").read_text()
    copies = readme_copies(ROOT / "README.md")
    # and its options table is the options page's (one source for both)
    assert [path for path, _, _ in copies] == ["docs/guide/options.md#options",
                                               "results/headline.md"]
    for path, body, current in copies:
        assert body == current, f"README's copy of {path} is stale: python -m experiments " \
                                "report --docs docs --readme README.md"


@pytest.mark.parametrize("folder", sorted(p.name for p in (ROOT / "results").iterdir()
                                          if any(p.rglob("seed*.json"))
                                          and p.name not in ("estimators", "family")))
def test_results_tables_are_what_the_run_files_give(folder):
    # and each summary.md / paired.md is what the committed per-run JSON files give
    from experiments.report import load_results, markdown_table, paired, paired_table, summarize

    out = ROOT / "results" / folder
    results = load_results(out)
    assert markdown_table(summarize(results)) == (out / "summary.md").read_text()
    assert paired_table(paired(results)) == (out / "paired.md").read_text()


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_is_a_front_page():
    assert len(README.splitlines()) <= 250 and len(README) <= 20_000
    for heading in ("## Install", "## Quick start", "## Two commands for a fresh machine",
                    "## Options", "## Documentation"):
        assert heading in README


def test_every_readme_python_block_runs_offline_and_prints_what_the_readme_shows(capsys):
    import torch

    loop, quick, options = _python_blocks()  # own loop, the quick start, the options example
    exec(compile(loop, "README.md (own loop)", "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.startswith("3 {'0.weight': '")  # Ω after each of 3 tasks
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the README's output was printed at one thread
    try:
        exec(compile(quick, "README.md (quick start)", "exec"), {"__name__": "readme"})
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    shown = re.search(r"```text\n(.*?)```", README.split("## Quick start", 1)[1], re.S).group(1)
    for line in shown.splitlines():
        if line.strip() and line.strip() != "...":
            assert line in out.splitlines(), (line, out)
    penalties = [float(v) for v in re.findall(r"SI penalty ([0-9.]+)", out)]
    assert len(penalties) == 4 and min(penalties) > 0  # visibly non-zero while training
    exec(compile(options, "README.md (options)", "exec"), {"__name__": "readme"})
    assert "['body', 'head'] LossPlateau(window=100" in capsys.readouterr().out


USER_FACING = [ROOT / "README.md", ROOT / "CHANGELOG.md"] + sorted((ROOT / "docs").rglob("*.md"))


@pytest.mark.parametrize("path", USER_FACING, ids=lambda p: str(p.relative_to(ROOT)))
def test_user_facing_text_names_no_commits_dates_pauses_or_outside_files(path):
    text = path.read_text()
    text = re.sub(r"`[0-9a-f]{64}`", "", text)  # the datasets' SHA-256 sums are data
    assert not re.search(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", text), \
        "a commit hash"
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "a date"
    assert "paused" not in text and "../shared" not in text and "SI_NOTES" not in text


