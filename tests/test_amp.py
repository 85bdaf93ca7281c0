"""Mixed precision and 16-bit weights: a GradScaler's scale and skipped steps, autocast,
float32 state for bf16/fp16 weights. Each setup exact, or within a stated tolerance."""

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive

from avalanche_si import NonFiniteImportanceError, SIPlugin
from avalanche_si import functional as F
from conftest import (DEVICES, IMPORTANCES, AccumulateEverySecond, Every, assert_same,
                      make_stream, make_tasks, mlp, omegas, strategy, train_stream, weights)


# --------------------------------------------------------------------- mixed precision


class AMPNaive(Naive):
    """Mixed precision as users add it to Avalanche 0.6.0, whose templates have none."""

    def __init__(self, *args, scaler, autocast_dtype=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaler = scaler
        self.autocast_dtype = autocast_dtype

    def forward(self):
        if self.autocast_dtype is None:
            return super().forward()
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            return super().forward().float()

    def backward(self):
        self.scaler.scale(self.loss).backward()

    def optimizer_step(self):
        self.scaler.step(self.optimizer)
        self.scaler.update()


def _train(device, importance, *, amp_scaler=None, autocast_dtype=None, extra=(), si_lambda=20.0,
           opt=lambda p: torch.optim.Adam(p, lr=0.05), cls=None, tasks=None, mb=None):
    tasks = tasks or make_tasks(dtype=torch.float32)
    model = mlp(dtype=torch.float32, device=device)
    si = SIPlugin(si_lambda, eps=0.1, importance=importance)
    kwargs = {}
    if amp_scaler is not None:
        cls, kwargs = cls or AMPNaive, dict(scaler=amp_scaler, autocast_dtype=autocast_dtype)
    if mb is not None:
        kwargs["mb"] = mb
    strat = strategy(model, opt(model.parameters()), [*extra, si], cls=cls or Naive, **kwargs)
    train_stream(strat, make_stream(tasks))
    return weights(model), omegas(si)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("importance", IMPORTANCES + ["siu", "sib", "sos"])
def test_grad_scaler_gives_exactly_the_unscaled_training(device, importance):
    # Loss scales are powers of two: scaling and unscaling float32 gradients is exact, so
    # with the scaler found on the strategy, training is bit-identical to training without.
    plain = _train(device, importance)
    scaled = _train(device, importance, amp_scaler=torch.amp.GradScaler(device))
    assert_same(plain[0], scaled[0])
    assert_same(plain[1], scaled[1])


def _inf_grad(strategy):
    strategy.model[0].weight.grad[0, 0] = float("inf")


def _zero_loss(strategy):
    strategy.loss = strategy.loss * 0.0


class AccumulatingAMPNaive(AccumulateEverySecond, AMPNaive):
    """AMP with gradient accumulation: the scaler steps every second mini-batch."""


class PoisonLoss(SupervisedPlugin):
    """Makes the loss of the given training iterations infinite (an fp16 overflow)."""

    def __init__(self, at):
        super().__init__()
        self.at, self.k, self.weights = at, 0, {}

    def before_backward(self, strategy, **kwargs):
        if self.k in self.at:
            strategy.loss = strategy.loss * float("inf")

    def after_update(self, strategy, **kwargs):
        self.weights[self.k] = {n: p.detach().clone() for n, p in strategy.model.named_parameters()}
        self.k += 1


@pytest.mark.parametrize("importance", ["total", "task"])
def test_gradient_accumulation_with_a_grad_scaler_equals_it_without(importance):
    # the scaler unscales at SI's first after_backward; SI scales the gradients back when the
    # optimizer did not step, so the next backward pass adds S·g to S·g: the same run as with
    # a disabled scaler, to float tolerance (the scale is a power of 2)
    runs = []
    for enabled in (False, True):
        scaler = torch.amp.GradScaler("cpu", enabled=enabled)
        runs.append(_train("cpu", importance, amp_scaler=scaler, cls=AccumulatingAMPNaive,
                           mb=4))
    (w0, o0), (w1, o1) = runs
    for n in w0:
        torch.testing.assert_close(w1[n], w0[n], rtol=1e-5, atol=1e-6)
    for n in o0:
        torch.testing.assert_close(o1[n], o0[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("at", [6, 7])  # the first or the second mini-batch of the 4th step
@pytest.mark.parametrize("importance", ["total", "task"])
def test_an_inf_in_one_accumulated_mini_batch_skips_the_whole_step(importance, at):
    # SI zeroes the inf/NaN entries it reads; when the step has not happened yet it puts the
    # finding back, so that the scaler still skips the real step, as it would without SI
    poison = PoisonLoss(at={at})
    scaler = torch.amp.GradScaler("cpu")
    _, omega = _train("cpu", importance, amp_scaler=scaler, cls=AccumulatingAMPNaive, mb=4,
                      extra=[poison])
    before, after = poison.weights[5], poison.weights[7]
    assert all(torch.equal(before[n], after[n]) for n in before)  # skipped
    assert not all(torch.equal(poison.weights[7][n], poison.weights[9][n]) for n in before)
    assert all(torch.isfinite(o).all() for o in omega.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("importance", IMPORTANCES + ["siu", "sib"])
def test_a_step_the_scaler_skips_adds_nothing(device, importance):
    # An inf gradient makes the scaler skip the step. With plain SGD a zero gradient moves
    # nothing either, so a run whose loss is zeroed at that step is what SI must give.
    sgd = lambda p: torch.optim.SGD(p, lr=0.1)  # noqa: E731
    at = [(0, 3), (0, 7)]
    skipped = _train(device, importance, opt=sgd, amp_scaler=torch.amp.GradScaler(device),
                     extra=[Every("after_backward", at, _inf_grad)])
    zeroed = _train(device, importance, opt=sgd, extra=[Every("before_backward", at, _zero_loss)])
    assert_same(skipped[0], zeroed[0])
    assert_same(skipped[1], zeroed[1])
    # skipped in a later experience too, with the penalty on: finite, no error
    later = _train(device, importance, opt=sgd, amp_scaler=torch.amp.GradScaler(device),
                   extra=[Every("after_backward", [(1, 2), (2, 5)], _inf_grad)])
    assert all(torch.isfinite(o).all() for o in later[1].values())


@pytest.mark.parametrize("device", DEVICES)
# (not "sib": its ω is the difference of two noisy gradients, which a 16-bit forward pass
# changes beyond this band; the scaler's handling is exact for it, as the test above shows)
@pytest.mark.parametrize("importance", IMPORTANCES + ["siu", "sos"])
def test_autocast_with_scaler_matches_float32_training(device, importance):
    low = torch.bfloat16 if device == "cpu" else torch.float16
    plain = _train(device, importance, si_lambda=200.0)
    mixed = _train(device, importance, si_lambda=200.0, amp_scaler=torch.amp.GradScaler(device),
                   autocast_dtype=low)
    for n in plain[0]:  # the forward pass in 16 bits: close, not equal
        torch.testing.assert_close(mixed[0][n], plain[0][n], rtol=0.05, atol=0.02, msg=n)
    total = sum(o.sum() for o in plain[1].values())
    err = sum((mixed[1][n] - plain[1][n]).abs().sum() for n in plain[1])
    assert err / total < 0.05, float(err / total)


@pytest.mark.parametrize("device", DEVICES)
def test_functional_api_with_grad_scaler(device):
    from avalanche_si import amp

    def train(use_scaler):
        torch.manual_seed(0)
        model = mlp(dtype=torch.float32, device=device)
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=0.1)
        scaler = torch.amp.GradScaler(device, enabled=use_scaler)
        ce = torch.nn.CrossEntropyLoss()
        for t, (x_all, y_all, _) in enumerate(make_tasks(dtype=torch.float32)):
            for i in range(0, len(x_all), 8):
                x, y = x_all[i:i + 8].to(device), y_all[i:i + 8].to(device)
                loss = ce(model(x), y)
                if t > 0:
                    loss = loss + 10.0 * F.si_regularizer(model, params)
                opt.zero_grad()
                skip = use_scaler and i == 16
                if not use_scaler and i == 16:
                    loss = loss * 0.0  # what the skipped step does with plain SGD
                scaler.scale(loss).backward()
                if skip:
                    params[0].grad[0, 0] = float("inf")
                amp.unscale_(scaler, opt, params)
                F.si_pre_optim_step(model, params)
                scaler.step(opt)
                scaler.update()
                F.si_post_optim_step(model, params)
            F.si_compute_importance(model, params, epsilon=0.1)
        return {n: b.clone() for n, b in model.named_buffers()}, weights(model)
    # the first task has no penalty: there a skipped step equals a zero step exactly
    with_scaler, without = train(True), train(False)
    assert with_scaler[0].keys() == without[0].keys()
    for n in with_scaler[0]:
        assert torch.isfinite(with_scaler[0][n]).all(), n
        torch.testing.assert_close(with_scaler[0][n], without[0][n], rtol=1e-5, atol=1e-6, msg=n)


def test_functional_api_without_unscale_a_skipped_step_adds_nothing():
    model = mlp(dtype=torch.float32)
    params = list(model.parameters())
    opt, scaler = torch.optim.SGD(params, lr=0.1), torch.amp.GradScaler("cpu")
    x, y, _ = make_tasks(dtype=torch.float32)[0]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    params[0].grad[0, 0] = float("inf")
    F.si_pre_optim_step(model, params)
    scaler.step(opt)  # skipped: the weights do not move
    scaler.update()
    F.si_post_optim_step(model, params)
    assert all(torch.equal(model.get_buffer(f"si_running_omega_weights_{i}"), torch.zeros_like(p))
               for i, p in enumerate(params))
    F.si_compute_importance(model, params)


def test_functional_api_names_a_step_that_diverged():
    model = mlp(dtype=torch.float32)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    x, y, _ = make_tasks(dtype=torch.float32)[0]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    params[0].grad[0, 0] = float("nan")  # a step that moves a weight to NaN
    F.si_pre_optim_step(model, params)
    opt.step()
    F.si_post_optim_step(model, params)
    with pytest.raises(NonFiniteImportanceError, match=r"#0.*non-finite.*GradScaler skipped"):
        F.si_compute_importance(model, params)
    with torch.no_grad():
        params[0].nan_to_num_(0.0)
    # ω was dropped: a retrained task starts anew
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    F.si_pre_optim_step(model, params)
    opt.step()
    F.si_post_optim_step(model, params)
    F.si_compute_importance(model, params)
    assert all(torch.isfinite(b).all() for b in model.buffers())


def test_scaler_option_is_checked():
    from avalanche_si import amp

    with pytest.raises(ValueError, match="scaler must be a torch.amp.GradScaler"):
        SIPlugin(scaler="amp")
    two = Naive(model=mlp(), optimizer=torch.optim.SGD(mlp().parameters(), lr=0.1))
    two.a, two.b = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    with pytest.raises(ValueError, match="several GradScalers.*SIPlugin\\(scaler=...\\)"):
        amp.find_scaler(two)


# ------------------------------------------------------------------- 16-bit weights


class PathProbe(SupervisedPlugin):
    """ω by the definition in float64 from the steps actually taken (listed before SI)."""

    def __init__(self, si):
        super().__init__()
        self.si, self.ref, self.got = si, None, None

    def after_backward(self, strategy, **kwargs):
        ps = list(strategy.model.parameters())
        if self.ref is None:
            self.ref = [torch.zeros_like(p, dtype=torch.float64) for p in ps]
        self.g = [p.grad.double() for p in ps]
        self.before = [p.detach().double() for p in ps]

    def after_update(self, strategy, **kwargs):
        for r, g, b, p in zip(self.ref, self.g, self.before, strategy.model.parameters()):
            r -= g * (p.detach().double() - b)

    def after_training_exp(self, strategy, **kwargs):
        self.got = [r.double().clone() for r in self.si.engine._groups[0].running]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_weights_accumulate_omega_within_one_percent(device, dtype):
    if dtype == torch.float16 and device == "cpu":
        pass  # float16 matmuls run on the CPU in torch 2.x
    tasks = make_tasks(1, n=8000, dtype=torch.float32)
    x, y, t = tasks[0]
    tasks = [(x.to(dtype), y, t)]
    model = mlp(dtype=dtype, device=device)
    si = SIPlugin(1.0)
    probe = PathProbe(si)
    train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.05), [probe, si],
                          epochs=1), make_stream(tasks))  # 1,000 steps
    assert all(r.dtype == torch.float32 for r in si.engine._groups[0].running)
    err = sum((g - r).abs().sum() for g, r in zip(probe.got, probe.ref))
    total = sum(r.abs().sum() for r in probe.ref)
    assert err / total <= 0.01, float(err / total)
    assert all(o.dtype == torch.float32 for o in si.importances().values())


