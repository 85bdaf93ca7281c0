"""Run in a spawned process by test_distributed.py: one DDP rank training with SIPlugin."""

import contextlib
import os
import warnings

# Avalanche imports qpsolvers, which warns once per process; each rank is a new process
warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)


@contextlib.contextmanager
def _process_group(rank, world_size, port):
    """This rank in a gloo group on this machine, destroyed on the way out."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def train_rank(rank, world_size, port, out_dir, consolidate=None):
    import torch

    from conftest import make_stream, make_tasks, mlp, strategy, train_stream
    from avalanche_si import SIPlugin

    with _process_group(rank, world_size, port):
        model = torch.nn.parallel.DistributedDataParallel(mlp())
        si = SIPlugin(2.0, groups={"body": ["0", "2"], "head": ["4"]}, importance="task",
                      consolidate=consolidate)
        train_stream(strategy(model, torch.optim.Adam(model.parameters(), lr=0.05), [si], mb=4),
                     make_stream(make_tasks()))
        torch.save({"omega": {g: si.importances(g) for g in ("body", "head")},
                    "consolidations": si.state_dict()["consolidations"],
                    "weights": {n: p.detach() for n, p in model.module.named_parameters()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))


def train_rank_loop(rank, world_size, port, out_dir):
    """The same with SynapticIntelligence in a plain loop (each rank takes every other sample)."""
    import torch

    from conftest import make_tasks, mlp, train_loop
    from avalanche_si import SynapticIntelligence

    with _process_group(rank, world_size, port):
        model = torch.nn.parallel.DistributedDataParallel(mlp())
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        si = SynapticIntelligence(model, opt, si_lambda=2.0, importance="delta_params",
                                  groups={"body": ["0", "2"], "head": ["4"]})
        tasks = [(x[rank::world_size], y[rank::world_size], t) for x, y, t in make_tasks()]
        train_loop(model, opt, tasks, si, mb=4)
        torch.save({"omega": {g: si.importances(g) for g in ("body", "head")},
                    "consolidations": si.consolidations,
                    "weights": {n: p.detach() for n, p in model.module.named_parameters()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))


def train_rank_family(rank, world_size, port, out_dir, importance):
    """Benzing's variants in a plain loop: each rank takes every other sample of the step's
    mini-batch and of the independent one (whose loss goes through the unwrapped module)."""
    import torch

    from conftest import make_tasks, mlp
    from avalanche_si import SynapticIntelligence
    from test_estimators import C, XI, _draws

    with _process_group(rank, world_size, port):
        model = torch.nn.parallel.DistributedDataParallel(mlp())
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        si = SynapticIntelligence(model, opt, si_lambda=C, eps=XI, importance=importance)
        ce = torch.nn.CrossEntropyLoss()
        tasks = make_tasks()
        for (x_all, y_all, _), task_draws in zip(tasks, _draws(tasks)):
            si.start_task()
            k = 0
            for _ in range(2):
                for i in range(0, len(x_all), 8):
                    opt.zero_grad()
                    if importance in ("siu", "sib"):
                        u = task_draws[k][rank::world_size]
                        si.record_independent_gradient(ce(model.module(x_all[u]), y_all[u]))
                    k += 1
                    rows = torch.arange(i, i + 8)[rank::world_size]
                    ce(model(x_all[rows]), y_all[rows]).backward()
                    si.before_step()
                    opt.step()
                    si.after_step()
            si.end_task()
        torch.save({"omega": si.importances(),
                    "weights": {n: p.detach() for n, p in model.module.named_parameters()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))


def train_rank_no_sync(rank, world_size, port, out_dir, importance):
    """A plain loop under DDP(gradient_as_bucket_view=True), two micro-batches per step, the
    first under no_sync(), SI's calls around each: after the synchronising backward pass DDP
    hands out new gradient tensors (views of its buckets)."""
    import torch

    from conftest import make_tasks, mlp
    from avalanche_si import SynapticIntelligence

    with _process_group(rank, world_size, port):
        model = mlp()
        net = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        si = SynapticIntelligence(net, opt, si_lambda=2.0, eps=0.1, importance=importance)
        ce = torch.nn.CrossEntropyLoss()
        for x, y, _ in make_tasks():
            x, y = x[rank::world_size], y[rank::world_size]
            si.start_task()
            for i in range(0, len(x), 4):
                opt.zero_grad()
                with net.no_sync():
                    (ce(net(x[i:i + 2]), y[i:i + 2]) / 2).backward()
                si.before_step()
                si.after_step()  # no step: accumulating
                (ce(net(x[i + 2:i + 4]), y[i + 2:i + 4]) / 2).backward()
                si.before_step()
                opt.step()
                si.after_step()
            si.end_task()
        torch.save({"omega": si.importances(),
                    "weights": {n: p.detach() for n, p in model.named_parameters()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
