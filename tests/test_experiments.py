"""The experiments command line: a smoke run on split-digits, its files, plots, wandb, errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.cli import main
from experiments.report import mean_sem
from experiments.run import forgetting

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--iterations", "20", "--hidden", "32", "--seeds", "0", "1"]


@pytest.fixture(scope="module")
def digits_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    code = main(["run", "--method", "naive", "si", "avalanche-si", "--out", str(out), *FAST])
    assert code == 0
    return out


def test_smoke_run_writes_every_result(digits_results, capsys):
    files = sorted(digits_results.rglob("seed*.json"))
    assert len(files) == 3 * 3 * 2  # scenarios x methods x seeds
    r = json.loads((digits_results / "split-digits/domain/si/seed1.json").read_text())
    assert r["config"]["si_lambda"] == 10.0 and r["config"]["iterations"] == 20
    acc = r["accuracy_matrix"]
    assert len(acc) == 5 and all(len(row) == 5 for row in acc)
    assert all(0.0 <= a <= 1.0 for row in acc for a in row)
    assert r["final_average_accuracy"] == pytest.approx(sum(acc[-1]) / 5)
    assert r["average_forgetting"] == pytest.approx(forgetting(acc))
    assert len(r["omega"]) == 5 and "body.0.weight" in r["omega"][0]
    assert r["seconds"] > 0 and "experiments" in r["command"]
    # this run's CPU time, not the process's since start: at most all cores for its wall time
    assert 0 < r["cpu_seconds"] <= r["seconds"] * os.cpu_count() + 0.1
    assert r["threads"] == torch.get_num_threads()
    if (ROOT / ".git").exists():  # the commit that ran, "+" when the code had changes
        assert r["commit"] and all(c in "0123456789abcdef" for c in r["commit"].rstrip("+"))
    task = json.loads((digits_results / "split-digits/task/naive/seed0.json").read_text())
    assert task["accuracy_matrix"][0][1:] == [None] * 4  # no head for future tasks in Task-IL


def test_report_tables_and_plots(digits_results):
    md = (digits_results / "summary.md").read_text()
    assert md.count("| split-digits |") == 9
    assert "| split-digits | task | si | 10 | 2 |" in md
    rows = (digits_results / "summary.csv").read_text().splitlines()
    assert len(rows) == 10
    paired_md = (digits_results / "paired.md").read_text()
    assert paired_md.count("| split-digits |") == 6  # (si, avalanche-si) - naive, 3 scenarios
    plots = sorted((digits_results / "plots").glob("*.png"))
    names = {p.name for p in plots}
    assert {"split-digits_task_average_accuracy.png", "split-digits_class_accuracy_matrix.png",
            "split-digits_domain_si_omega.png"} <= names
    for p in plots:
        head = p.read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_rerun_skips_finished_runs_and_report_rebuilds(digits_results, capsys):
    before = {p: p.stat().st_mtime_ns for p in digits_results.rglob("seed*.json")}
    assert main(["run", "--method", "naive", "--scenario", "task", "--out", str(digits_results),
                 "--no-report", *FAST]) == 0
    assert "(2 already in" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in digits_results.rglob("seed*.json")} == before
    (digits_results / "summary.md").unlink()
    assert main(["report", "--out", str(digits_results)]) == 0
    assert (digits_results / "summary.md").exists()


def test_dry_run_lists_done_and_missing_runs_and_trains_nothing(digits_results, capsys):
    before = {p: p.stat().st_mtime_ns for p in digits_results.rglob("seed*.json")}
    argv = ["run", "--method", "naive", "joint", "--scenario", "task", "--out",
            str(digits_results), "--dry-run", "--iterations", "20", "--hidden", "32",
            "--seeds", "1", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "4 runs (1 already in" in out
    lines = [line.split("  ")[1:3] for line in out.splitlines()[1:]]
    assert lines == [["done", "split-digits/task/naive/seed1"],
                     ["to run", "split-digits/task/naive/seed2"],
                     ["to run", "split-digits/task/joint/seed1"],
                     ["to run", "split-digits/task/joint/seed2"]]
    assert {p: p.stat().st_mtime_ns for p in digits_results.rglob("seed*.json")} == before
    assert main(argv + ["--force"]) == 0  # --force reruns everything, and says so
    assert "done" not in capsys.readouterr().out.split("results go to")[1]


def test_report_refreshes_the_readme_copies_it_names(digits_results, tmp_path, capsys):
    from experiments.report import readme_copies

    out = tmp_path / "res"
    shutil.copytree(digits_results, out)
    readme = tmp_path / "README.md"
    readme.write_text("Intro.\n\n<!-- copy of res/summary.md -->\n| stale | table |\n"
                      "<!-- end of copy -->\n\nMiddle.\n<!-- copy of res/paired.md -->\n"
                      "<!-- end of copy -->\nEnd.\n")
    assert main(["report", "--out", str(out), "--readme", str(readme)]) == 0
    assert "refreshed res/paired.md, res/summary.md" in capsys.readouterr().out
    text = readme.read_text()
    assert text.startswith("Intro.\n\n<!-- copy of res/summary.md -->\n| benchmark |")
    assert "| stale |" not in text and text.endswith("<!-- end of copy -->\nEnd.\n")
    assert [body == current for _, body, current in readme_copies(readme)] == [True, True]
    assert main(["report", "--out", str(out), "--readme", str(readme)]) == 0
    assert "its copied tables were current" in capsys.readouterr().out
    assert readme.read_text() == text

    readme.write_text(text + "<!-- copy of res/gone.md -->\n<!-- end of copy -->\n")
    assert main(["report", "--out", str(out), "--readme", str(readme)]) == 2
    assert "copies res/gone.md, which does not exist" in capsys.readouterr().err
    assert main(["report", "--out", str(out), "--readme", str(tmp_path / "nope.md")]) == 2
    assert "no such file" in capsys.readouterr().err


def _result(method, seed, acc):
    """A minimal run result for the paired-difference tests; ``method`` is the run-id part
    (e.g. si-clamp_none), the config's method the --method it was run with (si)."""
    from experiments.options import METHODS

    ran = max((m for m in METHODS if method == m or method.startswith(m + "-")), key=len)
    return {"run_id": f"b/domain/{method}/seed{seed}", "final_average_accuracy": acc,
            "config": {"benchmark": "b", "scenario": "domain", "seed": seed, "preset": None,
                       "method": ran}}


