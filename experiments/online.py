"""Online and task-free streams: SI with each consolidation policy, through Avalanche.

Two kinds of stream, both served as Avalanche ``OnlineCLExperience`` objects that an ordinary
``Naive`` strategy trains one after the other:

- ``fuzzy``: van de Ven's task-free protocol (``main_task_free.py --stream fuzzy-boundaries``
  of GMvandeVen/continual-learning; ``data/labelstream.py``): ``iters_per_context``
  mini-batches per context, each *sample* drawn from a context chosen by that iteration's
  probabilities, which ramp linearly over ``2 * fuzziness`` iterations around each
  transition; context 0 is seen for half a period at the start and half at the end. One
  sub-experience is one mini-batch.
- ``online``: Avalanche's ``split_online_stream`` over the tasks (experience size 10 by
  default), as ``OnlineNaive`` users build it.

The task boundaries are hidden from every method (``access_task_boundaries=False``) except
``si-boundary``, the reference that is told them. On a fuzzy stream a "boundary" is where the
most likely context changes. Methods: ``naive``; ``si-experience`` (consolidates after every
sub-experience, what a plugin that always consolidates after each experience does);
``si-k`` (every ``consolidate_every`` steps, van de Ven's ``--update-every``); ``si-plateau``
(Aljundi et al.'s loss-plateau trigger); ``si-boundary``.

Accuracy on every task's test set is measured every ``eval_every`` iterations (the curve over
the stream) and at each boundary (the accuracy matrix the report's forgetting reads).
"""

from __future__ import annotations

import time
from typing import Callable, Iterator, Optional

import torch
from avalanche.benchmarks.scenarios.online import OnlineCLExperience, split_online_stream
from avalanche.core import SupervisedPlugin

from avalanche_si import SIPlugin
from avalanche_si.consolidation import LossPlateau

from .options import si_importance
from .streams import Stream, tensor_dataset


def context_probabilities(n_contexts: int, iters_per_context: int, fuzziness: int) -> torch.Tensor:
    """``(total_iterations, n_contexts)``: each iteration's distribution over contexts, as
    van de Ven's ``FuzzyBoundaryStream`` computes it (``_probs_per_context``)."""
    if 2 * fuzziness > iters_per_context:
        raise ValueError("fuzziness must be at most half the iterations per context.")
    total = n_contexts * iters_per_context
    up = torch.tensor([(i + 0.5) / (2 * fuzziness) for i in range(2 * fuzziness)])
    down = 1 - up
    probs = torch.zeros(n_contexts, total)
    half = iters_per_context // 2
    for c in range(n_contexts):
        p = probs[c]
        if c == 0:
            end = half
            p[: end - fuzziness] = 1
            p[end - fuzziness:end + fuzziness] = down
            start = half + (n_contexts - 1) * iters_per_context
            p[start - fuzziness:start + fuzziness] = up
            p[start + fuzziness:] = 1
        else:
            start, end = half + (c - 1) * iters_per_context, half + c * iters_per_context
            p[start - fuzziness:start + fuzziness] = up
            p[start + fuzziness:end - fuzziness] = 1
            p[end - fuzziness:end + fuzziness] = down
    return probs.T.contiguous()


class _Cyclic:
    """Indices of one context's samples, reshuffled at every pass (a DataLoader with
    ``shuffle=True, drop_last=True`` and batch size 1, repeated forever, as van de Ven's)."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.g, self.order, self.pos = n, generator, torch.empty(0, dtype=torch.long), 0

    def take(self, k: int) -> torch.Tensor:
        out = []
        while k:
            if self.pos == len(self.order):
                self.order, self.pos = torch.randperm(self.n, generator=self.g), 0
            got = self.order[self.pos:self.pos + k]
            self.pos += len(got)
            k -= len(got)
            out.append(got)
        return torch.cat(out)


def fuzzy_experiences(stream: Stream, *, iters_per_context: int, fuzziness: int,
                      batch_size: int, seed: int, boundaries: bool
                      ) -> Iterator[OnlineCLExperience]:
    """The fuzzy-boundary stream as one ``OnlineCLExperience`` per mini-batch (lazily)."""
    probs = context_probabilities(stream.n_tasks, iters_per_context, fuzziness)
    dominant = probs.argmax(1).tolist()
    g = torch.Generator().manual_seed(seed)
    cyclic = [_Cyclic(len(t.y_train), g) for t in stream.tasks]
    origins = list(stream.benchmark.train_stream)
    total = len(dominant)
    for i in range(total):
        contexts = torch.multinomial(probs[i], batch_size, replacement=True, generator=g)
        xs, ys, ts = [], [], []
        for c in contexts.unique().tolist():
            k = int((contexts == c).sum())
            idx = cyclic[c].take(k)
            task = stream.tasks[c]
            xs.append(task.x_train[idx])
            ys.append(task.y_train[idx])
            ts.append(torch.full((k,), task.task_label, dtype=torch.long))
        x, y, t = torch.cat(xs), torch.cat(ys), torch.cat(ts)
        exp = OnlineCLExperience(
            dataset=tensor_dataset(x, y, task_labels=t.tolist()),
            origin_experience=origins[dominant[i]],
            is_first_subexp=i == 0 or dominant[i] != dominant[i - 1],
            is_last_subexp=i == total - 1 or dominant[i] != dominant[i + 1],
            sub_stream_length=total, access_task_boundaries=boundaries)
        exp.tensors = (x, y, t)
        yield _decorated(exp, y.tolist(), t.tolist())


def _decorated(exp: OnlineCLExperience, targets, task_labels) -> OnlineCLExperience:
    """The attributes Avalanche's dynamic modules read in ``adaptation`` (its online
    splitter strips the decorators that would set them)."""
    exp.classes_in_this_experience = sorted(set(targets))
    exp.task_labels = sorted(set(task_labels))
    return exp


def boundary_iterations(n_contexts: int, iters_per_context: int, fuzziness: int) -> list[int]:
    """Iterations after which the most likely context changes, and the stream's end."""
    dom = context_probabilities(n_contexts, iters_per_context, fuzziness).argmax(1).tolist()
    return [i + 1 for i in range(len(dom) - 1) if dom[i] != dom[i + 1]] + [len(dom)]


