"""The wheel: avalanche_si alone, typed, with complete metadata, importable by itself."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "build", "--wheel", "--sdist", "--no-isolation",
                           "--outdir", str(out), str(ROOT)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return next(out.glob("*.whl")), next(out.glob("*.tar.gz"))


def test_wheel_holds_the_package_only_typed_with_metadata(wheel):
    import avalanche_si

    names = zipfile.ZipFile(wheel[0]).namelist()
    assert "avalanche_si/py.typed" in names and "avalanche_si/plugin.py" in names
    assert not [n for n in names if n.startswith(("experiments/", "tests/"))]
    meta = next(zipfile.ZipFile(wheel[0]).read(n).decode() for n in names
                if n.endswith("METADATA"))
    assert f"Version: {avalanche_si.__version__}" in meta
    for field in ("License: Apache-2.0", "Requires-Python: >=3.10", "Project-URL: Paper",
                  "Classifier: Programming Language :: Python :: 3.11", "Classifier: Typing :: Typed",
                  "Requires-Dist: avalanche-lib"):
        assert field in meta, field


def test_the_package_imports_from_the_wheel_alone(wheel, tmp_path):
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
                           "--target", str(target), str(wheel[0])], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # outside the checkout, with the editable install's finder removed: only the wheel's copy
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
            "repr(f).lower()]; import avalanche_si, importlib.util; "
            "print(avalanche_si.__file__); print(importlib.util.find_spec('experiments'))")
    env = dict(os.environ, PYTHONPATH=str(target))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    file, spec = done.stdout.split()[-2:]
    assert file.startswith(str(target)) and spec == "None"


def test_a_folder_named_like_the_package_beside_a_script_does_not_hide_it(tmp_path):
    # a script next to a clone called avalanche_si (no __init__.py at its top: a namespace
    # package to Python) still imports the installed package: the src layout keeps the
    # editable install on sys.path as a path, which a regular package wins from
    (tmp_path / "avalanche_si" / "tests").mkdir(parents=True)
    (tmp_path / "script.py").write_text(
        "import avalanche_si\nfrom avalanche_si import SIPlugin, SynapticIntelligence\n"
        "print(avalanche_si.__file__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as a user runs it
    done = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).parent == ROOT / "src" / "avalanche_si"