def test_paired_differences_use_only_shared_seeds():
    from experiments.report import paired

    results = [_result("naive", 0, 0.60), _result("naive", 1, 0.70), _result("naive", 2, 0.90),
               _result("si", 0, 0.65), _result("si", 1, 0.80),  # seeds 0, 1 shared
               _result("si-clamp_none", 1, 0.78), _result("si-clamp_none", 3, 0.5),  # seed 1
               _result("avalanche-si", 0, 0.60), _result("avalanche-si-fixed", 0, 0.61)]
    rows = {(x["method"], x["reference"]): x for x in paired(results)}
    assert set(rows) == {("si", "naive"), ("si-clamp_none", "naive"), ("si-clamp_none", "si"),
                         ("avalanche-si", "naive"),  # on a CPU it is Naive: against SI, no news
                         ("avalanche-si-fixed", "naive"), ("avalanche-si-fixed", "si")}
    assert rows["avalanche-si-fixed", "si"]["difference"] == pytest.approx(-4.0)
    assert rows["si", "naive"]["seeds"] == 2
    assert rows["si", "naive"]["difference"] == pytest.approx(7.5)       # (5 + 10) / 2
    assert rows["si", "naive"]["difference_sem"] == pytest.approx(2.5)   # sd 3.54 / sqrt 2
    assert rows["si-clamp_none", "si"]["difference"] == pytest.approx(-2.0)
    assert rows["si-clamp_none", "naive"]["seeds"] == 1


def test_paired_runs_on_other_tasks_compare_with_the_same_tasks():
    """A -vdv_order run (other class splits for the same seed numbers) is paired with the
    -vdv_order Naive and SI runs, never with the seeded ones."""
    from experiments.report import paired

    results = [_result("naive", 1, 0.50), _result("si", 1, 0.90),
               _result("naive-vdv_order", 1, 0.60), _result("si-vdv_order", 1, 0.65),
               _result("si-clamp_none-vdv_order", 1, 0.66)]
    rows = {(x["method"], x["reference"]): x["difference"] for x in paired(results)}
    assert rows == pytest.approx({
        ("si", "naive"): 40.0, ("si-vdv_order", "naive-vdv_order"): 5.0,
        ("si-clamp_none-vdv_order", "naive-vdv_order"): 6.0,
        ("si-clamp_none-vdv_order", "si-vdv_order"): 1.0})


def test_paired_init_variant_compares_with_the_default_init():
    """An -init_glorot run is paired with Naive from the same initialisation (never the
    default one), and with the same method from the default initialisation."""
    from experiments.report import paired

    results = [_result("si-task-clamp_total", 0, 0.9615),
               _result("si-task-clamp_total", 1, 0.964),
               _result("si-task-clamp_total-init_glorot", 0, 0.9695),
               _result("naive", 0, 0.5), _result("naive-init_glorot", 0, 0.55)]
    rows = {(x["method"], x["reference"]): x["difference"] for x in paired(results)}
    assert rows == pytest.approx({
        ("si-task-clamp_total", "naive"): 46.15,
        ("si-task-clamp_total-init_glorot", "naive-init_glorot"): 41.95,
        ("si-task-clamp_total-init_glorot", "si-task-clamp_total"): 0.8,
        ("naive-init_glorot", "naive"): 5.0})


def test_tables_list_each_variant_after_its_method():
    """Rows follow METHOD_ORDER by the method that was run; a variant (another init, clamp,
    head...) comes right after its method, not alphabetically among the others: in the
    summary, and in the paired table after its references to Naive come first."""
    from experiments.report import paired, summarize

    results = []
    for method, variant in [("avalanche-si", "avalanche-si-init_glorot"),
                            ("naive", "naive-init_glorot"), ("si", "si-task-clamp_total"),
                            ("naive", "naive"), ("si", "si")]:
        r = _result(variant, 0, 0.5)
        assert r["config"]["method"] == method
        r["config"].update(si_lambda=0.1, si_eps=0.1)
        r.update(average_forgetting=0.4, seconds=60.0)
        results.append(r)
    assert [r["method"] for r in summarize(results)] == [
        "naive", "naive-init_glorot", "si", "si-task-clamp_total", "avalanche-si-init_glorot"]
    assert [(r["method"], r["reference"]) for r in paired(results)] == [
        ("naive-init_glorot", "naive"), ("si", "naive"), ("si-task-clamp_total", "naive"),
        ("avalanche-si-init_glorot", "naive-init_glorot"), ("si-task-clamp_total", "si")]


def test_run_id_protocol_suffixes_are_what_report_reads():
    """run_id writes a suffix for every non-default --init and --loss, and report's pattern
    finds exactly those (so paired() cannot silently mix two protocols)."""
    from experiments.options import INITS, LOSSES, PROTOCOL_SUFFIX
    from experiments.config import RunConfig

    assert PROTOCOL_SUFFIX.findall(RunConfig(method="si", si_importance="task").run_id()) == []
    for init in INITS:
        for loss in LOSSES:
            for reinit in (False, True):
                run_id = RunConfig(init=init, loss=loss, reinit=reinit,
                                   class_order="vandeven").run_id()
                expected = ([f"-init_{init}"] if init != "torch" else []) + (
                    [f"-loss_{loss}"] if loss != "torch" else []) + (["-reinit"] if reinit else [])
                assert PROTOCOL_SUFFIX.findall(run_id) == expected, run_id


def test_paired_loss_variant_changes_one_thing_at_a_time():
    """A -loss_keras run is paired with Naive (and SI) that have the same loss and init, and
    with the same method minus one protocol change at a time (the loss, or the init)."""
    from experiments.report import paired

    results = [_result("naive-init_glorot", 0, 0.50),
               _result("naive-init_glorot-loss_keras", 0, 0.57),
               _result("si-task-clamp_total-init_glorot", 0, 0.97),
               _result("si-task-clamp_total-init_glorot-loss_keras", 0, 0.96)]
    rows = {(x["method"], x["reference"]): x["difference"] for x in paired(results)}
    assert rows == pytest.approx({
        ("naive-init_glorot-loss_keras", "naive-init_glorot"): 7.0,
        ("si-task-clamp_total-init_glorot", "naive-init_glorot"): 47.0,
        ("si-task-clamp_total-init_glorot-loss_keras", "naive-init_glorot-loss_keras"): 39.0,
        ("si-task-clamp_total-init_glorot-loss_keras", "si-task-clamp_total-init_glorot"): -1.0})


def test_vandeven_class_order_is_their_numpy_permutation():
    """van de Ven's data.py: np.random.seed(seed); p = np.random.permutation(10); digit d gets
    label p[d], task i the labels 2i, 2i+1 (so Domain-IL label p[d] % 2); seed 0: no shuffle."""
    import numpy as np

    from experiments.streams import class_order, split_stream

    assert class_order(10, 0, "vandeven").tolist() == list(range(10))
    for seed in (1, 2, 7):
        np.random.seed(seed)
        p = np.random.permutation(list(range(10)))
        order = class_order(10, seed, "vandeven").tolist()
        assert [p[d] for d in order] == list(range(10))
        stream = split_stream("digits", "domain", root="unused", seed=seed, ordering="vandeven")
        digits = split_stream("digits", "class", root="unused", seed=0, shuffle_classes=False)
        x_all, y_all = torch.cat([t.x_train for t in digits.tasks]), \
            torch.cat([t.y_train for t in digits.tasks])
        for i, task in enumerate(stream.tasks):
            # each training image of task i is a digit d with p[d] in {2i, 2i+1}, labelled p[d] % 2
            match = (task.x_train[:, None, :] == x_all[None, :, :]).all(-1).float().argmax(1)
            d = y_all[match]
            assert sorted({int(p[k]) for k in d}) == [2 * i, 2 * i + 1]
            assert task.y_train.tolist() == [int(p[k]) % 2 for k in d]
    assert class_order(10, 1, "seeded").tolist() != class_order(10, 1, "vandeven").tolist()
    with pytest.raises(ValueError, match="unknown class order 'x'"):
        class_order(10, 1, "x")


