"""What SI costs per training step, and what a whole run costs through Avalanche.

    python -m experiments.bench_overhead            # the full table (about 10 minutes)
    python -m experiments.bench_overhead --quick    # a smaller one (about a minute)
    python -m experiments.bench_overhead --threads 1   # the same with one torch thread
    python -m experiments.bench_overhead --device cuda --amp   # on a GPU, mixed precision
    python -m experiments.bench_overhead --baseline v0.1.0   # the previous release beside this

Part 1, per step: one training iteration of an MLP (Adam, batch 128, data already in
memory: random inputs and random labels from two pools of coprime sizes, so that an input
comes back with other labels and no variant can fit them and see its gradients underflow,
which slows Adam several-fold without SI's penalty) run exactly as Avalanche's ``SGDUpdate.training_epoch`` runs it (zero_grad,
forward, ``before_backward``, backward, ``after_backward``, ``before_update``, step,
``after_update``, ``after_training_iteration``), with the plugin's hooks called in that
order. Every variant runs with the penalty active (after one consolidation), the worst
case. Variants are interleaved, repeated, and the median is reported, so the ratios are
measured side by side under the same machine load. Memory: persistent extra state (bytes
the plugin keeps) and peak extra bytes allocated within one step beyond the plain step's
peak (every tensor allocation traced with a ``TorchDispatchMode``). Minor page faults per
step are counted too (a count, not a time, so it holds under load): on a CPU, glibc can hand
a freed temporary back to the OS and fault it in again at the next step's allocation.

Part 2, inside a real strategy (target 1 of the performance issue as worded): four Avalanche
``Naive`` strategies, without SI, with ``SIPlugin``, with ``SIPlugin`` on its ``_foreach`` path
only (its one-pass C kernels switched off) and with Avalanche's own SI plugin, timed in turn in
chunks of iterations. In the same run, SIPlugin's two passes over the weights are also timed
alone on tensors of the model's shapes (cold cache): a floor for its overhead in the strategy,
to set against a quarter of Avalanche's plugin's overhead (the issue's ratio target).

Part 3, end to end (target 4 of the performance issue): van de Ven's split-MNIST protocol
(5 tasks x ``--iterations`` mini-batches, 784-400-400, Adam) through an Avalanche ``Naive``
strategy with ``SIPlugin`` on the in-memory stream, against a bare PyTorch loop doing the
same training on the same preloaded tensors with the same SI maths (the functional core).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
import statistics
import time
import warnings
import weakref
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

warnings.filterwarnings("ignore")

from avalanche.training.plugins import SynapticIntelligencePlugin  # noqa: E402

from avalanche_si import SIPlugin, _fused  # noqa: E402


def mlp(widths: list[int]) -> torch.nn.Sequential:
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


class LoopSI:
    """The plain per-parameter Python loop (the obvious implementation), as a plugin."""

    def __init__(self, c: float, eps: float):
        self.c, self.eps = c, eps

    def before_training_exp(self, s):
        self.params = [p for p in s.model.parameters() if p.requires_grad]
        self.prev = [p.detach().clone() for p in self.params]
        self.omega = [torch.zeros_like(p) for p in self.params]
        self.running = [torch.zeros_like(p) for p in self.params]

    def before_backward(self, s):
        s.loss = s.loss + self.c * sum((o * (p - q) ** 2).sum()
                                       for o, p, q in zip(self.omega, self.params, self.prev))

    def before_update(self, s):
        self.pre = [p.detach().clone() for p in self.params]

    def after_update(self, s):
        for r, p, q in zip(self.running, self.params, self.pre):
            r -= p.grad * (p.detach() - q)

    def after_training_exp(self, s):
        for o, r, p, q in zip(self.omega, self.running, self.params, self.prev):
            o += torch.clamp(r / ((p.detach() - q) ** 2 + self.eps), min=0)
            q.copy_(p.detach())
            r.zero_()


class ForeachSIPlugin(SIPlugin):
    """SIPlugin with its one-pass C kernels switched off: the ``_foreach`` path (what a GPU
    runs), to measure what the kernels win side by side."""

    def after_backward(self, strategy, **kwargs):
        with _fused.disabled():
            super().after_backward(strategy, **kwargs)

    def after_update(self, strategy, **kwargs):
        with _fused.disabled():
            super().after_update(strategy, **kwargs)


HOOKS = ("before_training_exp", "before_training_iteration", "before_backward", "after_backward",
         "before_update", "after_update", "after_training_iteration", "after_training_exp")


def _call(plugins, hook, strategy):
    for p in plugins:
        fn = getattr(p, hook, None)
        if fn is not None:
            fn(strategy)


@dataclass(frozen=True)
class ResNetCase:
    """torchvision's ResNet-18 (10 classes) on random `size`×`size` RGB images."""
    size: int
    batch: int


def _resnet18() -> torch.nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


