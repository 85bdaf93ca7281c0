"""SI on a model sharded with FSDP2 (torch.distributed.fsdp.fully_shard), two gloo ranks on
this machine, against a single process training on the same global mini-batches in float64:
each rank keeps SI's state for its own shard only, and the result is the same."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from avalanche_si import SynapticIntelligence
from conftest import make_tasks, mlp, train_loop

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(tmp_path, case):
    from _fsdp_worker import run

    mp.start_processes(run, args=(2, _free_port(), str(tmp_path), case), nprocs=2,
                       start_method="spawn")
    return torch.load(tmp_path / f"{case}.pt", weights_only=False)


def _single(importance, *, micro=1, clip=None):
    """One process, the two ranks' mini-batches of 4 together (each rank takes every other
    sample): the gradient is the mean over the 8, as FSDP's reduce-scatter averages it."""
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    si = SynapticIntelligence(model, opt, si_lambda=2.0, eps=0.1, importance=importance)
    tasks = []
    for x, y, t in make_tasks():
        # rank r's micro-batch j of a step: its samples 4i + 2j, 4i + 2j + 1 (micro=2) or
        # 4i .. 4i + 3 (micro=1), global samples 2·local + r
        per = 4 // micro
        order = [2 * (i + j * per + q) + r for i in range(0, len(x) // 2, 4)
                 for j in range(micro) for r in range(2) for q in range(per)]
        tasks.append((x[order], y[order], t))
    train_loop(model, opt, tasks, si, mb=8, epochs=1, accumulate=micro, clip=clip)
    return model, si


def _assert_equal(got, model, si):
    for n, p in model.named_parameters():
        torch.testing.assert_close(got["weights"][n], p.detach(), rtol=1e-9, atol=1e-12,
                                   msg=n)
        torch.testing.assert_close(got["omega"][n], si.importances()[n], rtol=1e-9,
                                   atol=1e-12, msg=n)
    assert got["consolidations"] == si.consolidations == 3


def test_two_sharded_ranks_equal_one_process(tmp_path):
    # before: the first before_step() raised NotImplementedError (aten._foreach_copy_ has no
    # sharding strategy) from SI's step work
    ranks = _ranks(tmp_path, "exact")
    for importance in ("total", "task", "sos", "onaf"):
        model, si = _single(importance)
        _assert_equal(ranks[importance], model, si)
        # each rank keeps the state of its shard only: half the numbers of one process
        whole = sum(b.numel() * b.element_size() for b in si._state.store.buffers())
        assert ranks[importance]["local_state_bytes"] == whole // 2


def test_accumulation_without_gradient_sync_and_clipping(tmp_path):
    ranks = _ranks(tmp_path, "accumulate")
    for importance in ("total", "task"):
        model, si = _single(importance, micro=2, clip=0.5)
        _assert_equal(ranks[importance], model, si)


def test_the_lightning_callback_on_a_sharded_module(tmp_path):
    pytest.importorskip("lightning")
    model, si = _single("task")
    _assert_equal(_ranks(tmp_path, "lightning")["task"], model, si)


def test_a_bf16_mixed_precision_policy_is_the_definition_of_its_own_run(tmp_path):
    ranks = _ranks(tmp_path, "bf16")
    for importance in ("total", "task"):
        assert ranks[importance] < 1e-5, importance


def test_a_distributed_checkpoint_resumes_bit_for_bit_and_loads_into_one_process(tmp_path):
    ranks = _ranks(tmp_path, "checkpoint")
    for kind in ("weights", "omega"):
        for n, t in ranks["whole"][kind].items():
            assert torch.equal(t, ranks["resumed"][kind][n]), (kind, n)
    assert ranks["whole"]["consolidations"] == ranks["resumed"]["consolidations"] == 3
    # the same checkpoint in one process, unsharded (2 ranks -> 1): the same Ω
    import torch.distributed.checkpoint as dcp

    model = mlp()
    si = SynapticIntelligence(model, torch.optim.Adam(model.parameters()), si_lambda=2.0,
                              eps=0.1, importance="task")
    dcp.load({"si": si}, checkpoint_id=str(tmp_path / "ckpt"))
    for n, o in si.importances().items():
        assert torch.equal(o, ranks["saved_omega"][n]), n
    assert si.consolidations == 1


def test_a_checkpoint_of_one_process_loads_into_two_sharded_ranks(tmp_path):
    import torch.distributed.checkpoint as dcp

    model, si = _single("task")
    dcp.save({"si": si}, checkpoint_id=str(tmp_path / "single"))
    ranks = _ranks(tmp_path, "from_single")
    assert ranks["consolidations"] == 3
    for n, o in si.importances().items():
        assert torch.equal(ranks["omega"][n], o), n
        assert ranks["local_numel"][n] == o.numel() // 2  # rank 0 holds its shard only


def test_what_si_cannot_serve_on_a_shard_is_refused_when_it_binds(tmp_path):
    errors = _ranks(tmp_path, "refuse")["errors"]
    for importance in ("delta_params", "siu", "sib"):
        assert errors[importance].startswith("ValueError: importance=") and \
            "use importance='total', 'task', 'sos' or 'onaf'" in errors[importance]
    assert "GradScaler with a sharded model" in errors["scaler"]
    assert "(Shard(dim=1),)" in errors["Shard(1)"] and "Shard(0)" in errors["Shard(1)"]
    assert errors["FSDP1"].startswith("ValueError: SI does not support FSDP1") and \
        "fully_shard" in errors["FSDP1"]
