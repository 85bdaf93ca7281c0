"""Networks for the three scenarios: a ReLU MLP body with the scenario's output layer."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from torch import nn

from .options import INITS, LOSSES, TASK_HEADS


def init_linear_(module: nn.Module, init: str, *, fresh: bool = False) -> nn.Module:
    """Re-initialise every ``nn.Linear`` in ``module`` in place; return ``module``.

    ``"torch"`` keeps PyTorch's default (weights and biases uniform in ±1/√fan_in), drawn
    anew with ``fresh`` (a network re-initialised between tasks).
    ``"glorot"`` is Keras's ``Dense`` default, which Zenke et al.'s code used: weights uniform
    in ±√(6 / (fan_in + fan_out)) (Glorot & Bengio 2010), biases 0. ``"benzing"`` is the
    start of Benzing's (2022) permuted-MNIST code: the same weights, biases 0.1.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}.")
    if init in ("glorot", "benzing"):
        with torch.no_grad():
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        m.bias.fill_(0.1 if init == "benzing" else 0.0)
    elif fresh:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
    return module


class KerasCrossEntropy(nn.Module):
    """Keras 2's ``categorical_crossentropy`` on a softmax output, as Zenke et al.'s code had it.

    Loss = mean over the batch of −log clip(p_y, ε, 1 − ε), p = softmax(logits), ε = 1e-7
    (Keras's ``epsilon()``). It equals PyTorch's cross-entropy while ε ≤ p_y ≤ 1 − ε; outside,
    the clip makes an example's gradient exactly zero. In float32, 1 − ε rounds to
    1 − 2⁻²³ ≈ 0.99999988, so an example stops contributing once the softmax gives its class
    more than that (a logit margin of about 16). PyTorch's loss instead keeps a gradient of
    about e^−margin; once every example of recent batches is that far, Adam, dividing by √v,
    turns those tiny gradients into steps of full size (about the learning rate).
    """

    eps = 1e-7

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p_y = torch.softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        return -torch.log(p_y.clamp(self.eps, 1 - self.eps)).mean()


def make_criterion(loss: str) -> nn.Module:
    """The training loss: ``"torch"`` (``nn.CrossEntropyLoss``) or ``"keras"``
    (:class:`KerasCrossEntropy`)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}.")
    return KerasCrossEntropy() if loss == "keras" else nn.CrossEntropyLoss()


class _Heads(MultiHeadClassifier):
    """Avalanche's multi-head classifier whose heads, created as tasks arrive, get ``init``."""

    def __init__(self, in_features: int, classes_per_task: int, init: str):
        super().__init__(in_features, initial_out_features=classes_per_task, masking=False)
        self.init = init
        init_linear_(self, init)

    def adaptation(self, experience):
        before = set(self.classifiers)
        super().adaptation(experience)
        for tid in set(self.classifiers) - before:
            init_linear_(self.classifiers[tid], self.init)


def mlp_body(input_dim: int, hidden: Sequence[int]) -> nn.Sequential:
    layers, d = [], input_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    return nn.Sequential(*layers)


class TaskIncrementalNet(MultiTaskModule):
    """Task-IL: a shared body and one ``classes_per_task``-unit head per task label."""

    def __init__(self, input_dim: int, hidden: Sequence[int], classes_per_task: int, *,
                 init: str = "torch"):
        super().__init__()
        self.body = init_linear_(mlp_body(input_dim, hidden), init)
        self.heads = _Heads(hidden[-1], classes_per_task, init)

    def forward(self, x, task_labels):
        # Fast path for the usual single-task mini-batch (Avalanche's generic path splits
        # the batch by task and copies every output).
        if isinstance(task_labels, torch.Tensor) and len(task_labels) and \
                bool((task_labels == task_labels[0]).all()):
            return self.forward_single_task(x, int(task_labels[0]))
        return super().forward(x, task_labels)

    def forward_single_task(self, x, task_label):
        return self.heads(self.body(x), task_label)


