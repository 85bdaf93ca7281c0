"""An Avalanche logger for Weights & Biases that works with current wandb, with SI diagnostics.

Avalanche 0.6.0's `WandBLogger` fails at construction with wandb 0.31
(`wandb.util.generate_id` is gone; a later check uses `wandb.viz`, also gone). This
logger uses only wandb's public run API (`wandb.init`, `run.log`, `wandb.Histogram`,
`wandb.Table`, `wandb.Image`, `wandb.Artifact`) and adds what an SI user wants to see:

- every numeric metric the `EvaluationPlugin` emits
  (training loss, accuracies ...), against `train/iteration`;
- every `log_every` iterations the training loss and, for each
  `SIPlugin` in the strategy, its penalty (reading them is a host
  synchronisation, hence not every step); after each experience Ω statistics and a
  histogram of log10 Ω per group;
- `log_accuracy_row()` / `log_result()` / `log_images()` for result tables,
  plots and a JSON artifact.

It works offline (`WANDB_MODE=offline`): everything lands in the run's folder and can be
uploaded later with `wandb sync`.

Example:
    ```python
    from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche_si.wandb_logger import SIWandBLogger

    logger = SIWandBLogger(project="my-cl", config={"c": 0.1})
    evaluator = EvaluationPlugin(loss_metrics(minibatch=True),
                                 accuracy_metrics(experience=True), loggers=[logger])
    ```
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from avalanche.logging import BaseLogger

from .plugin import SIPlugin

__all__ = ["SIWandBLogger"]


class SIWandBLogger(BaseLogger):
    """Log Avalanche metrics and SI diagnostics to a wandb run.

    Args:
        project: the wandb project.
        name: the run's name.
        config: the run's configuration.
        dir: where wandb writes the run (`<dir>/wandb/`).
        mode: `"online"`, `"offline"` or `"disabled"`; None lets `WANDB_MODE` decide.
        log_every: log the SI penalty every this many training iterations.
        histogram_bins: bins of the log10 Ω histograms.
        run: an existing wandb run to log into instead of starting one.
        **init_kwargs: any other `wandb.init` argument (entity, group, tags ...).
    """

    def __init__(self, *, project: str = "avalanche-si", name: Optional[str] = None,
                 config: Optional[dict] = None, dir: Optional[str] = None,
                 mode: Optional[str] = None, log_every: int = 50, histogram_bins: int = 64,
                 run: Any = None, **init_kwargs: Any):
        super().__init__()
        if not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"log_every must be a positive integer, got {log_every!r}.")
        import wandb

        self._wandb = wandb
        self.log_every, self.histogram_bins = log_every, histogram_bins
        if run is None:
            if dir is not None:
                Path(dir).mkdir(parents=True, exist_ok=True)
            run = wandb.init(project=project, name=name, config=config or {}, dir=dir, mode=mode,
                             reinit="create_new", **init_kwargs)
        self.run = run
        self.iteration = 0
        self._axis = False  # train/iteration declared as every metric's x axis yet?

    # ------------------------------------------------------------ Avalanche's side

    def _step(self, data: dict[str, Any]) -> dict[str, Any]:
        """`data` against `train/iteration` once training has begun. The axis is declared
        then too: wandb fills a declared step metric into every row, so a run that only
        carries tables and plots (the CLI's report run) would get a step of 0."""
        if self.iteration > 0:
            if not self._axis:
                self.run.define_metric("train/iteration")
                self.run.define_metric("*", step_metric="train/iteration")
                self._axis = True
            data["train/iteration"] = self.iteration
        return data

    def log_single_metric(self, name, value, x_plot) -> None:
        """Logs one of Avalanche's scalar metrics at the current step (others are skipped)."""
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return  # images, dicts, confusion matrices: not logged by this logger
        self.run.log(self._step({name: value}))

    def after_training_iteration(self, strategy, metric_values=None, **kwargs) -> None:
        """Every ``log_every`` iterations: the training loss and SI's penalty."""
        self.iteration = strategy.clock.train_iterations
        if self.iteration % self.log_every:
            return
        data = {}
        if isinstance(getattr(strategy, "loss", None), torch.Tensor):
            data["train/loss"] = float(strategy.loss.detach())
        for k, si in enumerate(_si_plugins(strategy)):
            penalty = si.penalty
            if penalty is not None:
                data[_key(k, "si/penalty")] = float(penalty)
        self.run.log(self._step(data))

    def after_training_exp(self, strategy, metric_values=None, **kwargs) -> None:
        """After each experience: Ω's statistics for every SI plugin of the strategy."""
        self.iteration = strategy.clock.train_iterations
        data: dict[str, Any] = {"train/experience": strategy.clock.train_exp_counter}
        for k, si in enumerate(_si_plugins(strategy)):
            data.update(self.omega_statistics(si, prefix=_key(k, "si")))
        self.run.log(self._step(data))

    def omega_statistics(self, si: SIPlugin, *, prefix: str = "si") -> dict[str, Any]:
        """Ω mean / max / fractions of zeros and of negatives, and a log10 histogram of the
        positive Ω, per SI group."""
        out: dict[str, Any] = {}
        for group in si.group_names:
            omegas = list(si.importances(group).values())
            if not omegas:
                continue
            flat = torch.cat([o.detach().flatten().double().cpu() for o in omegas])
            label = "all" if group is None else group
            out[f"{prefix}/{label}/omega_mean"] = float(flat.mean())
            out[f"{prefix}/{label}/omega_max"] = float(flat.max())
            out[f"{prefix}/{label}/omega_zero_fraction"] = float((flat == 0).double().mean())
            # Only SIPlugin(clamp="none") can make Ω negative; the histogram shows Ω > 0.
            out[f"{prefix}/{label}/omega_negative_fraction"] = float((flat < 0).double().mean())
            positive = flat[flat > 0]
            if len(positive):
                logs = torch.log10(positive)
                lo, hi = float(logs.min()), float(logs.max())
                hi = hi if hi > lo else lo + 1.0
                counts = torch.histc(logs, bins=self.histogram_bins, min=lo, max=hi)
                edges = torch.linspace(lo, hi, self.histogram_bins + 1)
                out[f"{prefix}/{label}/log10_omega"] = self._wandb.Histogram(
                    np_histogram=(counts.numpy(), edges.numpy()))
        return out

    # --------------------------------------------------------------- results side

    def log_accuracy_row(self, trained_task: int, accuracies: Iterable[Optional[float]]) -> None:
        """Accuracy on every task after training task `trained_task` (0-based)."""
        data: dict[str, Any] = {}
        for j, a in enumerate(accuracies):
            if a is not None:
                data[f"accuracy/task{j + 1}"] = a
        self.run.log(self._step(data))

    def log_result(self, result: dict) -> None:
        """The accuracy matrix as a table, the headline numbers as summary, the JSON as artifact."""
        acc = result["accuracy_matrix"]
        table = self._wandb.Table(columns=["after"] + [f"task {j + 1}" for j in range(len(acc[0]))],
                                  data=[[i + 1] + list(row)
                                        for i, row in enumerate(acc)])
        self.run.log(self._step({"results/accuracy_matrix": table}))
        for key in ("final_average_accuracy", "average_forgetting", "seconds"):
            if key in result and isinstance(result[key], (int, float)) and math.isfinite(result[key]):
                self.run.summary[key] = result[key]
        artifact = self._wandb.Artifact(f"result-{self.run.id}", type="result")
        with artifact.new_file("result.json") as f:
            json.dump(result, f)
        self.run.log_artifact(artifact)

    def log_images(self, paths: Iterable[Path], *, prefix: str = "plots") -> None:
        """PNG plots as wandb images (keyed by file name)."""
        data: dict[str, Any] = {}
        for p in paths:
            data[f"{prefix}/{Path(p).stem}"] = self._wandb.Image(str(p))
        self.run.log(self._step(data))

    def log_markdown_table(self, path: Path, *, key: str = "results/summary") -> None:
        """A Markdown table (as `report` writes it) as a wandb table with numbers as
        numbers: a `mean ± SEM` column becomes two numeric columns, `<name>` and
        `<name> SEM`; empty cells become missing values."""
        lines = [l for l in Path(path).read_text().splitlines() if l.startswith("|")]
        header = [c.strip() for c in lines[0].strip("|").split("|")]
        rows = [[c.strip() for c in l.strip("|").split("|")] for l in lines[2:]]
        split = ["±" in header[j] or any("±" in r[j] for r in rows) for j in range(len(header))]
        columns = []
        for name, two in zip(header, split):
            columns += [name, f"{name} SEM"] if two else [name]
        data = []
        for r in rows:
            out = []
            for cell, two in zip(r, split):
                if two:
                    mean, _, sem = cell.partition("±")
                    out += [_number(mean), _number(sem)]
                else:
                    out.append(_number(cell))
            data.append(out)
        self.run.log(self._step({key: self._wandb.Table(columns=columns, data=data)}))

    def finish(self) -> None:
        """Ends the wandb run (uploads it, or closes its offline files)."""
        self.run.finish()


def _number(cell: str):
    """A table cell as a float if it is one, None if empty, else the text."""
    cell = cell.strip()
    if not cell:
        return None
    try:
        return float(cell)
    except ValueError:
        return cell


def _si_plugins(strategy) -> list[SIPlugin]:
    return [p for p in getattr(strategy, "plugins", ()) if isinstance(p, SIPlugin)]


def _key(k: int, name: str) -> str:
    return name if k == 0 else name.replace("si/", f"si{k}/", 1)