def test_state_dtype_option():
    model = mlp(dtype=torch.float32)
    si = SIPlugin(1.0, state_dtype=torch.float64)
    train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [si]),
                 make_stream(make_tasks(2, dtype=torch.float32)))
    assert all(o.dtype == torch.float64 for o in si.importances().values())
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for p in model.parameters())
    with pytest.raises(ValueError, match="state_dtype must be"):
        SIPlugin(state_dtype=torch.float16)


@pytest.mark.parametrize("device", DEVICES)
def test_a_step_the_scaler_skips_leaves_the_sos_average_as_it_was(device):
    # SOS has no path: a skipped step must not decay v either (a zero gradient would)
    seen = {}

    def record(strategy):
        si = next(p for p in strategy.plugins if isinstance(p, SIPlugin))
        seen[strategy.clock.train_exp_iterations] = [r.clone() for r in si.engine._groups[0].running]

    _train(device, "sos", opt=lambda p: torch.optim.SGD(p, lr=0.1),
           amp_scaler=torch.amp.GradScaler(device),
           extra=[Every("after_backward", [(0, 3)], _inf_grad),
                  Every("before_backward", [(0, 3), (0, 4), (0, 5)], record)])
    assert all(torch.equal(a, b) for a, b in zip(seen[3], seen[4]))   # skipped: unchanged
    assert not all(torch.equal(a, b) for a, b in zip(seen[4], seen[5]))  # a real step moves it
