"""Shared helpers: tiny in-memory Avalanche streams and a plain float64 SI reference."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)

from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets  # noqa: E402
from avalanche.benchmarks.scenarios.supervised import with_classes_timeline  # noqa: E402
from avalanche.benchmarks.scenarios.task_aware import with_task_labels  # noqa: E402
from avalanche.benchmarks.utils.classification_dataset import (  # noqa: E402
    _make_taskaware_tensor_classification_dataset as _tensor_dataset,
)
from avalanche.core import SupervisedPlugin  # noqa: E402
from avalanche.training import Naive  # noqa: E402

#: every device of this machine: the numeric tests run on each, so the first machine with a
#: GPU checks them all with the README's test command
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_tasks(n_tasks=3, n=48, dim=6, *, dtype=torch.float64, seed=0, offset_labels=False):
    """A list of (x, y, t) tensors: task t separates two classes along input axis t."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(n_tasks):
        x = torch.randn(n, dim, generator=g, dtype=dtype)
        y = (x[:, t % dim] + 0.3 * x[:, (t + 1) % dim] > 0).long() + (2 * t if offset_labels else 0)
        tasks.append((x, y, t))
    return tasks


def make_stream(tasks):
    """An ordinary Avalanche benchmark (train = test stream) over in-memory tensors."""
    datasets = [_tensor_dataset(x, y, task_labels=t) for x, y, t in tasks]
    return with_classes_timeline(with_task_labels(benchmark_from_datasets(
        train=datasets, test=[_tensor_dataset(x, y, task_labels=t) for x, y, t in tasks])))


def mlp(dim=6, hidden=8, out=2, *, dtype=torch.float64, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.Tanh(),
                               torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
                               torch.nn.Linear(hidden, out)).to(dtype=dtype, device=device)


def strategy(model, optimizer, plugins=(), *, mb=8, epochs=2, evaluator=None, cls=Naive,
             **kwargs):
    device = next(model.parameters()).device
    return cls(model=model, optimizer=optimizer, train_mb_size=mb, train_epochs=epochs,
               plugins=list(plugins), evaluator=evaluator, device=device, **kwargs)


#: the three ways of measuring ω
IMPORTANCES = ["total", "task", "delta_params"]


def omegas(si):
    """Every group's Ω, by ``group/name`` (copies)."""
    return {f"{g}/{n}": o.clone() for g in si.group_names for n, o in si.importances(g).items()}