class Bench:
    """A model, an optimizer, a pool of preloaded batches and a plugin, stepped like
    Avalanche does.

    Inputs and labels are random and come from two pools of coprime sizes (31 and 32), so
    no (input, label) pair repeats within 992 steps and an input comes back with other
    labels: nothing can be fitted. On one fixed batch the model fits it within a few hundred
    steps, its gradients underflow to denormal numbers, and the step *without* SI (whose
    penalty keeps the gradients normal) became about four times slower in Adam, which hid
    part of SI's overhead in earlier versions of this table.
    """

    def __init__(self, widths, plugin_factory, *, batch=128, seed=0, device="cpu", amp=False):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        if isinstance(widths, ResNetCase):  # torchvision's ResNet-18 on synthetic images
            batch, size = widths.batch, widths.size
            self.model = _resnet18().to(self.device)
            shape, outputs = (3, size, size), 10
        else:
            self.model = mlp(widths).to(self.device)
            shape, outputs = (widths[0],), widths[-1]
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.inputs = [torch.randn(batch, *shape, device=self.device) for _ in range(31)]
        self.labels = [torch.randint(0, outputs, (batch,), device=self.device)
                       for _ in range(32)]
        self.step_count = 0
        self.plugins = [plugin_factory()] if plugin_factory else []
        # mixed precision: 16-bit forward under autocast, loss scaled by a GradScaler, which
        # SIPlugin finds on the strategy (here, its stand-in) as users' AMP strategies hold it
        self.amp_dtype = (torch.bfloat16 if self.device.type == "cpu" else torch.float16) \
            if amp else None
        self.s = SimpleNamespace(model=self.model, optimizer=self.opt, loss=None,
                                 device=self.device, plugins=self.plugins,
                                 clock=SimpleNamespace(train_exp_counter=0, train_iterations=0))
        # what SIPlugin's importance="siu"/"sib" reads to draw its independent mini-batch (and
        # then runs: a second forward and backward pass each step, counted in its time)
        s = self.s
        s.train_mb_size, s.mbatch, s.mb_output = batch, None, None
        s.adapted_dataset = torch.utils.data.TensorDataset(torch.cat(self.inputs).cpu(),
                                                           torch.cat(self.labels[:31]).cpu())
        s.forward = lambda: self.model(s.mbatch[0])
        s.criterion = lambda: torch.nn.functional.cross_entropy(s.mb_output, s.mbatch[1])
        if amp:
            self.s.scaler = torch.amp.GradScaler(self.device.type)
        _call(self.plugins, "before_training_exp", self.s)
        self.steps(3)                                    # a short first task ...
        _call(self.plugins, "after_training_exp", self.s)
        self.s.clock.train_exp_counter = 1               # ... so the penalty is active now
        _call(self.plugins, "before_training_exp", self.s)
        self.steps(3)

    def steps(self, n: int) -> None:
        s, plugins, ce = self.s, self.plugins, torch.nn.functional.cross_entropy
        for _ in range(n):
            x = self.inputs[self.step_count % len(self.inputs)]
            y = self.labels[self.step_count % len(self.labels)]
            self.step_count += 1
            _call(plugins, "before_training_iteration", s)
            self.opt.zero_grad()
            if self.amp_dtype is None:
                s.loss = ce(self.model(x), y)
            else:
                with torch.autocast(self.device.type, dtype=self.amp_dtype):
                    s.loss = ce(self.model(x).float(), y)
            _call(plugins, "before_backward", s)
            if self.amp_dtype is None:
                s.loss.backward()
            else:
                s.scaler.scale(s.loss).backward()
            _call(plugins, "after_backward", s)
            _call(plugins, "before_update", s)
            if self.amp_dtype is None:
                self.opt.step()
            else:
                s.scaler.step(self.opt)
                s.scaler.update()
            _call(plugins, "after_update", s)
            _call(plugins, "after_training_iteration", s)
            s.clock.train_iterations += 1

    def persistent_bytes(self) -> int:
        p = self.plugins[0] if self.plugins else None
        if p is None:
            return 0
        if hasattr(p, "engine"):  # SIPlugin: its state, and what importance="task" keeps
            # between steps for the task gradient (the spare tensors; with cuda_graphs the
            # tensors it is copied into)
            spare = [t for g in p.engine._groups
                     for t in (getattr(g, "spare", None) or getattr(g, "task_grads", None) or ())]
            pools = sum(g.graphs.pool_bytes() for g in p.engine._groups  # cuda_graphs' pool
                        if getattr(g, "graphs", None) is not None)
            return pools + sum(b.numel() * b.element_size()
                               for b in [*p.engine._state.store.buffers(), *spare])
        if hasattr(p, "_state"):  # SIPlugin 0.2 (--baseline)
            return sum(b.numel() * b.element_size() for b in p._state.store.buffers())
        if hasattr(p, "_store"):  # SIPlugin of an older version (--baseline)
            return sum(b.numel() * b.element_size() for b in p._store.buffers())
        if isinstance(p, LoopSI):
            return sum(t.numel() * t.element_size() for t in p.prev + p.omega + p.running)
        # Avalanche's: its dicts of ParamData; on a CPU most of them are views of the
        # parameters or their gradients (its aliasing bug), which cost nothing extra.
        shared = {t.untyped_storage().data_ptr() for q in self.model.parameters()
                  for t in (q, q.grad) if t is not None}
        seen, total = set(), 0
        for d in list(p.ewc_data) + list(p.syn_data.values()):
            for v in d.values():
                ptr = v.data.untyped_storage().data_ptr()
                if ptr not in seen and ptr not in shared:
                    seen.add(ptr)
                    total += v.data.untyped_storage().nbytes()
        return total


