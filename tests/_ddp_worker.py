"""Run in a spawned process by test_distributed.py: one DDP rank training with SIPlugin."""

import os
import warnings


def train_rank(rank, world_size, port, out_dir, consolidate=None):
    warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)
    import torch
    import torch.distributed as dist

    from conftest import make_stream, make_tasks, mlp, strategy, train_stream
    from avalanche_si import SIPlugin

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = torch.nn.parallel.DistributedDataParallel(mlp())
        si = SIPlugin(2.0, groups={"body": ["0", "2"], "head": ["4"]}, importance="task",
                      consolidate=consolidate)
        train_stream(strategy(model, torch.optim.Adam(model.parameters(), lr=0.05), [si], mb=4),
                     make_stream(make_tasks()))
        torch.save({"omega": {g: si.importances(g) for g in ("body", "head")},
                    "consolidations": si.state_dict()["consolidations"],
                    "weights": {n: p.detach() for n, p in model.module.named_parameters()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def train_rank_loop(rank, world_size, port, out_dir):
    """The same with SynapticIntelligence in a plain loop (each rank takes every other sample)."""
    warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)
    import torch
    import torch.distributed as dist

    from conftest import make_tasks, mlp, train_loop
    from avalanche_si import SynapticIntelligence

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
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
    finally:
        dist.destroy_process_group()
