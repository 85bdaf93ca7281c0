"""SI's memory per rank on a model sharded with FSDP2, against the number of ranks.

``python -m experiments.sharded_memory [--widths 784 400 400 10] [--worlds 1 2 4] [--save NAME]``

For each world size, that many gloo processes on this machine shard an MLP with
``fully_shard`` (every linear layer, then the root), train it a few steps with SI
(``importance="total"``), and report the bytes each rank holds: SI's state (Ω, θ*, ω and the
weights before the step, for its shard only) beside the rank's shard of the weights. Bytes
are counted from the tensors, not from the allocator, so the numbers are the same on any
machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path


def _rank(rank, world, port, widths, out_dir):
    import torch
    import torch.distributed as dist

    from avalanche_si import SynapticIntelligence

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        layers = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        model = torch.nn.Sequential(*layers[:-1])
        mesh = init_device_mesh("cpu", (world,))
        for m in model:
            if isinstance(m, torch.nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        si = SynapticIntelligence(model, opt, si_lambda=1.0, eps=0.1)
        for _ in range(2):
            si.start_task()
            for _ in range(3):
                opt.zero_grad()
                x = torch.randn(8, widths[0])
                torch.nn.functional.cross_entropy(model(x), torch.randint(widths[-1], (8,)))\
                    .backward()
                si.before_step()
                opt.step()
                si.after_step()
            si.end_task()
        state = sum(b.numel() * b.element_size() for b in si._state.store.buffers())
        shard = sum(p.to_local().numel() * p.to_local().element_size()
                    for p in model.parameters())
        torch.save((state, shard), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(widths, world: int) -> list[tuple[int, int]]:
    """(SI's state bytes, weight shard bytes) of each rank, at this world size."""
    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(world, _free_port(), widths, tmp), nprocs=world,
                           start_method="spawn")
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.sharded_memory",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[784, 400, 400, 10])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--save", metavar="NAME", default=None,
                    help="also write the output to results/bench_overhead/NAME.txt (the "
                         "performance page shows every file there)")
    args = ap.parse_args(argv)
    if len(args.widths) < 2 or min(args.widths) < 1 or min(args.worlds) < 1:
        ap.error("--widths needs two or more positive numbers, --worlds positive ones")
    from .options import printed_and_saved

    argv = list(argv if argv is not None else sys.argv[1:])
    with printed_and_saved("experiments.sharded_memory", argv, args.save,
                           Path(__file__).resolve().parents[1] / "results" / "bench_overhead"):
        n = sum(a * b + b for a, b in zip(args.widths[:-1], args.widths[1:]))
        print(f"# MLP {'-'.join(map(str, args.widths))}: {n:,} weights (float32), "
              "fully_shard on every linear layer and the root, gloo on CPU; SI with "
              "importance=\"total\" (4 numbers per weight)\n")
        print("| world size | SI state per rank, bytes (max over ranks) | weight shard per rank, "
              "bytes | SI state / weights | SI state per rank / world size 1 |")
        print("|---|---|---|---|---|")
        first = None
        for world in args.worlds:
            ranks = measure(args.widths, world)
            state = max(s for s, _ in ranks)
            shard = max(w for _, w in ranks)
            first = first or state
            print(f"| {world} | {state:,} | {shard:,} | {state / shard:.2f} | "
                  f"{state / first:.3f} |")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
