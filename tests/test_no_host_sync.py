"""The step path never synchronises with the host: no .item(), bool(tensor), .cpu(), printing."""

import contextlib
from types import SimpleNamespace

import pytest
import torch

from avalanche_si import SIPlugin, _fused

FORBIDDEN = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__",
             "__repr__", "__str__", "__format__")
STEP_HOOKS = ("before_training_iteration", "before_backward", "after_backward", "before_update",
              "after_update", "after_training_iteration")


@contextlib.contextmanager
def no_host_sync(allowed_ids=frozenset()):
    """Fail on any host-synchronising Tensor method, except on tensors in ``allowed_ids``."""
    originals = {name: getattr(torch.Tensor, name) for name in FORBIDDEN}
    calls = []

    def guard(name):
        original = originals[name]

        def wrapper(self, *args, **kwargs):
            if id(self) not in allowed_ids:
                calls.append(name)
                raise AssertionError(f"host synchronisation in the step path: Tensor.{name}")
            return original(self, *args, **kwargs)
        return wrapper

    for name in FORBIDDEN:
        setattr(torch.Tensor, name, guard(name))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


@pytest.mark.parametrize("path", ["fused", "foreach"])
@pytest.mark.parametrize("importance", ["total", "task", "delta_params"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_step_hooks_never_sync(importance, optimizer, path):
    if path == "fused" and not _fused.available():
        pytest.skip(f"fused kernels unavailable: {_fused.why_not}")
    # "foreach" is what a GPU runs: the C kernels take contiguous float32 CPU tensors only
    with (_fused.disabled() if path == "foreach" else contextlib.nullcontext()):
        _step_hooks_never_sync(importance, optimizer)


def _step_hooks_never_sync(importance, optimizer):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.01) if optimizer == "adam" else \
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    si = SIPlugin(1.0, importance=importance, groups={"a": ["0"], "b": ["2"]})
    s = SimpleNamespace(model=model, optimizer=opt, loss=None,
                        clock=SimpleNamespace(train_exp_counter=0))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    checked = 0
    for exp in range(3):
        si.before_training_exp(s)
        for _ in range(4):
            opt.zero_grad()
            s.loss = torch.nn.functional.cross_entropy(model(x), y)
            hooks = {h: getattr(si, h) for h in STEP_HOOKS}
            # torch keeps Adam's step counters on the host (capturable=False): reading
            # them is not a device synchronisation, and torch's own step reads them too.
            host_scalars = {id(st["step"]) for st in opt.state.values() if "step" in st}
            with no_host_sync(host_scalars):
                hooks["before_training_iteration"](s)
                hooks["before_backward"](s)
            s.loss.backward()
            with no_host_sync(host_scalars):
                hooks["after_backward"](s)
                hooks["before_update"](s)
            opt.step()
            with no_host_sync(host_scalars):
                hooks["after_update"](s)
                hooks["after_training_iteration"](s)
            checked += 1
        si.after_training_exp(s)
    assert checked == 12 and si.importances("a")["0.weight"].sum() > 0


def test_the_guard_catches_a_sync():
    with pytest.raises(AssertionError, match="Tensor.item"):
        with no_host_sync():
            torch.ones(()).item()
    with pytest.raises(AssertionError, match="__bool__"):
        with no_host_sync():
            bool(torch.ones(()))


@pytest.mark.parametrize("path", ["fused", "foreach"])
@pytest.mark.parametrize("importance", ["siu", "sib", "sos"])
def test_benzings_estimators_never_sync(importance, path):
    # the engine's per-step calls, with the independent gradient recorded as a loop hands it
    if path == "fused" and not _fused.available():
        pytest.skip(f"fused kernels unavailable: {_fused.why_not}")
    with (_fused.disabled() if path == "foreach" else contextlib.nullcontext()):
        _engine_steps_never_sync(importance)


@pytest.mark.parametrize("importance", ["total", "task", "delta_params", "siu", "sib", "sos"])
def test_steps_with_a_grad_scaler_never_sync(importance):
    # the scaler's own found_inf bookkeeping is the scaler's; SI's reads of it must not sync
    _engine_steps_never_sync(importance, scaler=True)


@contextlib.contextmanager
def cuda_sync_errors(allowed_ids=frozenset()):
    """CUDA's own detector: any synchronising CUDA call raises."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _engine_steps_never_sync(importance, scaler=False, device="cpu", guard=no_host_sync,
                             cuda_graphs=False):
    """SI's per-step calls (and nothing else: the scaler's step and update read found_inf
    on the host by design) inside `guard`; with `cuda_graphs`, the gradients are zeroed in
    place (the same tensors every step), so that graphs are captured and replayed."""
    from avalanche_si import SynapticIntelligence

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    amp_scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 8) if scaler else None
    si = SynapticIntelligence(model, opt, si_lambda=1.0, importance=importance,
                              scaler=amp_scaler, cuda_graphs=cuda_graphs)
    x, y = torch.randn(16, 5, device=device), torch.randint(0, 3, (16,), device=device)
    xu, yu = torch.randn(16, 5, device=device), torch.randint(0, 3, (16,), device=device)
    ce = torch.nn.functional.cross_entropy
    checked = 0
    for task in range(3):
        si.start_task()
        for _ in range(4):
            host_scalars = {id(st["step"]) for st in opt.state.values() if "step" in st}
            if importance in ("siu", "sib"):
                loss_u = ce(model(xu), yu)
                with guard(host_scalars):
                    si.record_independent_gradient(loss_u)
            opt.zero_grad(set_to_none=not cuda_graphs)
            loss = ce(model(x), y)
            (amp_scaler.scale(loss) if scaler else loss).backward()
            with guard(host_scalars):
                si.before_step()
            if scaler:
                amp_scaler.step(opt)
                amp_scaler.update()
            else:
                opt.step()
            with guard(host_scalars):
                si.after_step(loss.detach())
            checked += 1
        si.end_task()
    assert checked == 12 and float(sum(o.sum() for o in si.importances().values())) > 0
    if cuda_graphs:
        assert si._groups[0].graphs.replays > 0


@pytest.mark.parametrize("scaler", [False, True])
@pytest.mark.parametrize("importance", ["total", "task"])
def test_graphed_steps_never_sync(graphs_everywhere, importance, scaler):
    # the keys are built from data pointers (no device access); on the CPU the stand-in
    # graphs run the eager work, whose reads are checked by the test above
    _engine_steps_never_sync(importance, scaler=scaler, cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("scaler", [False, True])
@pytest.mark.parametrize("importance", ["total", "task", "delta_params", "siu", "sib", "sos"])
def test_cuda_engine_steps_report_no_sync(importance, scaler):
    # CUDA's own detector around the engine's per-step calls, every importance mode, with and
    # without a GradScaler
    _engine_steps_never_sync(importance, scaler=scaler, device="cuda", guard=cuda_sync_errors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("scaler", [False, True])
@pytest.mark.parametrize("importance", ["total", "task"])
def test_cuda_graph_captures_and_replays_report_no_sync(graphs_everywhere, importance, scaler):
    _engine_steps_never_sync(importance, scaler=scaler, device="cuda", guard=cuda_sync_errors,
                             cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_sync_debug_mode_reports_nothing():
    model = torch.nn.Linear(5, 3).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    si = SIPlugin(1.0)
    s = SimpleNamespace(model=model, optimizer=opt, loss=None, clock=SimpleNamespace(train_exp_counter=0))
    x, y = torch.randn(16, 5, device="cuda"), torch.randint(0, 3, (16,), device="cuda")
    for exp in range(2):
        si.before_training_exp(s)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            torch.cuda.set_sync_debug_mode("error")
            try:
                si.after_backward(s)
                si.before_update(s)
                opt.step()
                si.after_update(s)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        si.after_training_exp(s)
