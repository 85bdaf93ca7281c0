"""One run: a benchmark stream, a scenario, a method and a seed, trained through Avalanche."""

from __future__ import annotations

import dataclasses
import gc
import os
import shlex
import sys
import time
from contextlib import contextmanager
from typing import Callable, Optional

import torch
from avalanche.training import Naive
from avalanche.training.plugins import EWCPlugin, SynapticIntelligencePlugin

from avalanche_si import SIPlugin
from .models import ActiveUnits, accuracy, build_model, init_linear_, make_criterion
from .config import RunConfig
from .options import METHODS, si_importance
from .streams import FastTensorLoader, Stream, make_stream


class FixedAvalancheSI(SynapticIntelligencePlugin):
    """Avalanche 0.6.0's SI with only its aliasing bug fixed.

    Avalanche's ``extract_weights`` stores ``param.detach().cpu().flatten()``, which on a
    CPU is a *view* of the live parameter: its "old" weights move with the optimizer,
    every step length is 0 and so is every importance (and θ* moves too). Here the
    stored weights are copies; everything else (λ/2, the 0.001 cap, its ξ) is as shipped.
    """

    @staticmethod
    @torch.no_grad()
    def _copying_extract_weights(model, target, excluded_parameters):
        for name, param in SynapticIntelligencePlugin.allowed_parameters(model, excluded_parameters):
            target[name].data = param.detach().cpu().flatten().clone()

    @contextmanager
    def _fixed(self):
        original = SynapticIntelligencePlugin.__dict__["extract_weights"]
        SynapticIntelligencePlugin.extract_weights = staticmethod(self._copying_extract_weights)
        try:
            yield
        finally:
            SynapticIntelligencePlugin.extract_weights = original

    def before_training_exp(self, strategy, **kwargs):
        with self._fixed():
            super().before_training_exp(strategy, **kwargs)

    def before_training_iteration(self, strategy, **kwargs):
        with self._fixed():
            super().before_training_iteration(strategy, **kwargs)

    def after_training_iteration(self, strategy, **kwargs):
        with self._fixed():
            super().after_training_iteration(strategy, **kwargs)

    def after_training_exp(self, strategy, **kwargs):
        with self._fixed():
            super().after_training_exp(strategy, **kwargs)


def method_plugins(cfg: RunConfig) -> list:
    """The regularization plugins of a method (the data loader is added by :func:`run`;
    online methods' SI plugin by :func:`experiments.online.run_online`)."""
    if cfg.method in ("naive", "joint") or cfg.stream != "tasks":
        return []
    if cfg.method == "si":
        return [SIPlugin(cfg.si_lambda, eps=cfg.si_eps, importance=si_importance(cfg),
                         clamp=cfg.si_clamp)]
    if cfg.method == "avalanche-si":  # its penalty is (λ/2)·Σ Ω(θ−θ*)²: λ = 2c is the same c
        return [SynapticIntelligencePlugin(si_lambda=2 * cfg.si_lambda, eps=cfg.si_eps)]
    if cfg.method == "avalanche-si-fixed":
        return [FixedAvalancheSI(si_lambda=2 * cfg.si_lambda, eps=cfg.si_eps)]
    if cfg.method == "ewc":
        return [EWCPlugin(ewc_lambda=cfg.ewc_lambda)]
    raise ValueError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}.")


def omega_summary(plugin: SIPlugin, bins: int = 40) -> dict:
    """Per-parameter histogram of log10 Ω (for the plots) and simple statistics."""
    out = {}
    for group in plugin.group_names:
        for name, omega in plugin.importances(group).items():
            o = omega.detach().double().flatten().cpu()
            logs = torch.log10(o[o > 0])
            hist = torch.histc(logs, bins=bins, min=-12, max=4) if len(logs) else torch.zeros(bins)
            out[name if group is None else f"{group}/{name}"] = {
                "mean": float(o.mean()), "max": float(o.max()), "zero_fraction": float((o == 0).double().mean()),
                "log10_hist": hist.tolist(), "log10_range": [-12, 4]}
    return out


def forgetting(acc: list[list[float]]) -> float:
    """Mean over tasks j < T-1 of (best accuracy on j before the last task) - (final accuracy)."""
    T = len(acc)
    if T < 2:
        return 0.0
    return sum(max(acc[i][j] for i in range(j, T - 1)) - acc[T - 1][j] for j in range(T - 1)) / (T - 1)


