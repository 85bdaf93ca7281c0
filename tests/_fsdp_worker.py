"""Run in spawned processes by test_fsdp.py: one rank of a model sharded with FSDP2
(fully_shard, gloo on CPU), SI in a plain loop. Rank r trains on every world-th sample of each
task, in mini-batches of 4 (the global mini-batch: 4 x world samples)."""

import os
import warnings

warnings.filterwarnings("ignore")


def shard(model, mesh, **kwargs):
    """fully_shard on every linear layer, then on the root, as FSDP2's docs do."""
    import torch
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def loop(model, opt, si, tasks, rank, world, *, micro=1, clip=None, steps=None, skip=0,
         oracle=None):
    """The plain loop; `micro` micro-batches per step (the first ones without gradient sync),
    `clip` a gradient norm; only the run's steps `skip` + 1 to `steps` (a task started before
    `skip` is started again, which changes nothing; one that `steps` cuts is not ended)."""
    import torch

    ce = torch.nn.CrossEntropyLoss()
    k = 0
    for x, y, _ in tasks:
        x, y = x[rank::world], y[rank::world]
        starts = range(0, len(x), 4)
        if k + len(starts) <= skip:
            k += len(starts)
            continue
        si.start_task()
        for i in starts:
            k += 1
            if k <= skip:
                continue
            if steps is not None and k > steps:
                return
            opt.zero_grad()
            size = 4 // micro
            for j in range(micro):
                model.set_requires_gradient_sync(j == micro - 1)
                s = slice(i + j * size, i + (j + 1) * size)
                (ce(model(x[s]), y[s]) / micro).backward()
            si.before_step()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if oracle is not None:
                oracle.before()
            opt.step()
            if oracle is not None:
                oracle.after()
            si.after_step()
        if steps is not None and k >= steps:
            return
        si.end_task()
        if oracle is not None:
            oracle.end_task()


def _group(rank, world, port):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _full(si, model):
    return {"omega": {n: o.full_tensor() for n, o in si.importances().items()},
            "weights": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
            "consolidations": si.consolidations}


