"""A DistributedDataParallel model (two gloo ranks on this machine) is handled like a plain one."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from avalanche_si import SIPlugin
from avalanche_si.consolidation import LossPlateau
from conftest import make_stream, make_tasks, mlp, strategy, train_stream


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


POLICIES = {"experience": lambda: None, "every 5 steps": lambda: 5,
            # decided on the loss averaged over the ranks: the same steps as one process
            "loss plateau": lambda: LossPlateau(2, 0.4, 0.02)}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_ddp_two_ranks_equal_a_single_process_run(tmp_path, policy):
    from _ddp_worker import train_rank

    mp.start_processes(train_rank, args=(2, _free_port(), str(tmp_path), POLICIES[policy]()),
                       nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    # One process with twice the mini-batch sees what the two ranks see together: each
    # rank takes every other sample, and DDP averages the two halves' gradients.
    model = mlp()
    si = SIPlugin(2.0, groups={"body": ["0", "2"], "head": ["4"]}, importance="task",
                  consolidate=POLICIES[policy]())
    train_stream(strategy(model, torch.optim.Adam(model.parameters(), lr=0.05), [si], mb=8),
                 make_stream(make_tasks()))
    assert SIPlugin.supports_distributed
    consolidations = si.state_dict()["consolidations"]
    assert consolidations >= 2
    for r in ranks:
        assert r["consolidations"] == consolidations
        assert sorted(r["omega"]["body"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]
        for g in ("body", "head"):
            for n, o in si.importances(g).items():
                torch.testing.assert_close(r["omega"][g][n], o, rtol=1e-9, atol=1e-12)
        for n, p in model.named_parameters():
            torch.testing.assert_close(r["weights"][n], p.detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_ddp_plain_loop_with_the_engine_equals_a_single_process_run(tmp_path):
    from _ddp_worker import train_rank_loop

    from avalanche_si import SynapticIntelligence
    from conftest import train_loop

    mp.start_processes(train_rank_loop, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    si = SynapticIntelligence(model, opt, si_lambda=2.0, importance="delta_params",
                              groups={"body": ["0", "2"], "head": ["4"]})
    train_loop(model, opt, make_tasks(), si, mb=8)
    for r in ranks:
        assert r["consolidations"] == si.consolidations == 3
        for g in ("body", "head"):
            for n, o in si.importances(g).items():
                torch.testing.assert_close(r["omega"][g][n], o, rtol=1e-9, atol=1e-12)
        for n, p in model.named_parameters():
            torch.testing.assert_close(r["weights"][n], p.detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
@pytest.mark.parametrize("importance", ["siu", "sib", "sos"])
def test_ddp_with_benzings_variants_equals_a_single_process_run(tmp_path, importance):
    # the independent gradient is averaged over the ranks, as the step's is
    from _ddp_worker import train_rank_family
    from test_estimators import _draws, _engine_run

    mp.start_processes(train_rank_family, args=(2, _free_port(), str(tmp_path), importance),
                       nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    tasks = make_tasks()
    si, model = _engine_run(importance, tasks, _draws(tasks))
    for r in ranks:
        for n, o in si.importances().items():
            torch.testing.assert_close(r["omega"][n], o, rtol=1e-9, atol=1e-12, msg=n)
        for n, p in model.named_parameters():
            torch.testing.assert_close(r["weights"][n], p.detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
@pytest.mark.parametrize("importance", ["total", "task"])
def test_accumulation_under_no_sync_with_bucket_views_equals_the_whole_batch(tmp_path,
                                                                             importance):
    # before: DDP's new bucket-view gradients after the synchronising backward looked like new
    # gradients, and "total" added the penalty a second time
    from _ddp_worker import train_rank_no_sync
    from avalanche_si import SynapticIntelligence
    from conftest import train_loop

    mp.start_processes(train_rank_no_sync, args=(2, _free_port(), str(tmp_path), importance),
                       nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    si = SynapticIntelligence(model, opt, si_lambda=2.0, eps=0.1, importance=importance)
    # one process, the ranks' micro-batches together: (x[0], x[1]) and (x[2], x[3]) of each
    # group of four, each half of the step's mean
    tasks = []
    for x, y, t in make_tasks():
        order = torch.tensor([j for i in range(0, len(x), 8)
                              for j in (i, i + 2, i + 1, i + 3, i + 4, i + 6, i + 5, i + 7)])
        tasks.append((x[order], y[order], t))
    train_loop(model, opt, tasks, si, mb=8, epochs=1, accumulate=2)
    for r in ranks:
        for n, p in model.named_parameters():
            torch.testing.assert_close(r["weights"][n], p.detach(), rtol=1e-9, atol=1e-12,
                                       msg=n)
            torch.testing.assert_close(r["omega"][n], si.importances()[n], rtol=1e-9,
                                       atol=1e-12, msg=n)
