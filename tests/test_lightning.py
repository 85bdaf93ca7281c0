"""SICallback: SI in Lightning, one fit per task, against the float64 definition and the plain
loop."""

import pytest
import torch

L = pytest.importorskip("lightning")

from avalanche_si import ParamGroup, SynapticIntelligence  # noqa: E402
from avalanche_si.lightning import SICallback  # noqa: E402
from conftest import assert_same, make_tasks, mlp, reference_si, train_loop, weights  # noqa: E402

GROUPS = {"body": (["0.weight", "0.bias", "2.weight", "2.bias"], 0.7, 1e-3),
          "head": (["4.weight", "4.bias"], 3.0, 0.1)}


class Module(L.LightningModule):
    """The tests' MLP; one optimizer for every fit, so its state carries over tasks as in the
    reference loop."""

    def __init__(self, net, make_opt, autocast_float=False):
        super().__init__()
        self.net, self.make_opt, self.opt = net, make_opt, None
        self.autocast_float = autocast_float

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        return torch.nn.functional.cross_entropy(out.float() if self.autocast_float else out, y)

    def configure_optimizers(self):
        if self.opt is None:
            self.opt = self.make_opt(self.net.parameters())
        return self.opt


def _loader(task, batch):
    x, y, _ = task
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch,
                                       shuffle=False)


def _trainer(callbacks, **kwargs):
    base = dict(max_epochs=2, accelerator="cpu", devices=1, logger=False,
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(callbacks=callbacks, **{**base, **kwargs})


def _callback(importance="total", **kwargs):
    return SICallback(si_lambda=123.0, eps=5.0, importance=importance, groups={
        n: ParamGroup(params=[f"net.{x}" for x in names], si_lambda=c, eps=xi)
        for n, (names, c, xi) in GROUPS.items()},
        **kwargs)


def _fit_tasks(module, callback, tasks, *, batch=8, **trainer_kwargs):
    for task in tasks:
        _trainer([callback], **trainer_kwargs).fit(module, _loader(task, batch))


def _omegas(engine):
    """Ω by the plain MLP's names (the module holds it as ``net``)."""
    return {n.removeprefix("net."): o for g in engine.group_names
            for n, o in engine.importances(g).items()}


def _check_against_reference(module, callback, tasks, importance, *, opt, rewrite_grads=None):
    ref_model = mlp()
    ref_omega, ref_model = reference_si(ref_model, opt(ref_model.parameters()), tasks,
                                        list(GROUPS.values()), importance=importance,
                                        rewrite_grads=rewrite_grads)
    for (n, p), (_, q) in zip(module.net.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-9, atol=1e-12, msg=n)
    got = _omegas(callback.engine)
    for n, o in ref_omega.items():
        torch.testing.assert_close(got[n], o, rtol=1e-9, atol=1e-12, msg=n)
    assert callback.engine.consolidations == len(tasks)


@pytest.mark.parametrize("importance", ["total", "task", "delta_params"])
def test_one_fit_per_task_matches_the_definition(tasks, importance):
    adam = lambda p: torch.optim.Adam(p, lr=0.05)  # noqa: E731
    module, callback = Module(mlp(), adam), _callback(importance)
    _fit_tasks(module, callback, tasks)
    _check_against_reference(module, callback, tasks, importance, opt=adam)


@pytest.mark.parametrize("importance", ["total", "task", "delta_params"])
def test_accumulate_grad_batches_equals_the_larger_batch(tasks, importance):
    adam = lambda p: torch.optim.Adam(p, lr=0.05)  # noqa: E731
    module, callback = Module(mlp(), adam), _callback(importance)
    _fit_tasks(module, callback, tasks, batch=4, accumulate_grad_batches=2)
    _check_against_reference(module, callback, tasks, importance, opt=adam)


class KeepsGradients(Module):
    """Zeroes the gradients in place (Lightning frees them by default; a CPU's allocator
    rarely gives their memory back, so CUDA graphs would never replay here)."""

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        optimizer.zero_grad(set_to_none=False)


@pytest.mark.parametrize("importance", ["total", "task"])
def test_cuda_graphs_in_lightning_match_the_definition(graphs_everywhere, tasks, importance):
    # replayed (stand-ins on the CPU, each replay's tensors checked) under Lightning's
    # accumulation and clipping, one fit per task: the float64 definition still holds
    sgd = lambda p: torch.optim.SGD(p, lr=0.1)  # noqa: E731
    module, callback = KeepsGradients(mlp(), sgd), _callback(importance, cuda_graphs=True)
    _fit_tasks(module, callback, tasks, batch=4, accumulate_grad_batches=2,
               gradient_clip_val=0.5)
    _check_against_reference(
        module, callback, tasks, importance, opt=sgd,
        rewrite_grads=lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5))
    graphs = [g.graphs for g in callback.engine._groups]
    assert all(g is not None and g.replays > 10 and g.off is None for g in graphs)