def run(rank, world, port, out_dir, case):
    import torch
    import torch.distributed as dist

    from conftest import make_tasks, mlp  # (imports Avalanche: before the process group)
    from avalanche_si import SynapticIntelligence

    _group(rank, world, port)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    adam = lambda m: torch.optim.Adam(m.parameters(), lr=0.05)  # noqa: E731
    out = {}
    try:
        if case == "exact":
            for importance in ("total", "task", "sos", "onaf"):
                model = shard(mlp(), mesh)
                opt = adam(model)
                si = SynapticIntelligence(model, opt, si_lambda=2.0, eps=0.1,
                                          importance=importance)
                loop(model, opt, si, make_tasks(), rank, world)
                out[importance] = _full(si, model)
                out[importance]["local_state_bytes"] = sum(
                    b.numel() * b.element_size() for b in si._state.store.buffers())
        elif case == "accumulate":
            for importance in ("total", "task"):
                model = shard(mlp(), mesh)
                opt = adam(model)
                si = SynapticIntelligence(model, opt, si_lambda=2.0, eps=0.1,
                                          importance=importance)
                loop(model, opt, si, make_tasks(), rank, world, micro=2, clip=0.5)
                out[importance] = _full(si, model)
        elif case == "bf16":
            from torch.distributed.fsdp import MixedPrecisionPolicy

            for importance in ("total", "task"):
                model = shard(mlp(dtype=torch.float32), mesh, mp_policy=MixedPrecisionPolicy(
                    param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
                opt = adam(model)
                si = SynapticIntelligence(model, opt, si_lambda=2.0, eps=0.1,
                                          importance=importance)
                oracle = LocalOracle(model, importance)
                loop(model, opt, OracleFed(si, oracle), make_tasks(dtype=torch.float32), rank,
                     world, oracle=oracle)
                out[importance] = max(
                    float((o.to_local().double() - oracle.omega[n]).abs().max() /
                          oracle.omega[n].abs().max().clamp(min=1e-30))
                    for n, o in si.importances().items())
        elif case == "checkpoint":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            tasks = make_tasks()
            model = shard(mlp(), mesh)
            opt = adam(model)
            si = SynapticIntelligence(model, opt, si_lambda=2.0, eps=0.1, importance="task")
            loop(model, opt, si, tasks, rank, world, steps=9)  # task 1 and half of task 2
            model_sd, opt_sd = get_state_dict(model, opt)
            dcp.save({"model": model_sd, "optim": opt_sd, "si": si},
                     checkpoint_id=os.path.join(out_dir, "ckpt"))
            out["saved_omega"] = {n: o.full_tensor() for n, o in si.importances().items()}
            loop(model, opt, si, tasks, rank, world, skip=9)
            out["whole"] = _full(si, model)
            # a new model, optimizer and SI, resumed from the checkpoint
            model = shard(mlp(seed=5), mesh)
            opt = adam(model)
            si = SynapticIntelligence(model, opt, si_lambda=2.0, eps=0.1, importance="task")
            model_sd, opt_sd = get_state_dict(model, opt)
            state = {"model": model_sd, "optim": opt_sd, "si": si}
            dcp.load(state, checkpoint_id=os.path.join(out_dir, "ckpt"))
            set_state_dict(model, opt, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
            loop(model, opt, si, tasks, rank, world, skip=9)
            out["resumed"] = _full(si, model)
        elif case == "lightning":
            import lightning as L

            from avalanche_si.lightning import SICallback

            class Module(L.LightningModule):
                def __init__(self):
                    super().__init__()
                    self.net = shard(mlp(), mesh)
                    self.opt = adam(self.net)

                def training_step(self, batch, batch_idx):
                    x, y = batch
                    return torch.nn.functional.cross_entropy(self.net(x), y)

                def configure_optimizers(self):
                    return self.opt

            module, callback = Module(), SICallback(si_lambda=2.0, eps=0.1, importance="task")
            for x, y, _ in make_tasks():
                data = torch.utils.data.TensorDataset(x[rank::world], y[rank::world])
                L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, callbacks=[callback]).fit(
                    module, torch.utils.data.DataLoader(data, batch_size=4))
            out["task"] = {"omega": {n.removeprefix("net."): o.full_tensor()
                                     for n, o in callback.engine.importances().items()},
                           "weights": {n: p.full_tensor().detach().clone()
                                       for n, p in module.net.named_parameters()},
                           "consolidations": callback.engine.consolidations}
        elif case == "from_single":  # a checkpoint one process wrote, loaded by the ranks
            import torch.distributed.checkpoint as dcp

            model = shard(mlp(), mesh)
            si = SynapticIntelligence(model, adam(model), si_lambda=2.0, eps=0.1,
                                      importance="task")
            dcp.load({"si": si}, checkpoint_id=os.path.join(out_dir, "single"))
            si.start_task()  # reads the model: Ω as DTensors laid out like the parameters
            out["omega"] = {n: o.full_tensor() for n, o in si.importances().items()}
            out["local_numel"] = {n: o.to_local().numel() for n, o in si.importances().items()}
            out["consolidations"] = si.consolidations
        elif case == "refuse":
            from torch.distributed.tensor import Shard, distribute_tensor

            errors = {}
            for importance in ("delta_params", "siu", "sib"):
                model = shard(mlp(), mesh)
                si = SynapticIntelligence(model, adam(model), importance=importance)
                errors[importance] = _error(si.start_task)
            model = shard(mlp(dtype=torch.float32), mesh)
            si = SynapticIntelligence(model, adam(model), scaler=torch.amp.GradScaler("cpu"))
            errors["scaler"] = _error(si.start_task)
            model = mlp()
            model[0].weight = torch.nn.Parameter(distribute_tensor(model[0].weight.detach(),
                                                                   mesh, [Shard(1)]))
            errors["Shard(1)"] = _error(SynapticIntelligence(model).start_task)
            from torch.distributed.fsdp import FullyShardedDataParallel

            model = FullyShardedDataParallel(mlp(), device_id=torch.device("cpu"))
            errors["FSDP1"] = _error(SynapticIntelligence(model, adam(model)).start_task)
            out["errors"] = errors
        if rank == 0:
            torch.save(out, os.path.join(out_dir, f"{case}.pt"))
    finally:
        dist.destroy_process_group()


def _error(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the test reads the message
        return f"{type(exc).__name__}: {exc}"
    return None


class LocalOracle:
    """SI by the definition on this rank's shard, in float64, from what the run did: the
    gradient each step used (read right before it; for "task", before SI's penalty) and the
    shard's weights before and after it."""

    def __init__(self, model, importance):
        import torch

        self.named = dict(model.named_parameters())
        self.importance = importance
        self.omega = {n: torch.zeros(p.to_local().shape, dtype=torch.float64)
                      for n, p in self.named.items()}
        self.start_task()

    def start_task(self):
        self.star = {n: p.to_local().detach().double().clone() for n, p in self.named.items()}
        self.running = {n: o.clone().zero_() for n, o in self.omega.items()}

    def gradient(self):
        self.g = {n: p.grad.to_local().double().clone() for n, p in self.named.items()}

    def before(self):
        if self.importance == "total":
            self.gradient()
        self.pre = {n: p.to_local().detach().double().clone() for n, p in self.named.items()}

    def after(self):
        for n, p in self.named.items():
            self.running[n] -= self.g[n] * (p.to_local().detach().double() - self.pre[n])

    def end_task(self):
        import torch

        for n, p in self.named.items():
            d = p.to_local().detach().double() - self.star[n]
            self.omega[n] += torch.clamp(self.running[n] / (d * d + 0.1), min=0)
        self.start_task()


class OracleFed:
    """The engine, with the oracle reading the task gradient before SI's penalty joins it."""

    def __init__(self, si, oracle):
        self.si, self.oracle = si, oracle

    def before_step(self):
        if self.oracle.importance == "task":
            self.oracle.gradient()
        self.si.before_step()

    def __getattr__(self, name):
        return getattr(self.si, name)