def weights(model):
    """A copy of the model's parameters, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(a, b):
    """Two ``{name: tensor}`` dicts equal to the bit."""
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


class AccumulateEverySecond:
    """A template mixin that steps the optimizer (through `optimizer_step()`, so an AMP
    template's scaler steps) every second mini-batch, each loss halved, with every hook run on
    every mini-batch, as a user adds gradient accumulation to a template."""

    def training_epoch(self, **kwargs):
        for k, self.mbatch in enumerate(self.dataloader):
            self._before_training_iteration(**kwargs)
            if k % 2 == 0:
                self.optimizer.zero_grad()
            self.loss = self._make_empty_loss()
            self._before_forward(**kwargs)
            self.mb_output = self.forward()
            self._after_forward(**kwargs)
            self.loss += self.criterion() / 2  # the mean over both mini-batches
            self._before_backward(**kwargs)
            self.backward()
            self._after_backward(**kwargs)
            self._before_update(**kwargs)
            if k % 2 == 1:
                self.optimizer_step()
            self._after_update(**kwargs)
            self._after_training_iteration(**kwargs)


class Every(SupervisedPlugin):
    """Calls ``fn(strategy)`` in ``hook`` at the given (experience, iteration) pairs."""

    def __init__(self, hook, at, fn):
        super().__init__()
        self.at, self.fn, self.it = set(at), fn, 0
        setattr(self, hook, self._maybe)

    def _maybe(self, strategy, **kwargs):
        if (strategy.clock.train_exp_counter, strategy.clock.train_exp_iterations) in self.at:
            self.fn(strategy)


def train_stream(strat, bench, **kwargs):
    for exp in bench.train_stream:
        strat.train(exp, shuffle=False, num_workers=0, eval_streams=[], **kwargs)


def reference_si(model, optimizer, tasks, groups, *, importance, mb=8, epochs=2, clamp="task",
                 rewrite_grads=None, on_step=None, reinit=None):
    """SI by the definition: a plain per-parameter loop with the penalty through autograd.

    ``groups``: list of (list of parameter names, strength c, damping xi).
    ``rewrite_grads``: what another plugin does to the gradients before the step (in place).
    ``on_step``: called after every optimizer step (an LR scheduler's step, say).
    ``reinit``: called with the model at the start of every task after the first (Benzing's
    re-initialisation); the task's path length is then measured from the new weights.
    Returns ({name: Omega}, the trained model).
    """
    device = next(model.parameters()).device
    named = dict(model.named_parameters())
    state = {n: dict(omega=torch.zeros_like(p), prev=p.detach().clone())
             for names, _, _ in groups for n, p in named.items() if n in names}
    consolidated = False
    ce = torch.nn.CrossEntropyLoss()
    for t, (x_all, y_all, _) in enumerate(tasks):
        if reinit is not None and t > 0:
            reinit(model)
        start = {n: named[n].detach().clone() for n in state}
        running = {n: torch.zeros_like(named[n]) for n in state}
        for _ in range(epochs):
            for i in range(0, len(x_all), mb):
                x, y = x_all[i:i + mb].to(device), y_all[i:i + mb].to(device)
                task_loss = ce(model(x), y)
                penalty = 0.0
                if consolidated:
                    for names, c, _ in groups:
                        for n in names:
                            s = state[n]
                            penalty = penalty + c * (s["omega"] * (named[n] - s["prev"]) ** 2).sum()
                task_grads = dict(zip(named, torch.autograd.grad(
                    task_loss, list(named.values()), retain_graph=True, allow_unused=True)))
                optimizer.zero_grad()
                (task_loss + penalty).backward()
                if rewrite_grads is not None:
                    rewrite_grads(model)
                before = {n: p.detach().clone() for n, p in named.items()}
                if importance == "delta_params":
                    predicted = predict_with_real_optimizer(optimizer, named, task_grads)
                optimizer.step()
                if on_step is not None:
                    on_step()
                for n in state:
                    if importance == "total":
                        g, step = named[n].grad, named[n].detach() - before[n]
                    elif importance == "task":
                        g, step = task_grads[n], named[n].detach() - before[n]
                    else:
                        g, step = task_grads[n], predicted[n]
                    running[n] -= g * step
        for names, _, xi in groups:
            for n in names:
                s = state[n]
                contribution = running[n] / ((named[n].detach() - start[n]) ** 2 + xi)
                if clamp == "task":
                    s["omega"] = s["omega"] + torch.clamp(contribution, min=0)
                elif clamp == "total":
                    s["omega"] = torch.clamp(s["omega"] + contribution, min=0)
                else:
                    s["omega"] = s["omega"] + contribution
                s["prev"] = named[n].detach().clone()
        consolidated = True
    return {n: s["omega"] for n, s in state.items()}, model


def train_loop(model, optimizer, tasks, si, *, mb=8, epochs=2, accumulate=1, scaler=None,
               autocast=None, clip=None, on_step=None, on_backward=None, on_task_start=None):
    """SI in a plain PyTorch loop, as the docs' recipe writes it: ``accumulate`` backward passes
    (each on mb / accumulate samples, loss divided by accumulate) per optimizer step.
    ``on_task_start(model, si, t)`` runs after ``si.start_task()`` of task t."""
    device = next(model.parameters()).device
    ce = torch.nn.CrossEntropyLoss()
    micro = mb // accumulate
    step = 0
    for t, (x_all, y_all, _) in enumerate(tasks):
        si.start_task()
        if on_task_start is not None:
            on_task_start(model, si, t)
        for _ in range(epochs):
            for i in range(0, len(x_all), mb):
                optimizer.zero_grad()
                for j in range(i, min(i + mb, len(x_all)), micro):
                    x, y = x_all[j:j + micro].to(device), y_all[j:j + micro].to(device)
                    if autocast is None:
                        out = model(x)
                    else:
                        with torch.autocast(device.type, dtype=autocast):
                            out = model(x).float()
                    loss = ce(out, y) / accumulate
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                if on_backward is not None:
                    on_backward(model, step)
                si.before_step()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                si.after_step(loss.detach())
                if on_step is not None:
                    on_step()
                step += 1
        si.end_task()
    return model


def predict_with_real_optimizer(optimizer, named, grads):
    """The step ``optimizer`` would take from ``grads``: take it on a copy and read it back."""
    saved_params = {n: p.detach().clone() for n, p in named.items()}
    saved_grads = {n: p.grad for n, p in named.items()}
    saved_state = copy.deepcopy(optimizer.state_dict())
    for n, p in named.items():
        p.grad = None if grads[n] is None else grads[n].clone()
    optimizer.step()
    steps = {n: p.detach() - saved_params[n] for n, p in named.items()}
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(saved_params[n])
            p.grad = saved_grads[n]
    optimizer.load_state_dict(saved_state)
    return steps


@pytest.fixture
def tasks():
    return make_tasks()


class ReplayedOnTheCPU:
    """A stand-in for a CUDA graph where there is no GPU: the capture keeps the callable with
    the scalars it was built with, and a replay runs it on the tensors passed, which
    ``graphs.CHECK`` makes sure are the captured ones (addresses, shapes, strides). So a
    step replayed on what the key let through computes what a CUDA graph would."""

    def __init__(self, fn, lists, pool):
        self.fn = fn

    def replay(self, lists):
        self.fn(*lists)

    @staticmethod
    def pool(device):
        return None


@pytest.fixture
def graphs_everywhere(monkeypatch):
    """``cuda_graphs=True`` takes effect on every device (the CPU through
    ``ReplayedOnTheCPU``), and every replay checks what it replays on."""
    from avalanche_si import graphs

    real = graphs.backend_for
    monkeypatch.setattr(graphs, "backend_for",
                        lambda device: ReplayedOnTheCPU if device.type == "cpu" else real(device))
    monkeypatch.setattr(graphs, "CHECK", True)
    return graphs