class ServeTensors(SupervisedPlugin):
    """Trains a fuzzy sub-experience on its one mini-batch, from its tensors (Avalanche's
    loader would collate the same samples one by one)."""

    def before_training_exp(self, strategy, **kwargs):
        tensors = getattr(strategy.experience, "tensors", None)
        if tensors is not None:
            strategy.dataloader = [[t.to(strategy.device) for t in tensors]]


class Probe(SupervisedPlugin):
    """Counts iterations; evaluates every ``every`` iterations and at the given ones; keeps
    the mean training loss of each ``every`` iterations (one host read a step: the
    experiments measure, the library's policies do not need it)."""

    def __init__(self, evaluate: Callable[[int], None], every: int, at: set[int]):
        super().__init__()
        self.evaluate, self.every, self.at, self.iterations = evaluate, every, at, 0
        self.loss_sum, self.losses = 0.0, []

    def after_training_iteration(self, strategy, **kwargs):
        self.iterations += 1
        self.loss_sum += float(strategy.loss.detach())
        if self.iterations % self.every == 0:
            self.losses.append([self.iterations, self.loss_sum / self.every])
            self.loss_sum = 0.0
        if self.iterations % self.every == 0 or self.iterations in self.at:
            self.evaluate(self.iterations)


class RecordingSIPlugin(SIPlugin):
    """SIPlugin that records after which training iteration it consolidated."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._iteration, self._steps = 0, []

    def after_update(self, strategy, **kwargs):
        self._iteration += 1  # this step's number, before the policy may consolidate
        super().after_update(strategy, **kwargs)

    def consolidate_now(self) -> None:
        super().consolidate_now()
        self._steps.append(self._iteration)


def online_experiences(cfg, stream: Stream, boundaries: bool):
    if cfg.stream == "fuzzy":
        return fuzzy_experiences(stream, iters_per_context=cfg.iterations,
                                 fuzziness=cfg.fuzziness, batch_size=cfg.batch_size,
                                 seed=cfg.seed, boundaries=boundaries)
    online = split_online_stream(stream.benchmark.train_stream,
                                 experience_size=cfg.experience_size, shuffle=True, seed=cfg.seed,
                                 access_task_boundaries=boundaries)
    return (_decorated(e, list(e.dataset.targets), list(e.dataset.targets_task_labels))
            for e in online)


def boundaries_of(cfg, stream: Stream) -> list[int]:
    if cfg.stream == "fuzzy":
        return boundary_iterations(stream.n_tasks, cfg.iterations, cfg.fuzziness)
    ends, total = [], 0
    for t in stream.tasks:
        total += -(-len(t.y_train) // cfg.experience_size)
        ends.append(total)
    return ends


def si_plugin(cfg) -> Optional[RecordingSIPlugin]:
    """The SI plugin of an online method (None for naive)."""
    if cfg.method == "naive":
        return None
    consolidate = {"si-experience": "experience", "si-boundary": "boundary",
                   "si-k": cfg.consolidate_every,
                   "si-plateau": LossPlateau(*cfg.plateau)}[cfg.method]
    return RecordingSIPlugin(cfg.si_lambda, eps=cfg.si_eps, importance=si_importance(cfg),
                             clamp=cfg.si_clamp, consolidate=consolidate)


def run_online(cfg, stream: Stream, *, strategy_factory, log: Callable[[str], None]) -> dict:
    """Train ``cfg.method`` on the online stream; return what the result JSON adds.

    ``strategy_factory(plugins)`` builds the Avalanche strategy with those plugins.
    """
    from .models import accuracy

    bounds = boundaries_of(cfg, stream)
    curve, matrix = [], []
    model_box = {}

    def evaluate(iteration: int) -> None:
        model = model_box["model"]
        row = [accuracy(model, t.x_test, t.y_test, t.task_label) for t in stream.tasks]
        curve.append([iteration, row])
        if iteration in bounds:
            matrix.append(row)
        done = [a for a in row if a is not None]
        log(f"  [{cfg.run_id()}] iteration {iteration}: mean accuracy over all tasks "
            f"{sum(done) / len(done):.4f}")

    every = cfg.eval_every or max(1, bounds[-1] // 20)
    probe = Probe(evaluate, every, set(bounds))
    si = si_plugin(cfg)
    plugins = ([si] if si is not None else []) + [ServeTensors(), probe]
    strategy = strategy_factory(plugins)
    model_box["model"] = strategy.model
    t0 = time.perf_counter()
    for exp in online_experiences(cfg, stream, boundaries=cfg.method == "si-boundary"):
        strategy.train(exp, eval_streams=[], num_workers=0)
    seconds = time.perf_counter() - t0
    return {"accuracy_matrix": matrix, "stream_accuracy": curve, "boundaries": bounds,
            "train_loss": probe.losses,
            "iterations": probe.iterations, "train_seconds": seconds,
            "consolidation_steps": [] if si is None else si._steps,
            "consolidations": 0 if si is None else len(si._steps)}
