"""SI bound to its run: reuse, scalers wherever they live, templates that skip hooks, renamed
parameters, closure optimizers, stale predictions, consolidation at any moment, live clamp,
dampings and exclusions that switch SI off, and the functional API's pairing of state."""

import copy

import pytest
import torch
from avalanche.training import GDumb, MER, Naive

from avalanche_si import SIPlugin, SynapticIntelligence
from avalanche_si import functional as F
from conftest import (AccumulateEverySecond, Every, assert_same, make_stream, make_tasks, mlp,
                      omegas, reference_si, strategy, train_loop, train_stream, weights)


def _sgd(model, lr=0.1):
    return torch.optim.SGD(model.parameters(), lr=lr)


# ------------------------------------------------------------------ one run, one binding


def test_a_plugin_reused_for_a_second_seed_refuses_and_reset_starts_afresh(tasks):
    si = SIPlugin(5.0, eps=0.1)
    first = mlp()
    train_stream(strategy(first, _sgd(first), [si]), make_stream(tasks))
    second = mlp(seed=1)
    with pytest.raises(RuntimeError, match=r"another model.*reset\(\)"):
        train_stream(strategy(second, _sgd(second), [si]), make_stream(tasks))
    assert si.consolidations == 3  # nothing changed
    si.reset()
    second = mlp(seed=1)
    train_stream(strategy(second, _sgd(second), [si]), make_stream(tasks))
    fresh_model, fresh = mlp(seed=1), SIPlugin(5.0, eps=0.1)
    train_stream(strategy(fresh_model, _sgd(fresh_model), [fresh]), make_stream(tasks))
    assert_same(weights(second), weights(fresh_model))
    assert_same(omegas(si), omegas(fresh))
    assert si.consolidations == 3


def test_the_same_strategy_may_replace_its_model_and_the_state_follows(tasks):
    # GDumb builds a new model object each experience; a strategy that does so keeps its SI
    model = mlp()
    si = SIPlugin(5.0, eps=0.1)
    strat = strategy(model, _sgd(model), [si])
    bench = make_stream(tasks)
    for k, exp in enumerate(bench.train_stream):
        if k == 1:
            strat.model = copy.deepcopy(strat.model)
            strat.optimizer = _sgd(strat.model)
        strat.train(exp, shuffle=False, num_workers=0, eval_streams=[])
    assert si.consolidations == 3
    model = mlp()
    strat = strategy(model, _sgd(model), [SIPlugin(5.0, eps=0.1)], cls=GDumb, mem_size=20,
                     criterion=torch.nn.CrossEntropyLoss())
    train_stream(strat, make_stream(tasks))


def test_the_engine_refuses_another_model_unless_reset_or_moved(tasks):
    model = mlp()
    opt = _sgd(model)
    si = SynapticIntelligence(model, opt, si_lambda=2.0)
    train_loop(model, opt, tasks[:1], si)
    other = mlp(seed=1)
    with pytest.raises(RuntimeError, match="another model"):
        si.bind(other, _sgd(other))
    si.bind(torch.compile(model, backend="eager"), opt)  # a wrapper of the same model: fine
    moved = SynapticIntelligence(si_lambda=2.0)
    moved.load_state_dict(si.state_dict())
    moved.bind(other, _sgd(other))  # moved explicitly
    si.reset()
    si.bind(other, _sgd(other))
    assert si.consolidations == 0 and si.importances() == {}


# ------------------------------------------------------------------ scalers wherever they live


class _AMP(Naive):
    def backward(self):
        self._scaler().scale(self.loss).backward()

    def optimizer_step(self):
        self._scaler().step(self.optimizer)
        self._scaler().update()


class ClassAttributeScaler(_AMP):
    shared = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)

    def _scaler(self):
        return self.shared


class HelperScaler(_AMP):
    class Helper:
        def __init__(self):
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.amp = self.Helper()

    def _scaler(self):
        return self.amp.scaler


class LateScaler(_AMP):
    def _scaler(self):
        if not hasattr(self, "scaler"):  # made at the first backward
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
        return self.scaler


@pytest.mark.parametrize("cls", [ClassAttributeScaler, HelperScaler, LateScaler])
@pytest.mark.parametrize("importance", ["total", "task"])
def test_scalers_are_found_wherever_the_strategy_keeps_them(cls, importance):
    # found, the scaled training is bit-identical to the unscaled one (powers of two)
    tasks = make_tasks(dtype=torch.float32)
    runs = []
    for c in (Naive, cls):
        model = mlp(dtype=torch.float32)
        si = SIPlugin(20.0, eps=0.1, importance=importance)
        train_stream(strategy(model, torch.optim.Adam(model.parameters(), lr=0.05), [si], cls=c),
                     make_stream(tasks))
        runs.append((weights(model), omegas(si)))
    assert_same(runs[0][0], runs[1][0])
    assert_same(runs[0][1], runs[1][1])