class PeakAllocations(TorchDispatchMode):
    """Bytes of every tensor storage created inside the block; live total and its peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                storage = t.untyped_storage()
                nbytes = storage.nbytes()
                inputs.add(storage.data_ptr())
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, nbytes)
        return out

    def _free(self, nbytes):
        self.live -= nbytes


def peak_step_bytes(bench: Bench) -> int:
    with PeakAllocations() as tracker:
        bench.steps(1)
    return tracker.peak


def load_baseline(path: str):
    """Another copy of the ``avalanche_si`` package, imported as ``avalanche_si_baseline``
    beside this one, so that both are timed side by side in one run: a folder holding the
    package, or a git revision of this repository (``v0.1.0``), whose ``avalanche_si`` is
    extracted to a temporary folder."""
    import importlib.util
    import os
    import subprocess
    import sys
    import tempfile

    if not os.path.isdir(path):
        tmp = tempfile.mkdtemp(prefix="avalanche_si_baseline_")
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        archive = subprocess.run(["git", "archive", path, "src/avalanche_si"], cwd=here,
                                 capture_output=True)
        inner = "src/avalanche_si"
        if archive.returncode != 0:  # a revision from before the src layout
            archive = subprocess.run(["git", "archive", path, "avalanche_si"], cwd=here,
                                     capture_output=True)
            inner = "avalanche_si"
        if archive.returncode != 0:
            raise SystemExit(f"--baseline {path}: neither a folder nor a git revision of this "
                             f"repository ({archive.stderr.decode().strip()}).")
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        path = os.path.join(tmp, inner)
    init = os.path.join(path, "__init__.py")
    if not os.path.isfile(init):
        raise SystemExit(f"--baseline {path}: no __init__.py there; give the folder of an "
                         "avalanche_si package (e.g. a git worktree's avalanche_si).")
    spec = importlib.util.spec_from_file_location("avalanche_si_baseline", init,
                                                  submodule_search_locations=[path])
    module = importlib.util.module_from_spec(spec)
    sys.modules["avalanche_si_baseline"] = module
    spec.loader.exec_module(module)
    return module


#: the ResNet-18 cases of --resnet
RESNET_CASES = (ResNetCase(32, 128), ResNetCase(224, 64))


def _resnet_cases(args) -> tuple[ResNetCase, ...]:
    """--resnet's cases; with --quick, small ones that check the code path in seconds."""
    return (ResNetCase(32, 8),) if args.quick else RESNET_CASES

VARIANTS = {
    "no SI": None,
    "SIPlugin total": lambda: SIPlugin(1.0, eps=0.1, importance="total"),
    "SIPlugin total, _foreach only": lambda: ForeachSIPlugin(1.0, eps=0.1, importance="total"),
    "SIPlugin task": lambda: SIPlugin(1.0, eps=0.1, importance="task"),
    # the step work replayed as CUDA graphs (on a CPU the option changes nothing)
    "SIPlugin total, CUDA graphs": lambda: SIPlugin(1.0, eps=0.1, importance="total",
                                                    cuda_graphs=True),
    "SIPlugin task, CUDA graphs": lambda: SIPlugin(1.0, eps=0.1, importance="task",
                                                   cuda_graphs=True),
    "SIPlugin delta_params": lambda: SIPlugin(1.0, eps=0.1, importance="delta_params"),
    # Benzing's variants; siu and sib draw and differentiate a second mini-batch each step
    "SIPlugin siu": lambda: SIPlugin(1.0, eps=0.1, importance="siu"),
    "SIPlugin sib": lambda: SIPlugin(1.0, eps=0.1, importance="sib"),
    "SIPlugin sos": lambda: SIPlugin(1.0, eps=0.1, importance="sos"),
    "Avalanche SI plugin": lambda: SynapticIntelligencePlugin(si_lambda=2.0, eps=0.1),
    "plain Python loop": lambda: LoopSI(1.0, 0.1),
}


@dataclass
class Row:
    model: str
    n: int
    tensors: int
    variant: str
    median_ms: float
    min_ms: float
    max_ms: float
    overhead: float
    persistent: int
    peak_extra: int
    faults: float
    graphs: str = ""  # cuda_graphs: how many hook calls replayed a graph


def graph_use(plugins) -> str:
    """How the CUDA graphs of an SIPlugin with cuda_graphs=True were used, else ''."""
    from avalanche_si.graphs import summary

    return "; ".join(filter(None, (summary(p.engine) for p in plugins
                                   if getattr(p, "cuda_graphs", False))))