def test_class_order_option_names_its_runs_and_applies_to_split_benchmarks(capsys):
    from experiments.cli import _configs, _parser

    args = _parser().parse_args(["run", "--preset", "vandeven-split-mnist", "--scenario",
                                 "domain", "--method", "naive", "si", "--class-order",
                                 "vandeven", "--seeds", "1"])
    assert [c.run_id() for c in _configs(args)] == [
        "split-mnist/domain/naive-vdv_order/seed1", "split-mnist/domain/si-vdv_order/seed1"]
    assert main(["run", "--preset", "vandeven-permuted-mnist", "--class-order", "vandeven"]) == 2
    assert "--class-order applies to split benchmarks only" in capsys.readouterr().err


def test_mean_sem():
    m, s = mean_sem([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1 / 3 ** 0.5)


@pytest.mark.parametrize("argv,message", [
    (["run", "--benchmark", "nope"], "invalid choice: 'nope'"),
    (["run", "--method", "lwf"], "invalid choice: 'lwf'"),
    (["run", "--iterations", "5", "--epochs", "1"], "--iterations or --epochs, not both"),
    (["run", "--si-lambda", "-1"], "--si-lambda must be >= 0"),
    (["run", "--eps", "0"], "--eps must be > 0"),
    (["run", "--method", "naive", "--si-importance", "task"], "applies to --method si only"),
    (["run", "--method", "naive", "--si-clamp", "none"], "--si-clamp applies to --method si only"),
    (["run", "--preset", "vandeven-split-mnist", "--benchmark", "split-digits"], "contradicts"),
    (["run", "--scenario", "domain", "--task-head", "shared"], "applies to --scenario task only"),
    (["run", "--device", "cuda"], "CUDA is not available"),
    (["run", "--method", "naive", "--si-lambda", "1"], "--si-lambda applies to the SI methods"),
    (["run", "--method", "naive", "ewc", "--eps", "0.1"], "--eps applies to the SI methods"),
    (["run", "--method", "si", "--ewc-lambda", "1"], "--ewc-lambda applies to --method ewc only"),
    (["run", "--hidden", "100", "0"], "--hidden sizes must be positive integers, got 100 0"),
    (["run", "--n-tasks", "7"], "split-digits has 10 classes, which --n-tasks 7 cannot split"),
    (["run", "--benchmark", "split-cifar100", "--n-tasks", "3"], "a divisor of 100"),
    (["run", "--reinit"], "avalanche-si (Avalanche's SI plugin) would count the jump"),
    (["run", "--preset", "vandeven-taskfree-split-mnist", "--reinit"], "not to online or"),
    # a mistyped --out: the folder looked in, in full, and the folders that have results
    (["report", "--out", "no/such/folder"], "no/such/folder; run `python -m experiments run "
                                            "--out no/such/folder` first; folders with results: "
                                            "results/"),
])
def test_bad_input_gets_a_one_line_error(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors, in one line without the usage block
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_cheap_checks_come_before_torch_loads():
    # a wrong value is refused in a fraction of a second, not after 10-30 s of imports
    code = ("import sys; from experiments.cli import main; "
            "codes = [main(a) for a in (['--si-lambda', '-1'], ['--eps', '0'], "
            "['--hidden', '8', '0'], ['--preset', 'vandeven-taskfree-split-mnist', "
            "'--reinit'], ['--iterations', '5', '--epochs', '1'], ['--si-lambda', 'nan'], "
            "['--lr', 'inf'], ['--device', 'gpu0'], ['--preset', "
            "'vandeven-taskfree-split-mnist', '--plateau', 'nan', '1', '1'], "
            "['--out', '/dev/null/results'])]; "
            "print(codes, sorted(m for m in ('torch', 'avalanche', 'experiments.run') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[2, 2, 2, 2, 2, 2, 2, 2, 2, 2] []", out.stdout + out.stderr
    assert len(out.stderr.strip().splitlines()) == 10, out.stderr


def test_an_unknown_option_points_to_its_commands_help(capsys):
    for command in ("run", "report"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--bogus"])
        assert exc.value.code == 2
        assert capsys.readouterr().err.strip() == (
            f"error: unrecognized arguments: --bogus; see `python -m experiments {command} "
            "--help`")


@pytest.mark.parametrize("after", [[0.2], [0.5], [1.0], [1.5], [2.5], [4.0], [4.0, 0.005],
                                   [4.0, 0.05, 0.05]])
def test_ctrl_c_at_any_moment_ends_with_one_line(after, tmp_path):
    # while Python imports torch and Avalanche, while the stream loads, while a run trains,
    # and pressed twice or three times: one line on stderr, no traceback, and no empty
    # results folder left behind
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "experiments", "run", "--out",
                             str(tmp_path / "out"), "--no-report"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for pause in after:
        time.sleep(pause)
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode in (130, -signal.SIGINT), err  # killed by it during shutdown
    assert len(err.strip().splitlines()) == 1 and err.strip().startswith("interrupted"), err
    assert not (tmp_path / "out").exists() or any((tmp_path / "out").rglob("seed*.json"))


def test_missing_dataset_names_the_folder(tmp_path, capsys):
    code = main(["run", "--benchmark", "split-fmnist", "--data-root", str(tmp_path / "none"),
                 "--seeds", "0", "--method", "si", "--scenario", "task",
                 "--out", str(tmp_path / "out" / "fmnist")])
    out, err = capsys.readouterr()
    err = err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert str(tmp_path / "none" / "FashionMNIST") in err and "--data-root" in err
    assert not (tmp_path / "none").exists()  # the failed download left no empty folders
    assert not (tmp_path / "out").exists()  # nor the results folders made for it
    assert out.startswith("1 run (0 already in")


def test_unwritable_out_is_refused_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = main(["run", "--out", str(blocker / "results"), *FAST])
    err = capsys.readouterr()
    assert code == 2 and "cannot write there" in err.err and "[1/" not in err.out


def test_a_finished_run_survives_an_unwritable_results_folder(tmp_path, capsys, monkeypatch):
    import experiments.config as config_module

    real = config_module.save_result
    out = tmp_path / "res"

    def failing(folder, result):
        if Path(folder) == out:
            raise PermissionError(13, "Permission denied")
        return real(folder, result)

    monkeypatch.setattr(config_module, "save_result", failing)
    code = main(["run", "--out", str(out), "--method", "naive", "--scenario", "task",
                 "--seeds", "0", "--iterations", "5", "--hidden", "8", "--no-report"])
    err = capsys.readouterr().err
    assert code == 0 and "could not write to" in err
    saved = Path(err.split("result is in ")[1].split(":")[0])
    assert json.loads(saved.read_text())["run_id"] == "split-digits/task/naive/seed0"


def test_cli_wandb_offline_writes_runs(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(tmp_path))
    env.pop("WANDB_SILENT", None)  # as a user runs it: wandb's own messages off by default
    out = tmp_path / "res"
    proc = subprocess.run([sys.executable, "-m", "experiments", "run", "--scenario", "task",
                           "--method", "si", "--seeds", "0", "--iterations", "10", "--hidden", "16",
                           "--wandb", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("wandb:")]
    assert said == [f"wandb: runs are written under {out}/wandb/ (offline: upload them later "
                    "with `wandb sync`)"], said
    assert "task 5/5: mean accuracy" in proc.stdout  # the progress lines
    runs = sorted(Path(out, "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # the run and the report
    sys.path.insert(0, str(Path(__file__).parent))
    from wandb_records import read_run

    run = read_run(runs[0])
    keys = set().union(*run["history"])
    assert run["config"]["method"] == "si" and {"accuracy/task5", "si/all/omega_mean"} <= keys
    assert 0 < run["summary"]["final_average_accuracy"] <= 1
    assert not [k for k in keys if k.startswith("Loss_MB")]  # train/loss every log_every only
    report = read_run(runs[1])
    assert "results/summary" in set().union(*report["history"])
    # the report run trained nothing: no train/iteration step of 0 in it
    assert not any("train/iteration" in row for row in report["history"])
    # its summary table holds numbers, a "mean ± SEM" column as two numeric columns
    table = next(row["results/summary"] for row in report["history"] if "results/summary" in row)
    data = json.loads((runs[1] / "files" / table["path"]).read_text())
    acc = data["columns"].index("accuracy % (mean ± SEM)")
    assert data["columns"][acc + 1] == "accuracy % (mean ± SEM) SEM"
    assert all(isinstance(r[acc], float) for r in data["data"])
    assert all(isinstance(r[data["columns"].index("seeds")], float) for r in data["data"])


def test_cli_lists_mirror_the_experiments():
    """Task heads and inits come from experiments.options for the CLI and the models."""
    from experiments import cli
    from experiments import models

    assert cli.TASK_HEADS == models.TASK_HEADS
    assert cli.INITS == models.INITS
    assert set(cli.SPLIT_CLASSES) == {b for b in cli.BENCHMARKS if b.startswith("split-")}


def test_report_and_help_load_neither_torch_nor_avalanche():
    # `report` and `--help` only read JSON and draw: they start in a second, not after
    # importing Avalanche (about 10 s on a loaded machine).
    code = ("import sys; from experiments import cli, report; "
            "print(sorted(m for m in ('torch', 'avalanche', 'experiments.run', 'experiments.streams')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_si_variants_get_their_own_results(tmp_path):
    """--si-importance x --si-clamp: one results folder per variant, the option reaches SIPlugin."""
    from experiments.config import RunConfig
    from experiments.run import method_plugins

    out = tmp_path / "out"
    code = main(["run", "--scenario", "domain", "--method", "si", "--si-clamp", "task", "none",
                 "--si-importance", "total", "task", "--seeds", "0", "--iterations", "10",
                 "--hidden", "16", "--out", str(out), "--no-report"])
    assert code == 0
    got = sorted(p.parent.name for p in out.rglob("seed0.json"))
    assert got == ["si", "si-clamp_none", "si-task", "si-task-clamp_none"]
    r = json.loads((out / "split-digits/domain/si-task-clamp_none/seed0.json").read_text())
    assert r["config"]["si_clamp"] == "none" and r["config"]["si_importance"] == "task"
    (plugin,) = method_plugins(RunConfig(si_clamp="total"))
    assert plugin.clamp == "total"


def test_shared_task_head_selects_each_tasks_units_and_trains_only_those():
    """van de Ven's Task-IL: one layer, a sample of task t sees units t*k..t*k+k-1; the loss
    gives the other units a zero (not a missing) gradient, so Adam still steps them."""
    import torch
    from experiments.models import SharedTaskHeadNet, build_model

    torch.manual_seed(0)
    net = SharedTaskHeadNet(6, [5], classes_per_task=2, n_tasks=3)
    x, t = torch.randn(4, 6), torch.tensor([0, 2, 1, 2])
    full = net.head(net.body(x))
    out = net(x, t)
    for i in range(4):
        assert torch.equal(out[i], full[i, 2 * t[i]:2 * t[i] + 2])
    assert torch.equal(net(x[:2], 1), full[:2, 2:4]) and torch.equal(net.forward_single_task(x, 2), full[:, 4:])
    torch.nn.functional.cross_entropy(net(x, torch.zeros(4, dtype=torch.long)), torch.ones(4, dtype=torch.long)).backward()
    g = net.head.weight.grad
    assert g is not None and g[:2].abs().sum() > 0 and torch.count_nonzero(g[2:]) == 0
    with pytest.raises(ValueError, match="built for 3 tasks"):
        net(x, 3)
    assert isinstance(build_model("task", 6, [5], 2, 2, task_head="shared", n_tasks=3), SharedTaskHeadNet)
    assert not isinstance(build_model("domain", 6, [5], 2, 2, task_head="shared", n_tasks=3),
                          SharedTaskHeadNet)
    with pytest.raises(ValueError, match="choose one of separate, shared"):
        build_model("task", 6, [5], 2, 2, task_head="masked")


def test_shared_task_head_run_gets_its_own_results(tmp_path):
    """--task-head shared: results in <method>-shared_head/, compared with the separate heads."""
    out = tmp_path / "out"
    code = main(["run", "--scenario", "task", "domain", "--method", "naive", "si", "--task-head",
                 "shared", "--seeds", "0", "--iterations", "30", "--hidden", "16", "--out", str(out)])
    assert code == 0
    got = sorted(str(p.relative_to(out).parent) for p in out.rglob("seed0.json"))
    assert got == ["split-digits/domain/naive", "split-digits/domain/si",
                   "split-digits/task/naive-shared_head", "split-digits/task/si-shared_head"]
    r = json.loads((out / "split-digits/task/si-shared_head/seed0.json").read_text())
    assert r["config"]["task_head"] == "shared" and r["final_average_accuracy"] > 0.6
    d = json.loads((out / "split-digits/domain/si/seed0.json").read_text())
    assert d["config"]["task_head"] == "separate"


def test_zenke_preset_runs_the_si_variant_of_zenkes_code():
    """zenke-permuted-mnist: ω from the task gradient, Ω clamped as a running total (their
    PATH_INT_PROTOCOL), their network's Glorot initialisation; the command line still
    overrides each, and other presets keep the package defaults."""
    from experiments.cli import _configs, _parser

    def variants(*argv):
        args = _parser().parse_args(["run", "--scenario", "domain", "--seeds", "0", *argv])
        return [(c.method, c.si_importance, c.si_clamp, c.init, c.run_id())
                for c in _configs(args)]

    assert variants("--preset", "zenke-permuted-mnist", "--method", "si", "naive") == [
        ("si", "task", "total", "glorot",
         "permuted-mnist/domain/si-task-clamp_total-init_glorot/seed0"),
        ("naive", "total", "task", "glorot", "permuted-mnist/domain/naive-init_glorot/seed0")]
    assert variants("--preset", "zenke-permuted-mnist", "--method", "si",
                    "--si-clamp", "task", "--init", "torch") == [
        ("si", "task", "task", "torch", "permuted-mnist/domain/si-task/seed0")]
    assert variants("--preset", "vandeven-permuted-mnist", "--method", "si") == [
        ("si", "total", "task", "torch", "permuted-mnist/domain/si/seed0")]


def test_benzing_preset_runs_the_si_of_his_code_with_adam_reset_per_task(monkeypatch):
    """benzing-permuted-mnist: his network, ω from the task gradient clamped per task, biases
    0.1, c = 0.2, and Adam's moments started afresh at every task (Avalanche keeps them)."""
    import experiments.run as run_module
    from experiments.cli import _configs, _parser
    from experiments.config import RunConfig
    from experiments.run import run

    args = _parser().parse_args(["run", "--preset", "benzing-permuted-mnist", "--scenario",
                                 "domain", "--method", "si", "--seeds", "10"])
    (cfg,) = _configs(args)
    assert (cfg.hidden, cfg.batch_size, cfg.epochs, cfg.iterations, cfg.n_tasks, cfg.pad) == (
        (2000, 2000), 256, 20, None, 10, 0)
    assert (cfg.si_importance, cfg.si_clamp, cfg.si_eps, cfg.si_lambda, cfg.init,
            cfg.reset_optimizer, cfg.reinit) == ("task", "task", 0.1, 0.2, "benzing", True, True)
    assert cfg.run_id() == "permuted-mnist/domain/si-task-init_benzing-reinit/seed10"
    (plain,) = _configs(_parser().parse_args(["run", "--preset", "benzing-permuted-mnist",
                                              "--scenario", "domain", "--method", "si",
                                              "--seeds", "10", "--no-reinit"]))
    assert not plain.reinit
    assert plain.run_id() == "permuted-mnist/domain/si-task-init_benzing/seed10"

    fresh = []  # per optimizer step: did Adam start with no moments?

    class Recording(torch.optim.Adam):
        def step(self, closure=None):
            fresh.append(not any(self.state.values()))
            return super().step(closure)

    monkeypatch.setattr(run_module.torch.optim, "Adam", Recording)
    for reset in (True, False):
        fresh.clear()
        run(RunConfig(benchmark="split-digits", scenario="task", method="si", hidden=(16,),
                      iterations=4, n_tasks=5, reset_optimizer=reset), log=lambda m: None)
        assert len(fresh) == 20 and sum(fresh) == (5 if reset else 1)
        assert all(fresh[k] == (k % 4 == 0) for k in range(20)) if reset else fresh[0]


def test_reinit_starts_each_later_task_from_fresh_weights_and_restarts_sis_path(monkeypatch):
    from avalanche_si import SynapticIntelligence
    from experiments.config import RunConfig
    from experiments.run import run

    seen = []  # at each restart_path(): the first layer's biases, steps since consolidating
    original = SynapticIntelligence.restart_path

    def recording(self):
        seen.append((self.model.body[0].bias.detach().clone(), self._steps_since))
        original(self)

    monkeypatch.setattr(SynapticIntelligence, "restart_path", recording)
    for method in ("si", "naive"):
        seen.clear()
        result = run(RunConfig(benchmark="split-digits", scenario="domain", method=method,
                               hidden=(16,), iterations=3, n_tasks=5, init="benzing",
                               reinit=True), log=lambda m: None)
        assert len(result["accuracy_matrix"]) == 5
        assert len(seen) == (4 if method == "si" else 0)
        for bias, steps in seen:  # Benzing's start, before the task's first step
            assert torch.equal(bias, torch.full_like(bias, 0.1)) and steps == 0


@pytest.mark.parametrize("scenario,task_head", [("task", "separate"), ("task", "shared"),
                                                ("domain", "separate"), ("class", "separate")])
def test_glorot_init_covers_every_linear_layer_and_heads_added_later(scenario, task_head):
    """--init glorot (Keras's Dense default): weights uniform in ±sqrt(6/(fan_in+fan_out)),
    biases 0, in every linear layer, including a Task-IL head Avalanche creates for a new task;
    --init torch leaves PyTorch's default (the same weights as before the option existed)."""
    import math

    from avalanche.models.utils import avalanche_model_adaptation
    from experiments.models import build_model
    from experiments.streams import make_stream

    stream = make_stream("split-digits", scenario, root="unused", seed=0)
    torch.manual_seed(0)
    net = build_model(scenario, stream.input_dim, [300, 200], stream.classes_per_task,
                      stream.n_outputs, task_head=task_head, n_tasks=stream.n_tasks, init="glorot")
    for exp in stream.benchmark.train_stream[:3]:
        avalanche_model_adaptation(net, exp)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == (5 if (scenario, task_head) == ("task", "separate") else 3)
    for m in linears:
        fan_out, fan_in = m.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        w = m.weight.detach()
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound  # spans the Glorot range
        assert torch.count_nonzero(m.bias) == 0
    torch.manual_seed(0)  # --init benzing: the same weights, biases 0.1 (Benzing's code)
    benzing = build_model(scenario, stream.input_dim, [300, 200], stream.classes_per_task,
                          stream.n_outputs, task_head=task_head, n_tasks=stream.n_tasks,
                          init="benzing")
    for exp in stream.benchmark.train_stream[:3]:
        avalanche_model_adaptation(benzing, exp)
    for m, b in zip(linears, [m for m in benzing.modules() if isinstance(m, torch.nn.Linear)]):
        assert torch.equal(m.weight, b.weight) and bool((b.bias == 0.1).all())
    torch.manual_seed(0)
    default = build_model(scenario, stream.input_dim, [300, 200], stream.classes_per_task,
                          stream.n_outputs, task_head=task_head, n_tasks=stream.n_tasks)
    torch.manual_seed(0)
    explicit = build_model(scenario, stream.input_dim, [300, 200], stream.classes_per_task,
                           stream.n_outputs, task_head=task_head, n_tasks=stream.n_tasks,
                           init="torch")
    first = next(m for m in default.modules() if isinstance(m, torch.nn.Linear))
    assert first.weight.abs().max() <= 1 / math.sqrt(first.in_features)
    assert first.bias.abs().max() > 0
    for a, b in zip(default.state_dict().values(), explicit.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="choose one of torch, glorot"):
        build_model(scenario, 4, [3], 2, 2, init="he")



def test_keras_loss_is_cross_entropy_with_keras_clip():
    """--loss keras: PyTorch's cross-entropy while ε ≤ p_y ≤ 1 − ε (checked in float64 against
    a plain formula), and exactly zero gradient for an example whose p_y is clipped (float32,
    as training runs): that example drops out, the others keep their gradient."""
    from experiments.models import KerasCrossEntropy, make_criterion

    g = torch.Generator().manual_seed(0)
    z = torch.randn(32, 10, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (32,), generator=g)
    plain = -torch.stack([z[i, y[i]] - torch.logsumexp(z[i], 0) for i in range(32)]).mean()
    assert float(KerasCrossEntropy()(z, y)) == pytest.approx(float(plain), rel=1e-12)
    assert isinstance(make_criterion("torch"), torch.nn.CrossEntropyLoss)
    with pytest.raises(ValueError, match="choose one of torch, keras"):
        make_criterion("mse")

    z = torch.tensor([[20.0, 0, 0], [0, 2, 0], [-20.0, 0, 0]], requires_grad=True)
    y = torch.tensor([0, 0, 0])
    make_criterion("keras")(z, y).backward()
    assert torch.count_nonzero(z.grad[0]) == 0 and torch.count_nonzero(z.grad[2]) == 0
    z_t = z.detach().clone().requires_grad_()
    torch.nn.functional.cross_entropy(z_t, y).backward()
    assert torch.allclose(z.grad[1], z_t.grad[1])  # an unclipped example: the same gradient
    assert torch.count_nonzero(z_t.grad[0]) > 0     # PyTorch's loss: never exactly zero


def test_loss_option_names_its_runs(tmp_path, monkeypatch):
    """--loss keras trains with KerasCrossEntropy, into its own folder <method>-loss_keras/."""
    from experiments.models import KerasCrossEntropy

    calls = []
    forward = KerasCrossEntropy.forward
    monkeypatch.setattr(KerasCrossEntropy, "forward",
                        lambda self, z, y: calls.append(len(y)) or forward(self, z, y))
    out = tmp_path / "out"
    assert main(["run", "--scenario", "domain", "--method", "naive", "--loss", "keras",
                 "--seeds", "0", "--iterations", "20", "--hidden", "16", "--out", str(out),
                 "--no-report"]) == 0
    r = json.loads((out / "split-digits/domain/naive-loss_keras/seed0.json").read_text())
    assert r["config"]["loss"] == "keras"
    assert len(calls) == 5 * 20  # every training step of the 5 tasks

def test_init_option_names_its_runs(tmp_path, capsys):
    """--init glorot: its own results folder (<method>-init_glorot/), the option in the config."""
    out = tmp_path / "out"
    code = main(["run", "--scenario", "task", "--method", "naive", "si", "--init", "glorot",
                 "--seeds", "0", "--iterations", "20", "--hidden", "16", "--out", str(out),
                 "--no-report"])
    assert code == 0
    got = sorted(p.parent.name for p in out.rglob("seed0.json"))
    assert got == ["naive-init_glorot", "si-init_glorot"]
    r = json.loads((out / "split-digits/task/si-init_glorot/seed0.json").read_text())
    assert r["config"]["init"] == "glorot"
    with pytest.raises(SystemExit):
        main(["run", "--init", "he"])
    assert "invalid choice: 'he'" in capsys.readouterr().err


def test_online_presets_run_every_policy_and_record_the_stream(tmp_path, capsys):
    # a tiny fuzzy-boundary stream: 5 contexts x 40 iterations, transitions over 2 x 10
    out = tmp_path / "tf"
    code = main(["run", "--preset", "vandeven-taskfree-split-mnist", "--benchmark", "split-digits",
                 "--scenario", "domain", "task", "--seeds", "0", "--iterations", "40",
                 "--fuzziness", "10", "--hidden", "16", "--consolidate-every", "15",
                 "--plateau", "5", "0.5", "0.05", "--eval-every", "20", "--out", str(out)])
    assert code == 0
    for scenario in ("domain", "task"):
        runs = {m: json.loads((out / f"split-digits/{scenario}/{m}/seed0.json").read_text())
                for m in ("naive", "si-experience", "si-k", "si-plateau", "si-boundary")}
        assert runs["naive"]["consolidations"] == 0
        assert runs["si-experience"]["consolidations"] == 200  # one mini-batch an experience
        assert runs["si-k"]["consolidation_steps"] == list(range(15, 201, 15))
        # the boundary reference consolidates where the most likely context changes
        assert runs["si-boundary"]["consolidation_steps"] == runs["si-boundary"]["boundaries"]
        assert runs["si-boundary"]["boundaries"] == [20, 60, 100, 140, 180, 200]
        for r in runs.values():
            assert len(r["accuracy_matrix"]) == 6 and r["iterations"] == 200
            assert [it for it, _ in r["stream_accuracy"]][:2] == [20, 40]
        # consolidating after every one-step experience leaves the penalty's gradient 0:
        # exactly Naive
        assert runs["si-experience"]["accuracy_matrix"] == runs["naive"]["accuracy_matrix"]
    assert (out / "plots" / "split-digits_domain_average_accuracy.png").exists()


def test_avalanche_online_preset_hides_boundaries_but_for_the_reference(tmp_path):
    out = tmp_path / "on"
    code = main(["run", "--preset", "avalanche-online-split-mnist", "--benchmark", "split-digits",
                 "--scenario", "domain", "--seeds", "0", "--hidden", "16", "--method", "si-k",
                 "si-boundary", "--consolidate-every", "25", "--out", str(out), "--no-report"])
    assert code == 0
    k = json.loads((out / "split-digits/domain/si-k/seed0.json").read_text())
    b = json.loads((out / "split-digits/domain/si-boundary/seed0.json").read_text())
    assert k["consolidation_steps"] == list(range(25, k["iterations"] + 1, 25))
    # a task ends where its mini-experiences do; the last one only if marked as last
    assert set(b["consolidation_steps"]) <= set(b["boundaries"])
    assert len(b["consolidation_steps"]) >= 4


@pytest.mark.parametrize("argv,message", [
    (["run", "--preset", "vandeven-taskfree-split-mnist", "--method", "si"], "the online preset"),
    (["run", "--method", "si-k"], "online methods run on online presets only"),
    (["run", "--consolidate-every", "5"], "--consolidate-every applies to online presets only"),
    (["run", "--preset", "vandeven-taskfree-split-mnist", "--iterations", "100"],
     "--fuzziness 500 is more than half of --iterations 100"),
    (["run", "--preset", "vandeven-taskfree-split-mnist", "--plateau", "0", "1", "1"], "--plateau"),
])
def test_online_options_are_checked(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_sweep_yaml_expands_to_command_lines_the_cli_accepts(capsys):
    # what `wandb agent` does with experiments/sweep.yaml: for each point of the grid, the
    # command list with ${env} dropped, ${program} replaced and ${args} as --name=value
    import itertools

    import yaml

    sweep = yaml.safe_load((ROOT / "experiments" / "sweep.yaml").read_text())
    assert sweep["method"] == "grid"
    names = list(sweep["parameters"])
    grid = list(itertools.product(*(sweep["parameters"][n]["values"] for n in names)))
    assert len(grid) == 3 * 9 * 3
    for point in grid:
        argv = []
        for part in sweep["command"]:
            if part == "${env}":
                continue
            if part == "${args}":
                argv += [f"--{n}={v}" for n, v in zip(names, point)]
            else:
                argv.append(part.replace("${program}", sweep["program"]))
        assert argv[:4] == ["python", "-m", "experiments", "run"]
        assert main(argv[3:] + ["--dry-run"]) == 0, argv
        out = capsys.readouterr().out
        scenario, c, seed = (dict(zip(names, point))[k] for k in ("scenario", "si-lambda", "seeds"))
        assert f"split-mnist/{scenario}/si/seed{seed}  c={c:g} xi=0.1" in out, out


def test_ctrl_c_prints_one_line_saying_what_finished_and_how_to_resume(tmp_path, capsys,
                                                                      monkeypatch):
    from experiments import run as run_module

    real, calls = run_module.run, []

    def interrupted_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "run", interrupted_second)
    argv = ["run", "--scenario", "domain", "--method", "naive", "--seeds", "0", "1",
            "--iterations", "5", "--hidden", "8", "--out", str(tmp_path / "out"), "--no-report"]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"interrupted: 1 of 2 runs are saved in {tmp_path / 'out'}/; the same command "
                   "resumes with the others."]
    monkeypatch.setattr(run_module, "run", real)
    assert main(argv) == 0
    assert "2 runs (1 already in" in capsys.readouterr().out


@pytest.mark.parametrize("name, holds", [("cifar10", "cifar-10-batches-py"),
                                         ("cifar100", "cifar-100-python"),
                                         ("mnist", "MNIST/raw")])
def test_a_dataset_that_cannot_be_downloaded_names_what_the_folder_must_hold(
        name, holds, tmp_path, monkeypatch):
    import torchvision

    from experiments.options import DataError
    from experiments.streams import _torchvision_images

    def offline(self, *args, **kwargs):
        raise RuntimeError("no internet")

    for cls in ("MNIST", "CIFAR10", "CIFAR100"):
        monkeypatch.setattr(getattr(torchvision.datasets, cls), "__init__", offline)
    with pytest.raises(DataError, match=f"the folder that holds {holds} .*docs/guide/data.md"):
        _torchvision_images(name, str(tmp_path / "data"), train=True)
    assert not (tmp_path / "data").exists()  # nothing left behind
    assert holds.split("/")[0] in (ROOT / "docs" / "guide" / "data.md").read_text()


def test_the_estimator_studies_summaries_are_what_their_runs_give(tmp_path, monkeypatch):
    # results/estimators/*/summary.md from the committed per-seed JSON files, and
    # results/family/*/summary.md by rerunning its command on a copy (every run is there, so
    # nothing trains)
    import shutil

    from experiments import family
    from experiments.estimators import summary

    folders = sorted((ROOT / "results" / "estimators").iterdir())
    assert folders
    for folder in folders:
        results = sorted((json.loads(p.read_text()) for p in folder.glob("importances-seed*.json")),
                         key=lambda r: r["seed"])
        assert summary(results) == (folder / "summary.md").read_text(), folder.name
    for folder in sorted((ROOT / "results" / "family").iterdir()):
        copy = tmp_path / "results" / "family" / folder.name
        shutil.copytree(folder, copy)
        monkeypatch.chdir(tmp_path)
        argv = json.loads((folder / "family.json").read_text())["argv"]
        monkeypatch.setattr(family, "_runs", _no_training(family._runs))
        assert family.main(argv) == 0
        assert (copy / "summary.md").read_text() == (folder / "summary.md").read_text()


def _no_training(runs):
    def only_saved(out, configs, *rest):
        from experiments.config import result_path

        missing = [c.run_id() for c in configs if not result_path(out, c).exists()]
        assert not missing, f"{out}: no saved run for {missing[:3]}"
        return runs(out, configs, *rest)
    return only_saved


def test_cli_runs_benzings_estimators_on_held_out_data(tmp_path):
    from experiments.cli import main

    out = tmp_path / "res"
    code = main(["run", "--out", str(out), "--method", "si", "--scenario", "task",
                 "--si-importance", "siu", "sos", "--seeds", "0", "--iterations", "5",
                 "--hidden", "8", "--validation", "0.25", "--no-report"])
    assert code == 0
    for method in ("si-siu", "si-sos"):
        r = json.loads((out / "split-digits" / "task" / method / "seed0.json").read_text())
        assert r["config"]["validation"] == 0.25
        assert r["config"]["si_importance"] == method[3:]
    # held out: each task's evaluation set is a quarter of its training data, not the test set
    from experiments.streams import make_stream

    full = make_stream("split-digits", "task", root="", seed=0)
    held = make_stream("split-digits", "task", root="", seed=0, validation=0.25)
    for a, b in zip(full.tasks, held.tasks):
        assert len(b.x_train) + len(b.x_test) == len(a.x_train)
        assert abs(len(b.x_test) - 0.25 * len(a.x_train)) <= 1


def test_profile_step_prints_each_hook_of_each_mode_as_it_goes(monkeypatch):
    # the GPU profile's script, run on the CPU as CI can: every mode's two hooks get a row,
    # and the rows reach stdout while the run goes (a run cut short keeps what it printed)
    from experiments import profile_step

    written, seen_before = [], []

    class Watch:
        def write(self, text):
            written.append(text)
            return len(text)

        def flush(self):
            pass

    def profile(*args, original=profile_step.profile):
        seen_before.append(len("".join(written)))
        return original(*args)

    monkeypatch.setattr(sys, "stdout", Watch())
    monkeypatch.setattr(profile_step, "profile", profile)
    assert profile_step.main(["--steps", "1", "--models", "MLP 784-1000-1000"]) == 0
    out = "".join(written)
    assert "sos" in profile_step.VARIANTS and "total, CUDA graphs" in profile_step.VARIANTS
    for mode in profile_step.VARIANTS:
        for phase in ("SI after_backward", "SI after_update"):
            assert f"| SIPlugin {mode} | {phase} | " in out
    assert "CUDA graphs (warm-up and profiled steps included): total, CUDA graphs: not used " \
        "on this device" in out  # on a CPU: said, not hidden
    # each mode's rows were out before the next mode was profiled
    assert seen_before == sorted(seen_before) and len(set(seen_before[1:])) == len(seen_before) - 1


def test_host_cost_prints_each_tensor_count_and_the_ratio_with_graphs_stood_in(capsys):
    # on a CPU the graph columns replay stand-ins (SI's Python work alone); they must have
    # replayed, every variant gets its cell, and the library's real backend is put back
    from avalanche_si import graphs
    from experiments import host_cost

    backend = graphs.backend_for
    assert host_cost.main(["--chunk", "2", "--repeats", "1", "--width", "3"]) == 0
    assert graphs.backend_for is backend
    out = capsys.readouterr().out
    assert out.startswith("$ python -m experiments.host_cost --chunk 2 --repeats 1 --width 3")
    for n in host_cost.TENSORS:
        row = next(line for line in out.splitlines() if line.startswith(f"| {n} | "))
        assert len(row.split("|")) == len(host_cost.VARIANTS) + 3
    assert "| 64 / 6 | " in out and "total, CUDA graphs (stand-in replay)" in out
    # before the consolidation 3 steps (2 replays per hook), after it 12: the hook before the
    # step has a new key (the penalty on: 11 replays), the one after it does not (12)
    assert "total, CUDA graphs: 27 replays, 3 captures" in out
    with pytest.raises(SystemExit):
        host_cost.main(["--chunk", "0"])
    with pytest.raises(SystemExit, match="a name, not a path"):
        host_cost.main(["--chunk", "1", "--save", "../elsewhere"])


def test_bench_overhead_without_mnist_times_the_graph_variants_and_says_where_they_ran(
        capsys, monkeypatch, tmp_path):
    from experiments import bench_overhead

    monkeypatch.setenv("AVALANCHE_SI_DATA", str(tmp_path / "no-data-here"))
    assert bench_overhead.main(["--quick", "--no-mnist", "--repeats", "1", "--variants",
                                "SIPlugin total, CUDA graphs"]) == 0
    out = capsys.readouterr().out
    assert "| MLP H=400 | 0.48M | 6 | SIPlugin total, CUDA graphs |" in out
    assert "MLP H=400, SIPlugin total, CUDA graphs: not used on this device" in out
    assert "split MNIST" not in out and "online" not in out and "End to end" not in out


def test_sos_with_alpha_runs_have_their_own_id_and_estimator():
    from avalanche_si.estimators import SOS
    from experiments.config import RunConfig
    from experiments.run import method_plugins

    cfg = RunConfig(method="si", si_importance="sos", sos_alpha=1.0)
    assert "/si-sos-alpha1/" in cfg.run_id()
    assert "/si-sos/" in RunConfig(method="si", si_importance="sos").run_id()
    (plugin,) = method_plugins(cfg)
    assert plugin.estimator == SOS(alpha=1.0) and plugin.importance == "sos"


def test_sharded_memory_counts_each_ranks_shard(capsys):
    from experiments.sharded_memory import main

    assert main(["--widths", "6", "8", "2", "--worlds", "1", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| 1 ") or
            line.startswith("| 2 ")]
    assert len(rows) == 2
    one, two = (int(r[2].replace(",", "")) for r in rows)
    assert one == 4 * 4 * (6 * 8 + 8 + 8 * 2 + 2) and two == one // 2


def test_a_wrapped_command_is_the_same_command_in_a_shell():
    # the rerun commands on the pages are broken into lines of at most 88 characters before
    # an option; bash reads them back as the one command
    import shlex

    from experiments.options import wrap_command

    command = ("python -m experiments.family --benchmark permuted-mnist --scenario domain "
               "--batch-sizes 256 2048 --grid 0.1 1 10 100 1000 --sweep-seeds 0 --seeds 10 11 "
               "12 13 14 --hidden 400 400 --epochs 1 --eps 0.1 --scale-lr --methods SI SIU "
               "SIB SOS 'a --b value' --out results/family/permuted-mnist")
    wrapped = wrap_command(command)
    assert len(wrapped.splitlines()) > 1
    assert all(len(line) <= 88 for line in wrapped.splitlines())
    echoed = subprocess.run(["bash", "-c", "printf '%s\\n' " + wrapped.split(" ", 3)[3]],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    assert echoed == shlex.split(command)[3:]
    assert wrap_command("python -m x --a 1") == "python -m x --a 1"


def test_performance_figures_are_drawn_from_each_saved_runs_tables(tmp_path):
    from experiments.perf_plots import figures, number, tables

    assert (number("0.48M"), number("+11.9%"), number("5.69 (5.28-6.42)")) == (480000.0, 11.9,
                                                                              5.69)
    saved = ROOT / "results" / "bench_overhead"
    per_step = tables((saved / "cpu-1thread.txt").read_text())[0]
    assert per_step["header"][:4] == ["model", "n weights", "tensors", "variant"]
    assert len(per_step["rows"]) == 36 and per_step["rows"][0][3] == "no SI"
    drawn = {f.stem: figures(f, tmp_path) for f in sorted(saved.glob("*.txt"))}
    assert [p.name for p in drawn["cpu-1thread"]] == ["cpu-1thread.png"]
    assert [p.name for p in drawn["cpu-1thread-host-cost"]] == ["cpu-1thread-host-cost.png"]
    assert drawn["cpu-sharded-memory"] == []  # no per-step or host-cost table: no figure
    assert all(p.stat().st_size > 10_000 for ps in drawn.values() for p in ps)


def test_a_failed_run_removes_only_the_empty_folders_it_made(tmp_path, monkeypatch, capsys):
    from experiments import streams
    from experiments.options import DataError

    def no_data(*args, **kwargs):
        raise DataError("no data here")

    monkeypatch.setattr(streams, "make_stream", no_data)
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--method", "naive", "--scenario", "task", "--seeds", "0", "--out"]
    (tmp_path / "mine").mkdir()  # the user's empty folder, named as --out: kept
    (tmp_path / "kept").mkdir()
    for out in ("mine", "kept/new/deeper", "made/../kept/also"):
        assert main(argv + [out]) == 2
    capsys.readouterr()
    assert (tmp_path / "mine").is_dir() and (tmp_path / "kept").is_dir()
    assert not (tmp_path / "kept" / "new").exists()  # made by the run, empty: removed
    # through "..", nothing is removed (the folders on the path are not those on the disk)
    assert (tmp_path / "kept" / "also").is_dir()


def test_interrupts_with_force_and_while_reporting_say_what_is_saved(tmp_path, capsys,
                                                                     monkeypatch):
    from experiments import report as report_module
    from experiments import run as run_module

    argv = ["run", "--scenario", "domain", "--method", "naive", "--seeds", "0", "1",
            "--iterations", "5", "--hidden", "8", "--out", str(tmp_path / "out")]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "write_report", interrupted)
    assert main(argv) == 130
    assert capsys.readouterr().err.strip() == (
        f"interrupted while writing the report; every run is saved in {tmp_path / 'out'}/, and "
        f"`python -m experiments report --out {tmp_path / 'out'}` writes it.")
    monkeypatch.setattr(run_module, "run", interrupted)  # --force: both exist, none rerun
    assert main(argv + ["--force"]) == 130
    assert capsys.readouterr().err.strip() == (
        "interrupted: 0 of 2 runs rerun; without --force the same command resumes with the "
        "others.")


def test_report_refuses_online_and_task_streams_of_one_setting_before_writing(tmp_path):
    from experiments.report import ReportError, write_report

    for folder in ("vandeven-split-mnist", "vandeven-taskfree-split-mnist"):
        run = next((ROOT / "results" / folder / "split-mnist" / "domain").rglob("seed*.json"))
        target = tmp_path / run.relative_to(ROOT / "results" / folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(run, target.with_name(f"seed{len(list(tmp_path.rglob('*.json')))}.json"))
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ReportError, match="both online and task streams"):
        write_report(tmp_path)
    assert sorted(tmp_path.rglob("*")) == before  # nothing half written


def test_a_validation_fraction_that_leaves_no_training_data_is_a_clear_error(tmp_path, capsys):
    code = main(["run", "--method", "naive", "--scenario", "task", "--seeds", "0",
                 "--iterations", "2", "--hidden", "8", "--validation", "0.999", "--dry-run"])
    assert code == 0  # listing needs no data
    code = main(["run", "--method", "naive", "--scenario", "task", "--seeds", "0",
                 "--iterations", "2", "--hidden", "8", "--validation", "0.999", "--out",
                 str(tmp_path / "out"), "--no-report"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --validation 0.999 leaves task 1 no training"), err
    assert not (tmp_path / "out").exists()
