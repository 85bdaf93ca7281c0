"""Benchmark streams as ordinary Avalanche benchmarks over tensors loaded once.

Images are read into memory once (torchvision's files, or scikit-learn's bundled
digits), turned into per-task tensors, and wrapped as Avalanche datasets, so any
Avalanche strategy trains on them as usual. :class:`TensorBatches` (used through
:class:`FastTensorLoader`) serves mini-batches by indexing those tensors instead of
collating single samples, and counts training in iterations, as the published
protocols do.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
from avalanche.benchmarks.scenarios.task_aware import with_task_labels
from avalanche.benchmarks.utils.classification_dataset import (
    _make_taskaware_tensor_classification_dataset as tensor_dataset,
)
from avalanche.core import SupervisedPlugin

from .options import BENCHMARKS, CLASS_ORDERS, DATA_ENV, SCENARIOS, DataError


def _torchvision_images(name: str, root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 in [0, 1] (N, C, H, W) and int64 labels; downloads if missing."""
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fmnist": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    # the folder torchvision reads: <root>/MNIST/raw, <root>/cifar-10-batches-py ...
    holds = f"{cls.__name__}/raw" if name in ("mnist", "fmnist") else cls.base_folder
    folder = Path(root) / cls.__name__ if name in ("mnist", "fmnist") else Path(root)
    created = _first_missing(folder / "raw")  # what a failed download must not leave behind
    try:
        ds = cls(root, train=train, download=True)
    except Exception as exc:  # offline, read-only folder, corrupt files ...
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise DataError(
            f"{cls.__name__} is not in {folder} and could not be downloaded ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); pass --data-root with "
            f"the folder that holds {holds} (or set ${DATA_ENV}); "
            f"docs/guide/data.md lists its files.") from None
    data = torch.as_tensor(ds.data)
    x = data.float().div_(255.0)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()
    return x, torch.as_tensor(ds.targets, dtype=torch.long)


def _first_missing(path: Path) -> Optional[Path]:
    """The outermost folder of ``path`` that does not exist yet (None if it all exists):
    everything under it is created by the download, so removing it on failure removes
    nothing of the user's."""
    path = Path(path).absolute()
    missing = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing = p
    return missing