class SharedTaskHeadNet(MultiTaskModule):
    """Task-IL as van de Ven & Tolias's code builds it: one output layer of ``n_tasks *
    classes_per_task`` units; a sample of task ``t`` sees only units ``t*k .. t*k+k-1``.

    The difference from :class:`TaskIncrementalNet` lies in what the optimizer and SI see:
    the other tasks' units belong to the same weight tensor, so every step gives them a
    gradient (zero from the loss, nonzero from the SI penalty once they have moved) and Adam
    moves them on their old momentum; one Adam state (and step count) covers all tasks'
    units. Separate heads have their own tensors, and a head without a gradient stays put.
    """

    def __init__(self, input_dim: int, hidden: Sequence[int], classes_per_task: int,
                 n_tasks: int):
        super().__init__()
        self.classes_per_task, self.n_tasks = classes_per_task, n_tasks
        self.body = mlp_body(input_dim, hidden)
        self.head = nn.Linear(hidden[-1], n_tasks * classes_per_task)

    def forward(self, x, task_labels):
        if isinstance(task_labels, int):
            return self.forward_single_task(x, task_labels)
        k = self.classes_per_task
        out = self.head(self.body(x)).view(len(x), self.n_tasks, k)
        return out[torch.arange(len(x), device=out.device), task_labels.to(out.device)]

    def forward_single_task(self, x, task_label):
        k = self.classes_per_task
        if not 0 <= task_label < self.n_tasks:
            raise ValueError(f"task label {task_label} outside 0..{self.n_tasks - 1}: this "
                             f"network was built for {self.n_tasks} tasks.")
        return self.head(self.body(x))[:, task_label * k:(task_label + 1) * k]


class SharedHeadNet(nn.Module):
    """Domain-IL and Class-IL: one output layer; Class-IL trains only the units seen so far.

    ``active_units`` (set by :class:`ActiveUnits`) limits the logits to the classes seen
    so far, as van de Ven & Tolias do for Class-IL; ``None`` uses every unit.
    """

    def __init__(self, input_dim: int, hidden: Sequence[int], n_outputs: int):
        super().__init__()
        self.body = mlp_body(input_dim, hidden)
        self.head = nn.Linear(hidden[-1], n_outputs)
        self.active_units = None

    def forward(self, x):
        out = self.head(self.body(x))
        return out if self.active_units is None else out[:, : self.active_units]


class ActiveUnits(SupervisedPlugin):
    """Class-IL: before experience ``i``, activate the units of the classes of tasks 0..i."""

    def __init__(self, model: SharedHeadNet, classes_per_task: int):
        super().__init__()
        self.model, self.classes_per_task = model, classes_per_task

    def before_training_exp(self, strategy, **kwargs):
        self.model.active_units = (strategy.experience.current_experience + 1) * self.classes_per_task


def build_model(scenario: str, input_dim: int, hidden: Sequence[int], classes_per_task: int,
                n_outputs: int, *, task_head: str = "separate", n_tasks: int = 0,
                init: str = "torch") -> nn.Module:
    """The network of a scenario; ``task_head`` picks the Task-IL output layer (see
    :class:`TaskIncrementalNet` and :class:`SharedTaskHeadNet`), ``init`` the initialisation
    of every linear layer, heads added later included (see :func:`init_linear_`)."""
    if task_head not in TASK_HEADS:
        raise ValueError(f"unknown task_head {task_head!r}; choose one of {', '.join(TASK_HEADS)}.")
    if scenario == "task" and task_head == "shared":
        return init_linear_(SharedTaskHeadNet(input_dim, hidden, classes_per_task, n_tasks), init)
    if scenario == "task":
        return TaskIncrementalNet(input_dim, hidden, classes_per_task, init=init)
    return init_linear_(SharedHeadNet(input_dim, hidden, n_outputs), init)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task_label: int, *,
             batch: int = 4096) -> Optional[float]:
    """Accuracy of ``model`` on one task's test tensors (evaluation mode, in chunks).

    None for a Task-IL model that has no head for ``task_label`` yet (a future task).
    """
    if isinstance(model, MultiTaskModule) and task_label not in model.known_train_tasks_labels:
        return None
    was_training = model.training
    model.eval()
    correct = 0
    device = next(model.parameters()).device
    for i in range(0, len(y), batch):
        xb, yb = x[i:i + batch].to(device), y[i:i + batch].to(device)
        if isinstance(model, MultiTaskModule):
            out = model.forward_single_task(xb, task_label)
        else:
            out = model(xb)
        correct += int((out.argmax(1) == yb).sum())
    model.train(was_training)
    return correct / len(y)
