"""A DistributedDataParallel model (two gloo ranks on this machine) is handled like a plain one."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from avalanche_si import SIPlugin
from conftest import make_stream, make_tasks, mlp, strategy, train_stream


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_ddp_two_ranks_equal_a_single_process_run(tmp_path):
    from _ddp_worker import train_rank

    mp.start_processes(train_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    # One process with twice the mini-batch sees what the two ranks see together: each
    # rank takes every other sample, and DDP averages the two halves' gradients.
    model = mlp()
    si = SIPlugin(2.0, groups={"body": ["0", "2"], "head": ["4"]}, importance="task")
    train_stream(strategy(model, torch.optim.Adam(model.parameters(), lr=0.05), [si], mb=8),
                 make_stream(make_tasks()))
    assert SIPlugin.supports_distributed
    for r in ranks:
        assert sorted(r["omega"]["body"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]
        for g in ("body", "head"):
            for n, o in si.importances(g).items():
                torch.testing.assert_close(r["omega"][g][n], o, rtol=1e-9, atol=1e-12)
        for n, p in model.named_parameters():
            torch.testing.assert_close(r["weights"][n], p.detach(), rtol=1e-9, atol=1e-12)