# ------------------------------------------------------------------ templates that skip hooks


class NoStepHooks(Naive):
    """A custom template that trains without firing after_backward / after_update."""

    def training_epoch(self, **kwargs):
        for self.mbatch in self.dataloader:
            self._before_training_iteration(**kwargs)
            self.optimizer.zero_grad()
            self.loss = torch.nn.functional.cross_entropy(self.forward(), self.mb_y)
            self.loss.backward()
            self.optimizer.step()
            self._after_training_iteration(**kwargs)


@pytest.mark.parametrize("cls", [NoStepHooks, MER])
def test_templates_that_skip_the_step_hooks_are_refused_at_the_first_iteration(tasks, cls):
    model = mlp()
    si = SIPlugin(100.0)
    kwargs = {"mem_size": 20} if cls is MER else {}
    strat = cls(model=model, optimizer=_sgd(model), train_mb_size=8, train_epochs=1,
                plugins=[si], evaluator=None, device="cpu", **kwargs)
    with pytest.raises(RuntimeError, match="does not call after_backward and after_update"):
        strat.train(make_stream(tasks).train_stream[0], num_workers=0, eval_streams=[])


# ------------------------------------------------------------------ renamed parameters


class Wrapper(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def test_a_model_wrapped_between_experiences_keeps_its_importances(tasks):
    plain_model, plain = mlp(), SIPlugin(5.0, eps=0.1)
    train_stream(strategy(plain_model, _sgd(plain_model), [plain]), make_stream(tasks))
    model, si = mlp(), SIPlugin(5.0, eps=0.1)
    strat = strategy(model, _sgd(model), [si])
    for k, exp in enumerate(make_stream(tasks).train_stream):
        if k == 1:
            strat.model = Wrapper(strat.model)  # names become net.0.weight, ...
        strat.train(exp, shuffle=False, num_workers=0, eval_streams=[])
    assert_same(weights(model), weights(plain_model))
    assert {n.removeprefix("net.") for n in si.importances()} == set(plain.importances())
    for n, o in si.importances().items():
        assert torch.equal(o, plain.importances()[n.removeprefix("net.")]), n


def test_parameters_that_lose_their_names_are_named_in_a_warning(tasks):
    model, si = mlp(), SIPlugin(5.0, eps=0.1)
    strat = strategy(model, _sgd(model), [si])
    exps = make_stream(tasks).train_stream
    strat.train(exps[0], shuffle=False, num_workers=0, eval_streams=[])
    torch.nn.utils.parametrizations.weight_norm(model[0])  # 0.weight -> 0.parametrizations...
    strat.optimizer = _sgd(model)
    with pytest.warns(UserWarning, match=r"1 regularized parameter\(s\).*'0.weight'"):
        strat.train(exps[1], shuffle=False, num_workers=0, eval_streams=[])


# ------------------------------------------------------------------ closure optimizers


def test_closure_optimizers_are_refused_before_training(tasks):
    model = mlp()
    with pytest.raises(ValueError, match="LBFGS"):
        train_stream(strategy(model, torch.optim.LBFGS(model.parameters()), [SIPlugin(1.0)]),
                     make_stream(tasks))
    with pytest.raises(ValueError, match="LBFGS"):
        SynapticIntelligence(model, torch.optim.LBFGS(model.parameters()))


# ------------------------------------------------------------------ delta_params follows its optimizer


def test_delta_params_follows_an_optimizer_replaced_mid_experience():
    # plain SGD in the first task (no penalty): the predicted step is the step taken, so
    # delta_params must equal task, also after the optimizer (and its lr) is replaced
    tasks = make_tasks(1)
    swap = Every("after_training_iteration", [(0, 3)],
                 lambda s: setattr(s, "optimizer", _sgd(s.model, lr=0.03)))
    got = {}
    for importance in ("task", "delta_params"):
        model, si = mlp(), SIPlugin(1.0, importance=importance)
        train_stream(strategy(model, _sgd(model), [swap, si]), make_stream(tasks))
        swap.at = {(0, 3)}
        got[importance] = [t.clone() for t in si.engine._groups[0].running]
    for a, b in zip(got["task"], got["delta_params"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_delta_params_refuses_a_learning_rate_changed_before_the_step(tasks):
    halve = Every("before_update", [(0, 2)],
                  lambda s: s.optimizer.param_groups[0].__setitem__("lr", 0.05))
    model, si = mlp(), SIPlugin(1.0, importance="delta_params")
    with pytest.raises(RuntimeError, match=r"predicted this step with lr=0.1.*lr=0.05"):
        train_stream(strategy(model, _sgd(model), [si, halve]), make_stream(tasks))


# ------------------------------------------------------------------ consolidate_now at any moment


@pytest.mark.parametrize("importance", ["total", "task", "delta_params"])
def test_consolidating_between_backward_and_step_puts_the_step_in_the_next_period(importance):
    tasks = make_tasks(1)
    model = mlp()
    opt = _sgd(model)
    si = SynapticIntelligence(model, opt, si_lambda=2.0, importance=importance)
    ce = torch.nn.CrossEntropyLoss()
    x, y, _ = tasks[0]
    si.start_task()
    for step, i in enumerate(range(0, 48, 8)):
        opt.zero_grad()
        ce(model(x[i:i + 8]), y[i:i + 8]).backward()
        si.before_step()
        if step == 5:
            grads = [p.grad.clone() for p in model.parameters()]
            pre = [p.detach().clone() for p in model.parameters()]
            si.consolidate_now()
            assert si.consolidations == 1
        opt.step()
        si.after_step()
    # right after the step: ω holds that step alone, −g·Δθ, and θ* is the weights before it
    post = [p.detach() for p in model.parameters()]
    for r, g, a, b, prev in zip(si._groups[0].running, grads, pre, post, si._groups[0].prev):
        torch.testing.assert_close(r, -g * (b - a), rtol=1e-12, atol=1e-15)
        assert r.abs().max() > 0
        assert torch.equal(prev, a)


def test_before_step_twice_without_after_step_is_refused(tasks):
    # a template that skips after_update on some iterations, or a loop that forgets
    # after_step(): the step in between would be measured wrongly (and in "total" the
    # penalty added twice)
    model = mlp()
    opt = _sgd(model)
    si = SynapticIntelligence(model, opt, si_lambda=2.0)
    si.start_task()
    model(tasks[0][0][:4]).sum().backward()
    si.before_step()
    opt.step()
    with pytest.raises(RuntimeError, match="before_step\\(\\) was called twice"):
        si.before_step()
    si.before_step()  # refused once; the loop may go on after handling it
    opt.step()
    si.after_step()


class SkippingNaive(Naive):
    """Steps and calls after_update on every second iteration only."""

    def training_epoch(self, **kwargs):
        for k, self.mbatch in enumerate(self.dataloader):
            self._before_training_iteration(**kwargs)
            self.optimizer.zero_grad()
            self.loss = self._make_empty_loss()
            self.mb_output = self.forward()
            self.loss += self.criterion()
            self.backward()
            self._after_backward(**kwargs)
            if k % 2 == 1:
                self.optimizer.step()
                self._after_update(**kwargs)
            self._after_training_iteration(**kwargs)


def test_a_template_that_skips_after_update_is_refused(tasks):
    model = mlp()
    strat = strategy(model, _sgd(model), [SIPlugin(1.0)], cls=SkippingNaive)
    with pytest.raises(RuntimeError, match="template ran after_backward without after_update"):
        train_stream(strat, make_stream(tasks))


def test_consolidating_twice_in_a_row_does_not_shift_a_schedule_of_strengths(tasks):
    model = mlp()
    opt = _sgd(model)
    si = SynapticIntelligence(model, opt, si_lambda=[0.0, 2.0, 7.0])
    train_loop(model, opt, tasks[:1], si)
    si.consolidate_now()  # nothing trained since: a no-op
    assert si.consolidations == 1 and si._groups[0].c == 2.0


# ------------------------------------------------------------------ live clamp, damping, exclusions


def test_switching_to_a_clamp_clamps_what_is_held_and_the_state_loads_again():
    tasks = make_tasks()
    model, si = mlp(), SIPlugin(1.0, clamp="none")
    train_stream(strategy(model, torch.optim.Adam(model.parameters(), lr=0.05), [si]),
                 make_stream(tasks))
    assert min(float(o.min()) for o in si.importances().values()) < 0
    before = {n: o.clone() for n, o in si.importances().items()}
    si.clamp = "task"
    for n, o in si.importances().items():
        assert torch.equal(o, before[n].clamp(min=0)), n
    SIPlugin(1.0, clamp="task").load_state_dict(si.state_dict())


def test_a_damping_that_overflows_the_state_dtype_is_refused(tasks):
    model = mlp(dtype=torch.float32)
    with pytest.raises(ValueError, match="overflows torch.float32"):
        train_stream(strategy(model, _sgd(model), [SIPlugin(1.0, eps=1e39)]),
                     make_stream(make_tasks(dtype=torch.float32)))


def test_excluding_every_parameter_warns_that_si_is_off(tasks):
    model = mlp()
    with pytest.warns(UserWarning, match="SI regularizes no parameter"):
        train_stream(strategy(model, _sgd(model), [SIPlugin(1.0, excluded_parameters="*")]),
                     make_stream(tasks[:1]))


# ------------------------------------------------------------------ the functional API's pairing


def test_functional_api_refuses_parameters_that_do_not_fit_its_state():
    model = mlp()
    params = list(model.parameters())
    F.si_pre_optim_step(model, params)
    for p in params:
        p.grad = torch.ones_like(p)
    F.si_post_optim_step(model, params)
    with pytest.raises(ValueError, match=r"shape \(8, 6\) but parameter #0 has shape \(8,\)"):
        F.si_pre_optim_step(model, [params[1], params[0]] + params[2:])
    F.si_pre_optim_step(model, params, no_pre_step_ckpt=True)
    with pytest.raises(ValueError, match="broadcasting is refused"):
        F.si_post_optim_step(model, params, delta_params=[torch.zeros(1) for _ in params])


# ------------------------------------------------------------------ accumulation in a template


class AccumulatingNaive(AccumulateEverySecond, Naive):
    """Naive with gradient accumulation, as a user adds it."""


@pytest.mark.parametrize("importance", ["total", "task"])
def test_an_avalanche_template_that_accumulates_gradients_equals_the_larger_batch(importance):
    # two mini-batches of 4 per optimizer step (each loss halved) against one of 8: the penalty
    # acts once per optimizer step and ω counts each step once, as SI by the definition does
    tasks = make_tasks()
    ref_model = mlp()
    names = [n for n, _ in ref_model.named_parameters()]
    ref_omega, ref_model = reference_si(ref_model, _sgd(ref_model), tasks, [(names, 3.0, 0.1)],
                                        importance=importance, mb=8)
    model, si = mlp(), SIPlugin(3.0, eps=0.1, importance=importance)
    train_stream(strategy(model, _sgd(model), [si], mb=4, cls=AccumulatingNaive),
                 make_stream(tasks))
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=n)
    for n in names:
        torch.testing.assert_close(si.importances()[n], ref_omega[n], rtol=1e-9, atol=1e-12)
    assert si.consolidations == 3


def test_delta_params_refuses_gradient_accumulation(tasks):
    model = mlp()
    strat = strategy(model, _sgd(model), [SIPlugin(1.0, importance="delta_params")], mb=4,
                     cls=AccumulatingNaive)
    with pytest.raises(RuntimeError, match="did not step after this backward pass"):
        train_stream(strat, make_stream(tasks))


@pytest.mark.parametrize("importance", ["total", "task"])
def test_a_plain_loop_may_call_the_engine_on_every_micro_batch(tasks, importance):
    # before_step()/after_step() around every backward pass, the optimizer stepping every
    # second one: the same as calling them once per step
    runs = []
    for per_micro_batch in (False, True):
        model = mlp()
        opt = _sgd(model)
        si = SynapticIntelligence(model, opt, si_lambda=3.0, eps=0.1, importance=importance)
        ce = torch.nn.CrossEntropyLoss()
        for x, y, _ in tasks:
            si.start_task()
            for _ in range(2):
                for i in range(0, len(x), 8):
                    opt.zero_grad()
                    for j in (i, i + 4):
                        (ce(model(x[j:j + 4]), y[j:j + 4]) / 2).backward()
                        if per_micro_batch or j == i + 4:
                            si.before_step()
                        if j == i + 4:
                            opt.step()
                        if per_micro_batch or j == i + 4:
                            si.after_step()
            si.end_task()
        runs.append((weights(model), omegas(si)))
    for a, b in ((runs[0][0], runs[1][0]), (runs[0][1], runs[1][1])):
        # with "total" the penalty joins the sum after the first pass, not the last: the same
        # up to the order of a float addition
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-12, atol=1e-14, msg=n)


def test_functional_api_refuses_the_same_parameters_in_another_order():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    params = list(model.parameters())  # two (4, 4) weights, two (4,) biases
    F.si_pre_optim_step(model, params)
    for p in params:
        p.grad = torch.ones_like(p)
    F.si_post_optim_step(model, params)
    with pytest.raises(ValueError, match="another order"):
        F.si_pre_optim_step(model, [params[2], params[1], params[0], params[3]])
    model[1].weight = torch.nn.Parameter(torch.zeros(4, 4))  # a new object: fine
    F.si_pre_optim_step(model, list(model.parameters()))