def _digits(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits (1797 images), a fixed stratified 70/30 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    test_mask = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_mask[idx[: int(round(0.3 * len(idx)))]] = True
    keep = ~test_mask if train else test_mask
    return x[keep], y[keep]


def load_images(dataset: str, root: str, *, train: bool):
    if dataset == "digits":
        return _digits(train)
    return _torchvision_images(dataset, root, train)


@dataclass
class TaskData:
    """One task's tensors: inputs flattened to (N, D), labels as the model sees them."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    task_label: int
    classes: list[int]          # the labels of this task (after remapping)


@dataclass
class Stream:
    name: str
    scenario: str
    tasks: list[TaskData]
    input_dim: int
    classes_per_task: int
    n_outputs: int              # units of a shared head (domain, class) or of each head (task)
    benchmark: object = field(default=None, repr=False)

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)


def _labels_for(scenario: str, y_global_pos: torch.Tensor, task: int, per_task: int) -> torch.Tensor:
    """``y_global_pos``: the class's position in the stream's class order (0..T*k-1)."""
    if scenario == "class":
        return y_global_pos
    return y_global_pos - task * per_task  # task and domain: 0..k-1 within the task


def class_order(n_classes: int, seed: int, how: str = "seeded") -> torch.Tensor:
    """The classes in the order they are dealt out to tasks (``order[k]``: the k-th class).

    ``"seeded"``: ``torch.randperm`` with ``seed``. ``"vandeven"``: the orders of van de Ven
    & Tolias's code (``data.py``), which seeds numpy with the run's seed, draws
    ``p = np.random.permutation(n_classes)`` and relabels class ``d`` as ``p[d]`` (task ``i``
    gets the new labels ``i*k .. i*k+k-1``), except that seed 0 keeps the classes in order;
    their published means are over seeds 1 to 20 (``compare_all.py``). Running those seeds
    here trains on the same class splits as the paper, so the two can be compared without
    the spread that the random split adds (large in Domain-IL).
    """
    if how == "seeded":
        return torch.randperm(n_classes, generator=torch.Generator().manual_seed(seed))
    if how == "vandeven":
        import numpy as np

        if seed == 0:
            return torch.arange(n_classes)
        p = np.random.RandomState(seed).permutation(list(range(n_classes)))
        return torch.as_tensor(np.argsort(p), dtype=torch.long)
    raise ValueError(f"unknown class order {how!r}; choose one of {', '.join(CLASS_ORDERS)}.")


def split_stream(dataset: str, scenario: str, *, root: str, seed: int, n_tasks: Optional[int] = None,
                 shuffle_classes: bool = True, ordering: str = "seeded") -> Stream:
    """Split a dataset's classes into tasks of equal size (van de Ven & Tolias 2019).

    The class order is shuffled with ``seed`` as :func:`class_order` says (``ordering``)
    unless ``shuffle_classes=False``; task ``i`` holds the classes at positions
    ``i*k .. i*k+k-1``.
    """
    x_tr, y_tr = load_images(dataset, root, train=True)
    x_te, y_te = load_images(dataset, root, train=False)
    n_classes = int(y_tr.max()) + 1
    n_tasks = n_tasks or {100: 10}.get(n_classes, 5)
    if n_classes % n_tasks:
        raise ValueError(f"{n_classes} classes cannot be split into {n_tasks} equal tasks.")
    per_task = n_classes // n_tasks
    order = class_order(n_classes, seed, ordering) if shuffle_classes else torch.arange(n_classes)
    position = torch.empty(n_classes, dtype=torch.long)
    position[order] = torch.arange(n_classes)
    tasks = []
    for t in range(n_tasks):
        classes = order[t * per_task:(t + 1) * per_task]
        m_tr, m_te = torch.isin(y_tr, classes), torch.isin(y_te, classes)
        tasks.append(TaskData(
            x_tr[m_tr].flatten(1), _labels_for(scenario, position[y_tr[m_tr]], t, per_task),
            x_te[m_te].flatten(1), _labels_for(scenario, position[y_te[m_te]], t, per_task), t,
            list(range(t * per_task, (t + 1) * per_task)) if scenario == "class"
            else list(range(per_task))))
    return _finish(Stream(f"split-{dataset}", scenario, tasks, tasks[0].x_train.shape[1], per_task,
                          n_classes if scenario == "class" else per_task))


def permuted_stream(dataset: str, scenario: str, *, root: str, seed: int, n_tasks: int = 10,
                    pad: int = 2, permute_first: bool = True) -> Stream:
    """Permuted MNIST-style tasks: one fixed random pixel permutation per task.

    ``pad=2`` pads 28x28 to 32x32 (1024 inputs) as van de Ven & Tolias do; ``pad=0``
    keeps 784 inputs (Zenke et al.). ``permute_first=False`` leaves task 0 unpermuted.
    """
    x_tr, y_tr = load_images(dataset, root, train=True)
    x_te, y_te = load_images(dataset, root, train=False)
    if pad:
        x_tr = torch.nn.functional.pad(x_tr, (pad,) * 4)
        x_te = torch.nn.functional.pad(x_te, (pad,) * 4)
    x_tr, x_te = x_tr.flatten(1), x_te.flatten(1)
    d = x_tr.shape[1]
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(n_tasks):
        perm = torch.randperm(d, generator=g) if (t > 0 or permute_first) else torch.arange(d)
        offset = 10 * t if scenario == "class" else 0
        tasks.append(TaskData(x_tr[:, perm], y_tr + offset, x_te[:, perm], y_te + offset, t,
                              list(range(offset, offset + 10))))
    return _finish(Stream(f"permuted-{dataset}", scenario, tasks, d, 10,
                          10 * n_tasks if scenario == "class" else 10))


def _finish(stream: Stream) -> Stream:
    """Wrap the tensors as an ordinary Avalanche benchmark (train and test streams)."""
    train = [tensor_dataset(t.x_train, t.y_train, task_labels=t.task_label) for t in stream.tasks]
    test = [tensor_dataset(t.x_test, t.y_test, task_labels=t.task_label) for t in stream.tasks]
    stream.benchmark = with_classes_timeline(with_task_labels(
        benchmark_from_datasets(train=train, test=test)))
    return stream


def make_stream(benchmark: str, scenario: str, *, root: str, seed: int, n_tasks: Optional[int] = None,
                pad: int = 2, class_order: str = "seeded", validation: float = 0.0) -> Stream:
    """The benchmark's tasks. `validation` > 0 holds that fraction of each task's training
    data out and evaluates on it instead of the test set (to choose hyperparameters)."""
    stream = _make_stream(benchmark, scenario, root=root, seed=seed, n_tasks=n_tasks, pad=pad,
                          class_order=class_order)
    return _hold_out(stream, validation, seed) if validation else stream


def _hold_out(stream: Stream, fraction: float, seed: int) -> Stream:
    """Each task's last `fraction` of its training data (in a seeded random order) becomes its
    evaluation set; the test set is not used."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation must be a fraction in (0, 1), got {fraction}.")
    g = torch.Generator().manual_seed(90_000 + seed)
    for k, t in enumerate(stream.tasks, 1):
        order = torch.randperm(len(t.x_train), generator=g)
        cut = len(order) - max(1, int(round(fraction * len(order))))
        if cut < 1:
            raise DataError(f"--validation {fraction:g} leaves task {k} no training data (it "
                            f"has {len(order)} examples); hold out a smaller fraction.")
        keep, held = order[:cut], order[cut:]
        t.x_test, t.y_test = t.x_train[held], t.y_train[held]
        t.x_train, t.y_train = t.x_train[keep], t.y_train[keep]
    return _finish(stream)


