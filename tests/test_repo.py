"""The README's promises: its commands are what CI runs, its example runs."""

import os
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


def test_readme_main_command_runs_the_experiments_default():
    main_cmd = _bash_blocks()[0].strip()
    assert main_cmd.startswith("pip install -c constraints.txt") and main_cmd.endswith(
        "python -m experiments")


def test_package_does_not_import_experiments():
    for path in (ROOT / "avalanche_si").rglob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+experiments", path.read_text(), flags=re.M), path


def test_constraints_pin_the_local_torch():
    text = (ROOT / "constraints.txt").read_text()
    assert "torch==2.14.1" in text and "torchvision==0.29.1" in text


def test_readme_result_tables_are_copies_of_the_results_files():
    # every reproduction table in the README is a verbatim copy of a summary.md / paired.md
    # that `python -m experiments report` wrote (refresh with `report --readme README.md`)
    from experiments.report import readme_copies

    copies = readme_copies(ROOT / "README.md")
    presets = {path.split("/")[1] for path, _, _ in copies}
    assert {"vandeven-split-mnist", "vandeven-permuted-mnist", "zenke-permuted-mnist",
            "vandeven-split-fmnist", "vandeven-permuted-fmnist"} <= presets
    for path, body, current in copies:
        assert body == current, f"README's copy of {path} is stale: python -m experiments " \
                                f"report --out {Path(path).parent} --readme README.md"


@pytest.mark.parametrize("folder", sorted(p.name for p in (ROOT / "results").iterdir()
                                          if any(p.rglob("seed*.json"))))
def test_results_tables_are_what_the_run_files_give(folder):
    # and each summary.md / paired.md is what the committed per-run JSON files give
    from experiments.report import load_results, markdown_table, paired, paired_table, summarize

    out = ROOT / "results" / folder
    results = load_results(out)
    assert markdown_table(summarize(results)) == (out / "summary.md").read_text()
    assert paired_table(paired(results)) == (out / "paired.md").read_text()


DATA = os.environ.get("AVALANCHE_SI_DATA", "data")


@pytest.mark.skipif(not (Path(DATA) / "MNIST" / "raw").exists(),
                    reason=f"MNIST not found under $AVALANCHE_SI_DATA ({DATA})")
def test_readme_usage_example_runs(capsys):
    usage = README.split("## Usage", 1)[1]
    code = re.search(r"```python\n(.*?)```", usage, flags=re.S).group(1)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "after task 5: SI penalty" in out
    accs = [float(x) for x in re.findall(r"'Exp\d+': ([0-9.]+)", out)]
    assert len(accs) == 5 and sum(accs) / 5 > 0.9, out
