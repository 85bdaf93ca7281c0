"""SIWandBLogger with current wandb, offline: read back what the run's files hold."""

from pathlib import Path

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
from avalanche.training.plugins import EvaluationPlugin

from avalanche_si import SIPlugin
from conftest import make_stream, make_tasks, mlp, strategy, train_stream
from wandb_records import read_run, wandb_errors


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    return tmp_path


def test_logger_records_metrics_si_diagnostics_and_results(offline):
    from avalanche_si.wandb_logger import SIWandBLogger

    logger = SIWandBLogger(project="test", name="unit", config={"c": 2.0}, dir=str(offline),
                           log_every=3)
    model = mlp(dtype=torch.float32)
    si = SIPlugin(2.0, groups={"body": ["0", "2"], "head": ["4"]})
    evaluator = EvaluationPlugin(loss_metrics(epoch=True), accuracy_metrics(experience=True),
                                 loggers=[logger])
    strat = strategy(model, torch.optim.Adam(model.parameters(), lr=0.05), [si],
                     evaluator=evaluator)
    train_stream(strat, make_stream(make_tasks(dtype=torch.float32)))
    logger.log_accuracy_row(2, [0.5, None, 1.0])
    logger.log_result({"accuracy_matrix": [[1.0, None], [0.8, 0.9]],
                       "final_average_accuracy": 0.85, "average_forgetting": 0.2, "seconds": 1.5})
    plot = offline / "plot.png"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.plot([1, 2])
    plt.savefig(plot)
    logger.log_images([plot])
    logger.finish()

    (run_dir,) = Path(offline, "wandb").glob("offline-run-*")
    run = read_run(run_dir)
    assert run["config"]["c"] == 2.0
    keys = set().union(*run["history"])
    missing = {"train/loss", "si/penalty", "si/body/omega_mean", "si/head/omega_max",
               "si/body/log10_omega", "accuracy/task1", "accuracy/task3",
               "results/accuracy_matrix", "plots/plot"} - keys
    assert not missing, f"not in the run's history: {missing}; wandb:\n{wandb_errors(run_dir)}"
    assert any(k.startswith("Loss_Epoch/train_phase") for k in keys)
    penalties = [h["si/penalty"] for h in run["history"] if "si/penalty" in h]
    assert penalties and all(p >= 0 for p in penalties) and max(penalties) > 0
    hist = next(h["si/body/log10_omega"] for h in run["history"] if "si/body/log10_omega" in h)
    assert hist["_type"] == "histogram" and sum(hist["values"]) > 0
    omega_means = [h["si/body/omega_mean"] for h in run["history"] if "si/body/omega_mean" in h]
    assert len(omega_means) == 3 and omega_means[-1] >= omega_means[0] > 0
    table = next(h["results/accuracy_matrix"] for h in run["history"] if "results/accuracy_matrix" in h)
    saved = __import__("json").loads((run_dir / "files" / table["path"]).read_text())
    assert saved["data"] == [[1, 1.0, None], [2, 0.8, 0.9]]
    image = next(h["plots/plot"] for h in run["history"] if "plots/plot" in h)
    assert (run_dir / "files" / image["path"]).stat().st_size == plot.stat().st_size
    assert run["summary"]["final_average_accuracy"] == 0.85
    assert any("result-" in a for a in run["artifacts"])


def test_logger_rejects_bad_options(offline):
    from avalanche_si.wandb_logger import SIWandBLogger

    with pytest.raises(ValueError, match="log_every"):
        SIWandBLogger(log_every=0, dir=str(offline))


def test_omega_statistics_count_negative_importances(offline):
    """clamp="none" can leave Ω < 0: counted, and kept out of the log10 histogram."""
    from types import SimpleNamespace

    from avalanche_si.wandb_logger import SIWandBLogger

    logger = SIWandBLogger(project="test", dir=str(offline))
    si = SimpleNamespace(group_names=[None], importances=lambda group: {
        "w": torch.tensor([-1.0, 0.0, 10.0, 100.0])})
    stats = logger.omega_statistics(si)
    logger.finish()
    assert stats["si/all/omega_negative_fraction"] == 0.25
    assert stats["si/all/omega_zero_fraction"] == 0.25
    assert stats["si/all/omega_mean"] == pytest.approx(109.0 / 4)
    assert sum(stats["si/all/log10_omega"].histogram) == 2  # only the positive ones