def _make_stream(benchmark: str, scenario: str, *, root: str, seed: int,
                 n_tasks: Optional[int] = None, pad: int = 2,
                 class_order: str = "seeded") -> Stream:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}.")
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}.")
    if class_order not in CLASS_ORDERS:
        raise ValueError(f"unknown class order {class_order!r}; choose one of {', '.join(CLASS_ORDERS)}.")
    kind, dataset = benchmark.split("-", 1)
    if kind == "split":
        return split_stream(dataset, scenario, root=root, seed=seed, n_tasks=n_tasks,
                            ordering=class_order)
    if class_order != "seeded":
        raise ValueError(f"class_order={class_order!r} applies to split benchmarks only, not "
                         f"{benchmark}.")
    return permuted_stream(dataset, scenario, root=root, seed=seed, n_tasks=n_tasks or 10, pad=pad)


class TensorBatches:
    """Mini-batches ``[x, y, t]`` cut from in-memory tensors by indexing.

    With ``iterations`` set it yields exactly that many batches, reshuffling at every
    pass over the data (``drop_last``), as iteration-based protocols train.
    """

    def __init__(self, x, y, task_label: int, batch_size: int, *, iterations: Optional[int] = None,
                 shuffle: bool = True, generator: Optional[torch.Generator] = None,
                 device: torch.device | str = "cpu"):
        self.x, self.y = x.to(device), y.to(device)
        self.t = torch.full((len(y),), task_label, dtype=torch.long, device=device)
        self.batch_size, self.iterations, self.shuffle = batch_size, iterations, shuffle
        self.generator = generator or torch.Generator().manual_seed(0)
        self.drop_last = iterations is not None and len(y) >= batch_size

    def __len__(self) -> int:
        if self.iterations is not None:
            return self.iterations
        return math.ceil(len(self.y) / self.batch_size)

    def _order(self):
        if self.shuffle:
            return torch.randperm(len(self.y), generator=self.generator).to(self.x.device)
        return torch.arange(len(self.y), device=self.x.device)

    def __iter__(self):
        n, b, done = len(self.y), self.batch_size, 0
        while True:
            order = self._order()
            stop = n - (n % b if self.drop_last else 0)
            for i in range(0, stop, b):
                idx = order[i:i + b]
                yield [self.x[idx], self.y[idx], self.t[idx]]
                done += 1
                if done == len(self):
                    return
            if self.iterations is None:
                return


class FastTensorLoader(SupervisedPlugin):
    """Serves a :class:`Stream`'s training mini-batches by tensor indexing.

    Replaces the strategy's data loader at the start of each training experience (after
    Avalanche built its own), so the strategy, its plugins and its metrics run as usual.
    With ``iterations`` the strategy trains that many mini-batches per experience (set
    ``train_epochs=1``).
    """

    def __init__(self, stream: Stream, batch_size: int, *, iterations: Optional[int] = None,
                 seed: int = 0, joint: bool = False):
        super().__init__()
        self.stream, self.batch_size, self.iterations, self.joint = stream, batch_size, iterations, joint
        self.generator = torch.Generator().manual_seed(seed)

    def before_training_exp(self, strategy, **kwargs):
        i = strategy.experience.current_experience
        tasks = self.stream.tasks[: i + 1] if self.joint else [self.stream.tasks[i]]
        x = torch.cat([t.x_train for t in tasks])
        y = torch.cat([t.y_train for t in tasks])
        loader = TensorBatches(x, y, tasks[-1].task_label, self.batch_size,
                               iterations=self.iterations, generator=self.generator,
                               device=strategy.device)
        if self.joint:  # every sample keeps its own task label
            loader.t = torch.cat([torch.full((len(t.y_train),), t.task_label, dtype=torch.long)
                                  for t in tasks]).to(strategy.device)
        strategy.dataloader = loader