def run(cfg: RunConfig, *, stream: Optional[Stream] = None, log: Callable[[str], None] = print,
        loggers: Optional[list] = None) -> dict:
    """Train ``cfg.method`` on the stream task by task; return the results dictionary."""
    # A finished run's stream, model and strategy sit in reference cycles (Avalanche's
    # datasets and plugins point back at each other), which Python's collector reaches only
    # when enough small objects have been made: a study of many permuted-MNIST runs in one
    # process (2 GB of data each) otherwise runs out of memory. Free them before the next.
    gc.collect()
    started, cpu_started = time.perf_counter(), time.process_time()
    if stream is None:
        stream = make_stream(cfg.benchmark, cfg.scenario, root=cfg.data_root, seed=cfg.seed,
                             n_tasks=cfg.n_tasks, pad=cfg.pad, class_order=cfg.class_order,
                             validation=cfg.validation)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.scenario, stream.input_dim, cfg.hidden, stream.classes_per_task,
                        stream.n_outputs, task_head=cfg.task_head, n_tasks=stream.n_tasks,
                        init=cfg.init)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    plugins = method_plugins(cfg)
    plugins.append(FastTensorLoader(stream, cfg.batch_size, iterations=cfg.iterations,
                                    seed=cfg.seed, joint=cfg.method == "joint"))
    if cfg.scenario == "class":
        plugins.append(ActiveUnits(model, stream.classes_per_task))
    if loggers:
        from avalanche.training.plugins import EvaluationPlugin
        from avalanche.evaluation.metrics import loss_metrics
        # the training loss per step comes from SIWandBLogger every log_every iterations; a
        # per-iteration Loss_MB on top of it only floods the run
        evaluator = EvaluationPlugin(loss_metrics(epoch=True), loggers=loggers)
    else:
        evaluator = None
    strategy = Naive(model=model, optimizer=optimizer, criterion=make_criterion(cfg.loss),
                     train_mb_size=cfg.batch_size,
                     train_epochs=1 if cfg.iterations else cfg.epochs,
                     plugins=plugins, evaluator=evaluator, device=cfg.device)
    si = next((p for p in plugins if isinstance(p, SIPlugin)), None)
    acc, omegas, task_seconds, online = [], [], [], {}
    if cfg.stream != "tasks":
        from .online import run_online

        def make_strategy(extra):
            return Naive(model=model, optimizer=optimizer, criterion=make_criterion(cfg.loss),
                         train_mb_size=cfg.batch_size, train_epochs=1,
                         plugins=extra + [p for p in plugins if not isinstance(p, FastTensorLoader)],
                         evaluator=evaluator, device=cfg.device)

        online = run_online(cfg, stream, strategy_factory=make_strategy, log=log)
        acc, task_seconds = online.pop("accuracy_matrix"), [online["train_seconds"]]
    for exp in (stream.benchmark.train_stream if cfg.stream == "tasks" else ()):
        t0 = time.perf_counter()
        if cfg.reset_optimizer:  # Avalanche keeps the optimizer's state from task to task
            optimizer.state.clear()
        if cfg.reinit and exp.current_experience > 0:
            # Benzing's code: every task starts from fresh weights, which the penalty pulls
            # back towards θ*; SI measures the task's path from this new start
            init_linear_(model, cfg.init, fresh=True)
            if si is not None:
                si.engine.restart_path()
        strategy.train(exp, eval_streams=[], num_workers=0)
        task_seconds.append(time.perf_counter() - t0)
        row = [accuracy(model, t.x_test, t.y_test, t.task_label) for t in stream.tasks]
        acc.append(row)
        if si is not None:
            omegas.append(omega_summary(si))
        i = exp.current_experience
        seen = sum(row[: i + 1]) / (i + 1)
        log(f"  [{cfg.run_id()}] task {i + 1}/{stream.n_tasks}: mean accuracy on tasks "
            f"seen {seen:.4f} ({task_seconds[-1]:.1f} s)")
        for lg in loggers or ():
            if hasattr(lg, "log_accuracy_row"):
                lg.log_accuracy_row(i, row)
    final = acc[-1]
    result = {
        "config": dataclasses.asdict(cfg),
        "run_id": cfg.run_id(),
        "accuracy_matrix": acc,
        "final_average_accuracy": sum(final) / len(final),
        "average_forgetting": forgetting(acc),
        "omega": omegas,
        "seconds": time.perf_counter() - started,
        "train_seconds_per_task": task_seconds,
        # CPU time of this process, all its threads: unlike "seconds" it does not grow when
        # other runs share the cores, so it compares runs made under different load.
        "cpu_seconds": time.process_time() - cpu_started,
        **online,
        "command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], "-m", "experiments"]
                            + sys.argv[1:]),
        "torch": torch.__version__,
        # Runs repeat bit for bit on one machine only at the same thread count: threads split
        # the sums inside matrix products differently, and training amplifies the last bits.
        "threads": torch.get_num_threads(),
        "commit": CODE_COMMIT,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return result


def _commit() -> Optional[str]:
    """The git commit of the checkout (``+`` if its code has changes), else None."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True,
                              capture_output=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "src/avalanche_si", "experiments"], cwd=os.path.dirname(here),
                               text=True, capture_output=True, timeout=10)
        return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


#: The commit of the code this process loaded, read once at import: a run records it rather
#: than the checkout's commit when it finishes, which may be newer.
CODE_COMMIT = _commit()
