"""What defines a run and where its result lies: light to import (no torch, no Avalanche),
so that the command line checks and lists runs before anything heavy loads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .options import CLASS_ORDER_SUFFIX


@dataclass
class RunConfig:
    """Everything that defines a run; saved with its results."""
    benchmark: str = "split-digits"
    scenario: str = "task"
    method: str = "si"
    seed: int = 0
    si_lambda: float = 1.0          # c
    si_eps: float = 0.1             # xi
    si_importance: str = "total"
    sos_alpha: float = 0.0          # si_importance "sos": α of (g − α g_u)² (Benzing: 0, or 1)
    si_clamp: str = "task"          # where Omega is clamped at 0: task / total / none
    task_head: str = "separate"     # Task-IL output: a head per task, or one masked layer
    class_order: str = "seeded"     # split benchmarks: torch-seeded, or van de Ven's numpy orders
    init: str = "torch"             # linear layers: torch's default, glorot (Keras's), benzing
    reset_optimizer: bool = False     # clear Adam's moments at each task's start (Benzing's code)
    reinit: bool = False              # re-initialise the network at each later task's start (his
    #                                   code's default), SI's path measured from there
    loss: str = "torch"             # cross-entropy: PyTorch's, or keras (Keras 2's, clipped)
    ewc_lambda: float = 5000.0
    hidden: tuple[int, ...] = (400, 400)
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 128
    iterations: Optional[int] = 2000  # per task; None: train `epochs` epochs instead
    epochs: int = 1
    n_tasks: Optional[int] = None
    pad: int = 2                      # permuted benchmarks: 28x28 -> 32x32
    data_root: str = "data"
    device: str = "cpu"
    preset: Optional[str] = None
    # online and task-free streams (experiments/online.py); "tasks": one experience per task
    stream: str = "tasks"             # tasks | fuzzy (van de Ven's task-free) | online (Avalanche's)
    fuzziness: int = 500              # fuzzy: iterations over which a transition ramps, each side
    experience_size: int = 10         # online: samples per mini-experience
    consolidate_every: int = 100      # si-k: steps between consolidations (van de Ven's --update-every)
    plateau: tuple[int, float, float] = (100, 0.2, 0.01)  # si-plateau: window, mean, variance
    eval_every: Optional[int] = None  # online: iterations between two accuracy measurements
    validation: float = 0.0           # > 0: evaluate on this fraction of the training data, held out

    def run_id(self) -> str:
        method = self.method
        if self.method == "si" and self.si_importance != "total":
            method += f"-{self.si_importance}"
        if self.method == "si" and self.si_importance == "sos" and self.sos_alpha:
            method += f"-alpha{self.sos_alpha:g}"
        if self.method == "si" and self.si_clamp != "task":
            method += f"-clamp_{self.si_clamp}"
        if self.scenario == "task" and self.task_head == "shared" and self.stream == "tasks":
            method += "-shared_head"
        if self.init != "torch":
            method += f"-init_{self.init}"
        if self.loss != "torch":
            method += f"-loss_{self.loss}"
        if self.reinit:
            method += "-reinit"
        if self.class_order != "seeded":
            method += CLASS_ORDER_SUFFIX[self.class_order]
        return f"{self.benchmark}/{self.scenario}/{method}/seed{self.seed}"


def result_path(out: Path, cfg: RunConfig) -> Path:
    return Path(out) / (cfg.run_id() + ".json")


def save_result(out: Path, result: dict) -> Path:
    path = Path(out) / (result["run_id"] + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)  # a run's file appears whole or not at all
    return path