def _sync(device) -> None:
    """Wait for the device's queued work, so wall time measures it (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def bench_model(name, widths, *, repeats, steps, device="cpu", amp=False,
                variants=None) -> list[Row]:
    variants = variants or VARIANTS
    benches = {v: Bench(widths, f, device=device, amp=amp) for v, f in variants.items()}
    times = {v: [] for v in variants}
    faults = {v: 0 for v in variants}
    for _ in range(repeats):  # interleaved: every variant sees the same machine load
        for v, b in benches.items():
            _sync(device)
            f0, t0 = _minor_faults(), time.perf_counter()
            b.steps(steps)
            _sync(device)
            times[v].append((time.perf_counter() - t0) / steps * 1e3)
            faults[v] += _minor_faults() - f0
    base_peak = peak_step_bytes(benches["no SI"])
    base = statistics.median(times["no SI"])
    n = sum(p.numel() for p in benches["no SI"].model.parameters())
    k = len(list(benches["no SI"].model.parameters()))
    rows = []
    for v, b in benches.items():
        med = statistics.median(times[v])
        rows.append(Row(name, n, k, v, med, min(times[v]), max(times[v]), med / base - 1,
                        b.persistent_bytes(), max(0, peak_step_bytes(b) - base_peak),
                        faults[v] / (repeats * steps), graph_use(b.plugins)))
    return rows


def _naive_strategy(stream, hidden: int, iterations: int, si_plugin=None, device="cpu"):
    """An Avalanche ``Naive`` strategy on ``stream``: 784-H-H MLP (seed 0), Adam lr 1e-3,
    batch 128, ``iterations`` mini-batches per ``train`` call, ``si_plugin`` (if any) first."""
    from avalanche.training import Naive

    from .models import SharedHeadNet
    from .streams import FastTensorLoader

    torch.manual_seed(0)
    model = SharedHeadNet(784, (hidden, hidden), 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    plugins = [FastTensorLoader(stream, 128, iterations=iterations)]
    if si_plugin is not None:
        plugins.insert(0, si_plugin)
    return Naive(model=model, optimizer=opt, train_mb_size=128, train_epochs=1,
                 plugins=plugins, evaluator=None, device=device)


def end_to_end(iterations: int, repeats: int, data_root: str, hidden: int = 400,
               device="cpu") -> dict:
    """Target 4: Avalanche + SIPlugin vs bare loops, split MNIST (van de Ven), same run.

    Also times the same Avalanche strategy without SI, so the SI overhead *inside a real
    strategy* (target 1's wording) is measured too.
    """
    from avalanche_si import functional as F
    from .models import SharedHeadNet
    from .streams import TensorBatches, make_stream

    stream = make_stream("split-mnist", "domain", root=data_root, seed=0)

    def avalanche_run(with_si: bool):
        strat = _naive_strategy(stream, hidden, iterations,
                                SIPlugin(500.0, eps=0.1) if with_si else None, device=device)
        for exp in stream.benchmark.train_stream:
            strat.train(exp, eval_streams=[], num_workers=0)

    def bare_run(with_si: bool):
        torch.manual_seed(0)
        model = SharedHeadNet(784, (hidden, hidden), 2).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        params = list(model.parameters())
        g = torch.Generator().manual_seed(0)
        for t, task in enumerate(stream.tasks):
            for x, y, _ in TensorBatches(task.x_train, task.y_train, t, 128,
                                         iterations=iterations, generator=g):
                opt.zero_grad()
                x, y = x.to(device), y.to(device)
                loss = torch.nn.functional.cross_entropy(model(x), y)
                if with_si and t:
                    loss = loss + 500.0 * F.si_regularizer(model, params)
                loss.backward()
                if with_si:
                    F.si_pre_optim_step(model, params)
                opt.step()
                if with_si:
                    F.si_post_optim_step(model, params)
            if with_si:
                F.si_compute_importance(model, params, epsilon=0.1)

    runs = {"Avalanche Naive + SIPlugin": lambda: avalanche_run(True),
            "Avalanche Naive, no SI": lambda: avalanche_run(False),
            "bare loop + functional SI": lambda: bare_run(True),
            "bare loop, no SI": lambda: bare_run(False)}
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _time_in_turn(strategies: dict, experience, *, chunk: int, repeats: int,
                  device) -> dict:
    """Train each strategy on `experience` in turn, `repeats` times (who goes first rotates,
    so all share the machine's load); per-iteration (median, min, max) ms per strategy, for
    `chunk` iterations per `train` call."""
    times = {k: [] for k in strategies}
    names = list(strategies)
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            _sync(device)
            t0 = time.perf_counter()
            strategies[k].train(experience, eval_streams=[], num_workers=0)
            _sync(device)
            times[k].append((time.perf_counter() - t0) / chunk * 1e3)
    return {k: (statistics.median(v), min(v), max(v)) for k, v in times.items()}


def in_strategy(hidden: int, *, chunk: int, repeats: int, data_root: str, device="cpu",
                baseline=None) -> dict:
    """Target 1 as worded: SIPlugin's per-iteration overhead over *the same Avalanche
    strategy without it*.

    Three ``Naive`` strategies on the in-memory split-MNIST stream (Domain-IL, 784-H-H, Adam,
    batch 128), identical but for the plugin: none, ``SIPlugin(c=500, xi=0.1)`` and
    Avalanche's ``SynapticIntelligencePlugin`` (λ = 2c, the same penalty). All are trained on
    task 1 first (so the penalty is active), then timed in turn on task 2 in chunks of
    ``chunk`` iterations (one ``train`` call each, whose per-experience work, consolidation
    included, is part of the time; the order rotates every repeat). Returns per-iteration
    (median, min, max) in ms per strategy, and the number of weights under ``"n"``.
    """
    from .streams import make_stream

    stream = make_stream("split-mnist", "domain", root=data_root, seed=0)
    exps = list(stream.benchmark.train_stream)

    def strategy(si_plugin):
        strat = _naive_strategy(stream, hidden, chunk, si_plugin, device=device)
        strat.train(exps[0], eval_streams=[], num_workers=0)
        return strat

    strategies = {"Avalanche Naive, no SI": strategy(None),
                  "Avalanche Naive + SIPlugin": strategy(SIPlugin(500.0, eps=0.1)),
                  "Avalanche Naive + SIPlugin, _foreach only":
                      strategy(ForeachSIPlugin(500.0, eps=0.1)),
                  "Avalanche Naive + Avalanche's SI plugin":
                      strategy(SynapticIntelligencePlugin(si_lambda=1000.0, eps=0.1))}
    if baseline is not None:
        strategies["Avalanche Naive + SIPlugin (baseline)"] = strategy(
            baseline.SIPlugin(500.0, eps=0.1))
    out = _time_in_turn(strategies, exps[1], chunk=chunk, repeats=repeats, device=device)
    params = list(strategies["Avalanche Naive, no SI"].model.parameters())
    out["n"] = sum(p.numel() for p in params)
    out["passes alone"] = passes_alone([p.shape for p in params], repeats=max(repeats, 15),
                                       device=device)
    return out


def resnet_in_strategy(case: ResNetCase, *, chunk: int, repeats: int, device="cpu") -> dict:
    """ResNet-18 inside Avalanche's `Naive`, as users train it: random images kept as host
    tensors in an Avalanche benchmark, moved by Avalanche's loader each mini-batch. Three
    strategies, identical but for the plugin (none, `SIPlugin(c=1, xi=0.1)`, Avalanche's
    plugin with λ = 2c), each trained on the first experience (so the penalty is active),
    then timed in turn on the second in chunks of `chunk` iterations. Returns per-iteration
    (median, min, max) in ms per strategy."""
    from avalanche.benchmarks import tensors_benchmark
    from avalanche.training import Naive

    g = torch.Generator().manual_seed(0)
    n = case.batch * chunk
    data = [(torch.randn(n, 3, case.size, case.size, generator=g),
             torch.randint(0, 10, (n,), generator=g)) for _ in range(2)]
    bench = tensors_benchmark(train_tensors=data, test_tensors=data, task_labels=[0, 0],
                              complete_test_set_only=False)
    exps = list(bench.train_stream)

    def strategy(si_plugin):
        torch.manual_seed(0)
        model = _resnet18()
        strat = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                      train_mb_size=case.batch, train_epochs=1, device=device,
                      plugins=[si_plugin] if si_plugin is not None else [],
                      evaluator=None)
        strat.train(exps[0], eval_streams=[], num_workers=0)
        return strat

    strategies = {"no SI": strategy(None), "SIPlugin": strategy(SIPlugin(1.0, eps=0.1)),
                  "SIPlugin, CUDA graphs": strategy(SIPlugin(1.0, eps=0.1, cuda_graphs=True)),
                  "Avalanche's SI plugin": strategy(
                      SynapticIntelligencePlugin(si_lambda=2.0, eps=0.1))}
    out = _time_in_turn(strategies, exps[1], chunk=chunk, repeats=repeats, device=device)
    out["graphs"] = graph_use(strategies["SIPlugin, CUDA graphs"].plugins)
    return out


def online_overhead(hidden: int, *, chunk: int, repeats: int, data_root: str,
                    device="cpu") -> dict:
    """Issue 17's target: an online run with SI against the same run without it.

    Avalanche's online split MNIST (Domain-IL, ``split_online_stream``, mini-experiences of 10
    samples, batch 10, one step each), 784-H-H, Adam: ``Naive`` without SI and with
    ``SIPlugin`` under each consolidation policy, each on its own copy of the stream, timed in
    turn over ``chunk`` mini-experiences (rotating who goes first). Also the cost of one
    consolidation (``consolidate_now``) on this model, timed alone.
    """
    from avalanche.benchmarks.scenarios.online import split_online_stream

    from avalanche_si.consolidation import LossPlateau
    from .online import _decorated
    from .streams import make_stream

    stream = make_stream("split-mnist", "domain", root=data_root, seed=0)

    def sub_experiences(boundaries):
        while True:  # as long as the timing needs
            for e in split_online_stream(stream.benchmark.train_stream, experience_size=10,
                                         shuffle=True, seed=0,
                                         access_task_boundaries=boundaries):
                yield _decorated(e, list(e.dataset.targets),
                                 list(e.dataset.targets_task_labels))

    variants = {"no SI": (None, False),
                "SIPlugin, task boundaries": (lambda: SIPlugin(10.0, eps=0.1), True),
                "SIPlugin, every 100 steps": (lambda: SIPlugin(10.0, eps=0.1, consolidate=100),
                                              False),
                "SIPlugin, loss plateau": (lambda: SIPlugin(
                    10.0, eps=0.1, consolidate=LossPlateau(100, 0.1, 0.005)), False)}
    runs = {}
    for name, (factory, boundaries) in variants.items():
        from avalanche.training import Naive
        from .models import SharedHeadNet

        torch.manual_seed(0)
        model = SharedHeadNet(784, (hidden, hidden), 2)
        si = factory() if factory else None
        strat = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                      train_mb_size=10, plugins=[si] if si else [], evaluator=None,
                      device=device)
        runs[name] = (strat, sub_experiences(boundaries), si)
    times = {k: [] for k in runs}
    names = list(runs)
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            strat, exps, _ = runs[k]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(chunk):
                strat.train(next(exps), eval_streams=[], num_workers=0)
            _sync(device)
            times[k].append((time.perf_counter() - t0) / chunk * 1e3)
    out = {k: (statistics.median(v), min(v), max(v)) for k, v in times.items()}
    out["consolidations"] = {k: runs[k][2].consolidations for k in names if runs[k][2]}
    si = runs["SIPlugin, every 100 steps"][2]
    calls = []
    for _ in range(max(repeats, 15)):
        _sync(device)
        t0 = time.perf_counter()
        si.consolidate_now()
        _sync(device)
        calls.append((time.perf_counter() - t0) * 1e3)
    out["consolidate_now ms"] = statistics.median(calls)
    out["n"] = sum(p.numel() for p in runs["no SI"][0].model.parameters())
    out["steps"] = repeats * chunk
    return out


def passes_alone(shapes, *, repeats: int, device="cpu") -> float:
    """Median ms of ``SIPlugin``'s per-step work alone (``importance="total"``): the penalty
    pass (g += 2cΩ(θ − θ*), θ_pre = θ, the penalty's sum) and the importance pass
    (ω += g·(θ_pre − θ)), on tensors of the given shapes, through the functional calls the
    plugin makes (the C kernels where they run). Before each repeat a 64 MiB buffer is
    written, untimed, so SI's state is not in the cache, as in training, where the optimizer's
    step and the forward and backward passes come between two steps' passes.
    """
    from avalanche_si import functional as F

    g = torch.Generator().manual_seed(0)
    lists = [[(torch.randn(s, generator=g) * 1e-2).to(device) for s in shapes] for _ in range(6)]
    grads, omega, params, prev, pre, running = lists
    omega = [o.abs() for o in omega]
    junk = torch.empty(16 * 2 ** 20, device=device)
    times = []
    for _ in range(repeats):
        junk.fill_(1.0)
        _sync(device)
        t0 = time.perf_counter()
        _, value = F.penalty_step(grads, omega, params, prev, strength=500.0, pre=pre)
        F.accumulate_from_pre(running, grads, pre, params)
        _sync(device)
        times.append(time.perf_counter() - t0)
        del value
    return statistics.median(times) * 1e3


def _mib(b: int) -> str:
    return f"{b / 2 ** 20:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_overhead",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, no H=2000, short e2e")
    ap.add_argument("--repeats", type=int, default=None,
                    help="interleaved repeats of the per-step table and chunks of the in-strategy "
                         "one (default 15, 5 with --quick); more average out a machine whose "
                         "speed drifts")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end comparison")
    ap.add_argument("--no-steps", action="store_true", help="skip the per-step table")
    ap.add_argument("--e2e-iterations", type=int, default=2000, help="iterations per task")
    ap.add_argument("--e2e-hidden", type=int, nargs="+", default=[400])
    ap.add_argument("--no-strategy", action="store_true",
                    help="skip the overhead inside an Avalanche strategy (target 1 as worded)")
    ap.add_argument("--strategy-hidden", type=int, nargs="+", default=[400, 1000])
    ap.add_argument("--no-mnist", action="store_true",
                    help="skip what reads MNIST (the split-MNIST strategy table, the online "
                         "table, the end-to-end run), for a machine without the data; "
                         "--resnet's tables use random images")
    ap.add_argument("--no-online", action="store_true",
                    help="skip the online-stream table (SI per consolidation policy)")
    ap.add_argument("--device", default="cpu",
                    help="where to run (cpu, cuda, cuda:1 ...); default cpu")
    ap.add_argument("--amp", action="store_true",
                    help="mixed precision in the per-step table: autocast (bfloat16 on the CPU, "
                         "float16 on a GPU) and a GradScaler, for every variant alike")
    ap.add_argument("--baseline", metavar="REV", default=None,
                    help="another avalanche_si to time beside this one, in the same run (per-"
                         "step and in-strategy tables): a git revision of this repository "
                         "(v0.1.0, the previous release) or the folder of a package")
    ap.add_argument("--save", metavar="NAME", default=None,
                    help="also write the output to results/bench_overhead/NAME.txt (what the "
                         "docs' performance page shows) and its provenance (date, commit, "
                         "machine, threads) to NAME.json")
    ap.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                    help=f"time only these variants of the per-step table ('no SI' is always "
                         f"timed); default all: {', '.join(VARIANTS)}")
    ap.add_argument("--resnet", action="store_true",
                    help="add torchvision's ResNet-18 to the per-step table (random images on "
                         "the device: 32x32 at batch 128, 224x224 at batch 64) and time it "
                         "inside Avalanche's Naive, whose loader moves host tensors (meant for "
                         "a GPU: minutes per repeat on a CPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's own choice, one per core); the "
                         "relative overhead depends on it, since SI's elementwise passes and "
                         "the matrix products scale differently with threads")
    args = ap.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available here")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    unknown = sorted(set(args.variants or ()) - set(VARIANTS))
    if unknown:
        ap.error(f"--variants {' '.join(unknown)}: not a variant; choose from "
                 f"{', '.join(map(repr, VARIANTS))}")
    if args.repeats is not None and args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.save is None:
        return _main(args)
    import contextlib
    import json
    import os
    import sys

    from .options import Tee, rerun_command
    from .run import CODE_COMMIT

    # the command, without where the data lie or where output goes
    command = rerun_command("experiments.bench_overhead",
                            argv if argv is not None else sys.argv[1:],
                            drop=("--data-root", "--save"))
    buffer = Tee(sys.__stdout__)
    with contextlib.redirect_stdout(buffer):
        print(f"$ {command}")
        code = _main(args)
    out = Path("results") / "bench_overhead"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.save}.txt").write_text(buffer.getvalue())
    (out / f"{args.save}.json").write_text(json.dumps({
        "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": CODE_COMMIT,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "device": args.device, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}, indent=1))
    return code


def _main(args) -> int:
    from .options import default_data_root

    if args.amp and not args.no_e2e and not args.no_mnist:
        print("# --amp applies to the per-step table only; the end-to-end table runs in float32")
    variants = {k: v for k, v in VARIANTS.items()
                if args.variants is None or k == "no SI" or k in args.variants}
    baseline = load_baseline(args.baseline) if args.baseline else None
    if baseline is not None:  # the same modes of the baseline's SIPlugin (total and task
        # unless --variants names others)
        chosen = [k.split()[1] for k in variants if k.startswith("SIPlugin ") and "," not in k]
        for mode in chosen if args.variants else ["total", "task"]:
            variants[f"SIPlugin {mode} (baseline)"] = functools.partial(
                baseline.SIPlugin, 1.0, eps=0.1, importance=mode)

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    models = [("MLP H=400", [784, 400, 400, 10]), ("MLP H=1000", [784, 1000, 1000, 10]),
              ("MLP H=2000", [784, 2000, 2000, 10]),
              ("deep MLP 32x256", [784] + [256] * 31 + [10])]
    if args.quick:
        models = [m for m in models if "2000" not in m[0]]
    if args.resnet:
        models += [(f"ResNet-18 {c.size}x{c.size}, batch {c.batch}", c) for c in _resnet_cases(args)]
    repeats = args.repeats or (5 if args.quick else 15)
    if args.no_steps:
        models = []
    graph_notes: list[str] = []
    threads = torch.get_num_threads()
    print(f"# torch {torch.__version__}, {threads} thread{'s' if threads != 1 else ''}, "
          f"device {args.device}"
          + (", mixed precision (--amp)" if args.amp else ""))
    if models:
        print(f"\n# SI per-step overhead: Adam, batch 128, penalty active; median of {repeats} "
              "interleaved repeats")
        print("| model | n weights | tensors | variant | ms/iter median (min-max) | overhead | "
              "persistent extra MiB (x n floats) | peak extra MiB/step | page faults/step |")
        print("|---|---|---|---|---|---|---|---|---|")
    for name, widths in models:
        n = 11.2e6 if isinstance(widths, ResNetCase) else \
            sum(a * b for a, b in zip(widths[:-1], widths[1:]))
        steps = 5 if args.quick else max(4, min(20, int(2e7 / n)))  # ~ the same time per variant
        for r in bench_model(name, widths, repeats=repeats, steps=steps, device=args.device,
                             amp=args.amp, variants=variants):
            mult = r.persistent / (4 * r.n)
            print(f"| {r.model} | {r.n / 1e6:.2f}M | {r.tensors} | {r.variant} | {r.median_ms:.2f} "
                  f"({r.min_ms:.2f}-{r.max_ms:.2f}) | {100 * r.overhead:+.1f}% | "
                  f"{_mib(r.persistent)} ({mult:.2f}n) | {_mib(r.peak_extra)} | {r.faults:.0f} |",
                  flush=True)
            if r.graphs:
                graph_notes.append(f"{r.model}, {r.variant}: {r.graphs}")
    if graph_notes:  # whether the graphs were replayed, or the eager path was timed
        print("\nCUDA graphs, per variant (warm-up included): " + "; ".join(graph_notes) + ".")
    if not args.no_strategy and not args.no_mnist:
        chunk, reps = (50, 5) if args.quick else (200, 15)
        reps = args.repeats or reps
        print(f"\n# SI overhead inside an Avalanche strategy: Naive on split MNIST (Domain-IL, "
              f"task 2, penalty active), 784-H-H, Adam, batch 128, c = 500; median (min-max) "
              f"of {reps} alternating chunks of {chunk} iterations")
        print("| H | n weights | Avalanche Naive, no SI, ms/iter | + SIPlugin, ms/iter | "
              "overhead | + SIPlugin, _foreach only, ms/iter | overhead | + Avalanche's SI "
              "plugin, ms/iter | overhead | SIPlugin's overhead / Avalanche's | SIPlugin's two "
              "passes alone, ms | ¼ of Avalanche's overhead, ms |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for hidden in ([400] if args.quick else args.strategy_hidden):
            t = in_strategy(hidden, chunk=chunk, repeats=reps,
                            data_root=args.data_root or default_data_root(),
                            device=args.device, baseline=baseline)
            cells = [t[k] for k in ("Avalanche Naive, no SI", "Avalanche Naive + SIPlugin",
                                    "Avalanche Naive + SIPlugin, _foreach only",
                                    "Avalanche Naive + Avalanche's SI plugin")]
            b, ours, foreach, theirs = (m for m, _, _ in cells)
            text = [f"{m:.2f} ({lo:.2f}-{hi:.2f})" for m, lo, hi in cells]
            print(f"| {hidden} | {t['n'] / 1e6:.2f}M | {text[0]} | {text[1]} | "
                  f"{100 * (ours / b - 1):+.1f}% | {text[2]} | {100 * (foreach / b - 1):+.1f}% | "
                  f"{text[3]} | {100 * (theirs / b - 1):+.1f}% | "
                  f"{(ours - b) / (theirs - b):.2f} | {t['passes alone']:.2f} | "
                  f"{(theirs - b) / 4:.2f} |", flush=True)
            old = t.get("Avalanche Naive + SIPlugin (baseline)")
            if old is not None:
                print(f"|   | baseline | | {old[0]:.2f} ({old[1]:.2f}-{old[2]:.2f}) | "
                      f"{100 * (old[0] / b - 1):+.1f}% | this SIPlugin / baseline: "
                      f"{ours / old[0]:.3f} | | | | | | |", flush=True)
    if args.resnet and not args.no_strategy:
        chunk, reps = (5, 3) if args.quick else (20, 7)
        reps = args.repeats or reps
        print(f"\n# ResNet-18 inside Avalanche's Naive (random images as host tensors, "
              f"Avalanche's loader, Adam, penalty active); median (min-max) of {reps} "
              f"alternating chunks of {chunk} iterations")
        keys = ("no SI", "SIPlugin", "SIPlugin, CUDA graphs", "Avalanche's SI plugin")
        print("| case | no SI, ms/iter | " + " | ".join(f"+ {k}, ms/iter | overhead"
                                                      for k in keys[1:]) + " | CUDA graphs |")
        print("|---|---|" + "---|---|" * (len(keys) - 1) + "---|")
        for case in _resnet_cases(args):
            t = resnet_in_strategy(case, chunk=chunk, repeats=reps, device=args.device)
            b = t["no SI"][0]
            cells = [f"{t[k][0]:.2f} ({t[k][1]:.2f}-{t[k][2]:.2f}) | "
                     f"{100 * (t[k][0] / b - 1):+.1f}%" for k in keys[1:]]
            print(f"| {case.size}x{case.size}, batch {case.batch} | "
                  f"{t['no SI'][0]:.2f} ({t['no SI'][1]:.2f}-{t['no SI'][2]:.2f}) | "
                  + " | ".join(cells) + f" | {t['graphs']} |", flush=True)
    if not args.no_online and not args.no_mnist:
        chunk, reps = (100, 3) if args.quick else (300, 9)
        reps = args.repeats or reps
        t = online_overhead(400, chunk=chunk, repeats=reps,
                            data_root=args.data_root or default_data_root(), device=args.device)
        base = t["no SI"][0]
        print(f"\n# SI on an online stream: Avalanche's online split MNIST (Domain-IL, "
              f"mini-experiences of 10 samples, one step each), 784-400-400 ({t['n'] / 1e6:.2f}M "
              f"weights), Adam, c = 10; median (min-max) of {reps} alternating chunks of {chunk} "
              f"mini-experiences")
        print("| run | ms per mini-experience | vs no SI | consolidations in "
              f"{t['steps']} steps |")
        print("|---|---|---|---|")
        for k in ("no SI", "SIPlugin, task boundaries", "SIPlugin, every 100 steps",
                  "SIPlugin, loss plateau"):
            m, lo, hi = t[k]
            print(f"| {k} | {m:.2f} ({lo:.2f}-{hi:.2f}) | {m / base:.2f} | "
                  f"{t['consolidations'].get(k, '')} |", flush=True)
        print(f"\nOne consolidation (`consolidate_now`, every group, checked): "
              f"{t['consolidate_now ms']:.2f} ms on these {t['n'] / 1e6:.2f}M weights.")
    if not args.no_e2e and not args.no_mnist:
        iterations = 200 if args.quick else args.e2e_iterations
        reps = 1 if args.quick else 3
        for hidden in ([400] if args.quick else args.e2e_hidden):
            t = end_to_end(iterations, reps, args.data_root or default_data_root(), hidden,
                           device=args.device)
            base, plain = t["bare loop + functional SI"], t["bare loop, no SI"]
            av = t["Avalanche Naive, no SI"]
            print(f"\n# End to end: split MNIST (van de Ven protocol), 5 tasks x {iterations} "
                  f"iterations, 784-{hidden}-{hidden}, Adam, batch 128, c = 500; median of {reps} "
                  "interleaved runs")
            print("| run | seconds | ms/iteration | vs bare loop + SI | vs bare loop, no SI | "
                  "vs Avalanche Naive, no SI |")
            print("|---|---|---|---|---|---|")
            for k, v in t.items():
                print(f"| {k} | {v:.1f} | {1e3 * v / (5 * iterations):.2f} | {v / base:.2f} | "
                      f"{v / plain:.2f} | {v / av:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