def test_lightning_gradient_clipping_clips_the_penalty_too(tasks):
    sgd = lambda p: torch.optim.SGD(p, lr=0.1)  # noqa: E731
    module, callback = Module(mlp(), sgd), _callback()
    _fit_tasks(module, callback, tasks, gradient_clip_val=0.5)
    _check_against_reference(
        module, callback, tasks, "total", opt=sgd,
        rewrite_grads=lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5))


@pytest.mark.parametrize("importance", ["total", "task"])
def test_lightning_amp_scaler_is_used_as_in_a_plain_loop(importance):
    # Lightning's 16-mixed precision plugin (its GradScaler) against the plain loop with the
    # same autocast and scaler: the same bits
    from lightning.pytorch.plugins.precision import MixedPrecision

    tasks = make_tasks(dtype=torch.float32)
    adam = lambda p: torch.optim.Adam(p, lr=0.05)  # noqa: E731
    module = Module(mlp(dtype=torch.float32), adam, autocast_float=True)
    callback = SICallback(si_lambda=200.0, eps=0.1, importance=importance)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    _fit_tasks(module, callback, tasks,
               plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert callback.engine._binding.scaler is scaler

    model = mlp(dtype=torch.float32)
    opt = adam(model.parameters())
    loop_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    si = SynapticIntelligence(model, opt, si_lambda=200.0, eps=0.1, importance=importance,
                              scaler=loop_scaler)
    train_loop(model, opt, tasks, si, scaler=loop_scaler, autocast=torch.float16)
    assert_same(weights(module.net), weights(model))
    assert_same(_omegas(callback.engine), _omegas(si))


class Crash(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")


def test_a_fit_resumed_from_a_lightning_checkpoint_equals_an_uninterrupted_one(tasks, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    adam = lambda p: torch.optim.Adam(p, lr=0.05)  # noqa: E731
    full, full_cb = Module(mlp(), adam), SICallback(si_lambda=5.0, eps=0.1)
    _fit_tasks(full, full_cb, tasks[:2])

    module, callback = Module(mlp(), adam), SICallback(si_lambda=5.0, eps=0.1)
    _fit_tasks(module, callback, tasks[:1])
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):  # task 2 dies after its epoch 1
        _trainer([callback, ckpt, Crash()], enable_checkpointing=True,
                 default_root_dir=tmp_path).fit(
            module, _loader(tasks[1], 8))
    assert callback.engine.consolidations == 1  # a crash is no task end

    resumed, resumed_cb = Module(mlp(seed=5), adam), SICallback(si_lambda=5.0, eps=0.1)
    resumed.opt = adam(resumed.net.parameters())
    _trainer([resumed_cb], default_root_dir=tmp_path).fit(
        resumed, _loader(tasks[1], 8), ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed_cb.engine.consolidations == 2
    assert_same(weights(resumed.net), weights(full.net))
    assert_same(_omegas(resumed_cb.engine), _omegas(full_cb.engine))


def test_callback_arguments_are_checked():
    with pytest.raises(TypeError, match="not both"):
        SICallback(engine=SynapticIntelligence(), si_lambda=1.0)
    with pytest.raises(TypeError, match="SynapticIntelligence"):
        SICallback(engine=object())
    with pytest.raises(AttributeError, match="did you mean 'si_lambda'"):
        SICallback(si_lambda=1.0).engine.si_lamda = 2.0


class IndependentBatchModule(Module):
    """Draws the independent mini-batch of importance="siu"/"sib" in `training_step`, before
    Lightning's backward pass, and hands its loss to the callback's engine."""

    def __init__(self, net, make_opt, callback, tasks, draws):
        super().__init__(net, make_opt)
        self.callback, self.batches = callback, iter(
            (x[u], y[u]) for (x, y, _), task_draws in zip(tasks, draws) for u in task_draws)

    def training_step(self, batch, batch_idx):
        if self.callback.engine.importance in ("siu", "sib"):
            x_u, y_u = next(self.batches)
            loss_u = torch.nn.functional.cross_entropy(self.net(x_u), y_u)
            self.callback.engine.record_independent_gradient(loss_u)
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("importance", ["siu", "sib", "sos"])
def test_benzings_variants_in_lightning_match_their_definitions(tasks, importance):
    from test_estimators import C, XI, _draws, reference

    draws = _draws(tasks)
    adam = lambda p: torch.optim.Adam(p, lr=0.05)  # noqa: E731
    callback = SICallback(si_lambda=C, eps=XI, importance=importance)
    module = IndependentBatchModule(mlp(), adam, callback, tasks, draws)
    _fit_tasks(module, callback, tasks)
    ref_model = mlp()
    ref = reference(ref_model, adam(ref_model.parameters()), tasks, draws, importance=importance)
    for (n, p), (_, q) in zip(module.net.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-9, atol=1e-12, msg=n)
    got = _omegas(callback.engine)
    for n, o in ref.items():
        torch.testing.assert_close(got[n], o, rtol=1e-9, atol=1e-12, msg=n)


# ------------------------------------------------ checkpoints written by anyone, at any time


class SaveAt(L.Callback):
    """Saves a checkpoint at a given global step, from its own on_train_batch_end."""

    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("importance", ["total", "task"])
def test_a_checkpoint_holds_si_as_it_is_at_that_step_whatever_the_callback_order(
        tasks, tmp_path, importance):
    # before: a callback listed before SICallback saved SI one step behind the weights
    adam = lambda p: torch.optim.Adam(p, lr=0.05)  # noqa: E731
    module, callback = Module(mlp(), adam), SICallback(si_lambda=5.0, eps=0.1,
                                                       importance=importance)
    _fit_tasks(module, callback, tasks[:1])
    first, last = SaveAt(5, tmp_path / "first.ckpt"), SaveAt(5, tmp_path / "last.ckpt")
    _trainer([first, callback, last]).fit(module, _loader(tasks[1], 8))
    a = torch.load(tmp_path / "first.ckpt", weights_only=False)
    b = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert_same(a["state_dict"], b["state_dict"])
    sa, sb = a["callbacks"]["SICallback"], b["callbacks"]["SICallback"]
    assert sa["steps_since"] == sb["steps_since"] == 5
    assert_same(sa["buffers"], sb["buffers"])


def test_the_fits_last_checkpoint_holds_its_consolidation_and_a_next_task_starts_from_it(
        tasks, tmp_path):
    # before: ModelCheckpoint's last.ckpt was written before on_train_end consolidated, so a
    # next task started from it had 1 consolidation where the uninterrupted run had 2
    from lightning.pytorch.callbacks import ModelCheckpoint

    adam = lambda p: torch.optim.Adam(p, lr=0.05)  # noqa: E731
    full, full_cb = Module(mlp(), adam), SICallback(si_lambda=5.0, eps=0.1)
    _fit_tasks(full, full_cb, tasks[:3])

    module, callback = Module(mlp(), adam), SICallback(si_lambda=5.0, eps=0.1)
    _fit_tasks(module, callback, tasks[:1])
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _trainer([callback, ckpt], enable_checkpointing=True, default_root_dir=tmp_path).fit(
        module, _loader(tasks[1], 8))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]["SICallback"]
    assert saved["consolidations"] == 2 == callback.engine.consolidations

    # task 3 from last.ckpt, in a new process's objects: two more epochs of the same fit loop
    resumed, resumed_cb = Module(mlp(seed=5), adam), SICallback(si_lambda=5.0, eps=0.1)
    resumed.opt = adam(resumed.net.parameters())
    _trainer([resumed_cb], max_epochs=4, default_root_dir=tmp_path).fit(
        resumed, _loader(tasks[2], 8), ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed_cb.engine.consolidations == 3
    assert_same(weights(resumed.net), weights(full.net))
    assert_same(_omegas(resumed_cb.engine), _omegas(full_cb.engine))


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def test_spawning_strategies_are_refused(monkeypatch):
    # before: strategy="ddp_spawn" trained in child processes and returned no SI state, so the
    # next fit trained as with c = 0, bit for bit
    import socket

    with socket.socket() as s:  # (a port of our own: Lightning's choice may be taken)
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(s.getsockname()[1]))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    module = Module(mlp(), _sgd)
    trainer = _trainer([SICallback()], strategy="ddp_spawn", devices=2)
    with pytest.raises(Exception, match="cannot bring SI's state back"):
        trainer.fit(module, _loader(make_tasks(1)[0], 8))


class ManualModule(Module):
    """Manual optimization, SI driven from training_step and bound to self.optimizers() (a
    LightningOptimizer), as the guide's own-loop recipe reads inside Lightning."""

    def __init__(self, net, make_opt, si):
        super().__init__(net, make_opt)
        self.automatic_optimization = False
        self.si = si

    def on_train_start(self):
        self.si.bind(self, self.optimizers())
        self.si.start_task()

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        self.si.before_step()
        opt.step()
        self.si.after_step()

    def on_train_end(self):
        self.si.end_task()


@pytest.mark.parametrize("importance", ["total", "task"])
def test_manual_optimization_bound_to_the_lightning_optimizer_matches_the_definition(
        tasks, importance):
    # before: bound to the LightningOptimizer, SI saw no step and Ω stayed 0
    adam = lambda p: torch.optim.Adam(p, lr=0.05)  # noqa: E731
    si = SynapticIntelligence(si_lambda=123.0, eps=5.0, importance=importance, groups={
        n: ParamGroup(params=[f"net.{x}" for x in names], si_lambda=c, eps=xi)
        for n, (names, c, xi) in GROUPS.items()})
    module = ManualModule(mlp(), adam, si)
    for task in tasks:
        _trainer([]).fit(module, _loader(task, 8))
    ref_model = mlp()
    ref_omega, ref_model = reference_si(ref_model, adam(ref_model.parameters()), tasks,
                                        list(GROUPS.values()), importance=importance)
    for (n, p), (_, q) in zip(module.net.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-9, atol=1e-12, msg=n)
    got = _omegas(si)
    for n, o in ref_omega.items():
        torch.testing.assert_close(got[n], o, rtol=1e-9, atol=1e-12, msg=n)


class SkippingModule(Module):
    """Returns None from training_step on every third batch: Lightning skips it."""

    def training_step(self, batch, batch_idx):
        return None if batch_idx % 3 == 2 else super().training_step(batch, batch_idx)


def test_a_batch_that_training_step_skips_is_skipped_by_si_too(tasks):
    # before: SI's before_step() found no gradient and the fit crashed
    adam = lambda p: torch.optim.Adam(p, lr=0.05)  # noqa: E731
    callback = SICallback(si_lambda=5.0, eps=0.1)
    module = SkippingModule(mlp(), adam)
    _fit_tasks(module, callback, tasks[:2])
    assert callback.engine.consolidations == 2
    # the same as training on the batches that were not skipped (Adam leaves a parameter
    # without a gradient as it is)
    kept = [(torch.cat([x[i:i + 8] for i in range(0, len(x), 8) if (i // 8) % 3 != 2]),
             torch.cat([y[i:i + 8] for i in range(0, len(x), 8) if (i // 8) % 3 != 2]), t)
            for x, y, t in tasks[:2]]
    plain_cb = SICallback(si_lambda=5.0, eps=0.1)
    plain = Module(mlp(), adam)
    _fit_tasks(plain, plain_cb, kept)
    assert_same(weights(module.net), weights(plain.net))
    assert_same(_omegas(callback.engine), _omegas(plain_cb.engine))
