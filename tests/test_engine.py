"""The engine in a plain PyTorch loop, against SI by the definition (float64) and the plugin."""

import subprocess
import sys

import pytest
import torch

from avalanche_si import ParamGroup, SynapticIntelligence
from conftest import (DEVICES, assert_same, make_stream, make_tasks, mlp, reference_si, strategy,
                      train_loop, train_stream, weights)

GROUPS = {"body": (["0.weight", "0.bias", "2.weight", "2.bias"], 0.7, 1e-3),
          "head": (["4.weight", "4.bias"], 3.0, 0.1)}
IMPORTANCES = ["total", "task", "delta_params"]


def _si(model, opt, importance, **kwargs):
    return SynapticIntelligence(model, opt, si_lambda=123.0, eps=5.0, importance=importance,
                                groups={n: ParamGroup(params=names, si_lambda=c, eps=xi)
                                        for n, (names, c, xi) in GROUPS.items()}, **kwargs)


def _trained(tasks, importance, *, device="cpu", **loop):
    """The grouped engine on an MLP under Adam (lr 0.05), trained by the plain loop."""
    model = mlp(device=device)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    si = _si(model, opt, importance)
    train_loop(model, opt, tasks, si, **loop)
    return model, si


def _plugin_trained(tasks, importance, *, after=lambda plugin: []):
    """The same through SIPlugin in Avalanche; `after(plugin)`: plugins listed after it."""
    from avalanche_si import SIPlugin

    model = mlp()
    plugin = SIPlugin(123.0, eps=5.0, importance=importance, groups={
        n: ParamGroup(params=names, si_lambda=c, eps=xi) for n, (names, c, xi) in GROUPS.items()})
    train_stream(strategy(model, torch.optim.Adam(model.parameters(), lr=0.05),
                          [plugin, *after(plugin)]), make_stream(tasks))
    return model, {f"{g}/{n}": o for g in plugin.group_names
                   for n, o in plugin.importances(g).items()}


def _omegas(si):
    return {f"{g}/{n}": o for g in si.group_names for n, o in si.importances(g).items()}


def _close(a, b, **tol):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], msg=n, **(tol or dict(rtol=1e-9, atol=1e-12)))


def _reference(tasks, importance, *, device="cpu", opt=lambda p: torch.optim.Adam(p, lr=0.05),
               **kwargs):
    model = mlp(device=device)
    ref_omega, model = reference_si(model, opt(model.parameters()), tasks, list(GROUPS.values()),
                                    importance=importance, **kwargs)
    return weights(model), {f"{g}/{n}": ref_omega[n] for g, (names, _, _) in GROUPS.items()
                            for n in names}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("importance", IMPORTANCES)
def test_plain_loop_matches_the_definition(tasks, importance, device):
    ref_w, ref_o = _reference(tasks, importance, device=device)
    model, si = _trained(tasks, importance, device=device)
    _close(weights(model), ref_w)
    _close(_omegas(si), ref_o)
    assert si.consolidations == 3 and all(o.abs().max() > 0 for o in ref_o.values())


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_plain_loop_is_the_plugin_bit_for_bit(tasks, importance):
    model, si = _trained(tasks, importance)
    plugin_model, plugin_omegas = _plugin_trained(tasks, importance)
    assert_same(weights(model), weights(plugin_model))
    assert_same(_omegas(si), plugin_omegas)


@pytest.mark.parametrize("accumulate", [2, 4])
@pytest.mark.parametrize("importance", IMPORTANCES)
def test_gradient_accumulation_equals_the_larger_batch(tasks, importance, accumulate):
    # k backward passes on mb/k samples (loss / k), one optimizer step: the penalty acts once
    # per step and ω counts each step once, as one step on the whole mini-batch does
    ref_w, ref_o = _reference(tasks, importance)
    model, si = _trained(tasks, importance, accumulate=accumulate)
    _close(weights(model), ref_w)
    _close(_omegas(si), ref_o)


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_gradient_clipping_clips_the_penalty_with_the_task_gradient(tasks, importance):
    # before_step() adds the penalty's gradient, then the loop clips: the same as clipping the
    # gradient of task loss + penalty, which is what the definition clips
    def clip(model):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)

    ref_w, ref_o = _reference(tasks, importance if importance != "delta_params" else "total",
                              opt=lambda p: torch.optim.SGD(p, lr=0.1), rewrite_grads=clip)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    si = _si(model, opt, importance if importance != "delta_params" else "total")
    train_loop(model, opt, tasks, si, clip=0.5)
    _close(weights(model), ref_w)
    _close(_omegas(si), ref_o)
    unclipped_w, _ = _reference(tasks, "total", opt=lambda p: torch.optim.SGD(p, lr=0.1))
    assert any(not torch.allclose(unclipped_w[n], ref_w[n]) for n in ref_w)  # the clip acted


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_lr_scheduler_stepping_every_step(tasks, importance):
    ref_model = mlp()
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=0.05)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=3, gamma=0.7)
    ref_omega, ref_model = reference_si(ref_model, ref_opt, tasks, list(GROUPS.values()),
                                        importance=importance, on_step=ref_sched.step)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    si = _si(model, opt, importance)
    train_loop(model, opt, tasks, si, on_step=sched.step)
    _close(weights(model), weights(ref_model))
    _close(_omegas(si), {f"{g}/{n}": ref_omega[n] for g, (names, _, _) in GROUPS.items()
                         for n in names})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("importance", IMPORTANCES)
def test_grad_scaler_gives_exactly_the_unscaled_training(device, importance):
    tasks = make_tasks(dtype=torch.float32)
    runs = []
    for scaler in (None, torch.amp.GradScaler(device, init_scale=2.0 ** 12)):
        model = mlp(dtype=torch.float32, device=device)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        si = _si(model, opt, importance, scaler=scaler)
        train_loop(model, opt, tasks, si, scaler=scaler)
        runs.append((weights(model), _omegas(si)))
    assert_same(runs[0][0], runs[1][0])
    assert_same(runs[0][1], runs[1][1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("importance", IMPORTANCES)
def test_a_step_the_scaler_skips_adds_nothing(device, importance):
    tasks = make_tasks(dtype=torch.float32)
    model = mlp(dtype=torch.float32, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(device)
    si = _si(model, opt, importance, scaler=scaler)
    seen = {}

    def poison(model, step):
        if step in (4, 17):  # task 1 and, with the penalty on, task 2
            model[0].weight.grad[0, 0] = float("inf")
            seen[step] = ([t.clone() for g in si._groups for t in g.running], weights(model))
        elif step - 1 in seen:
            before_running, before_w = seen[step - 1]
            after_running = [t for g in si._groups for t in g.running]
            assert all(torch.equal(a, b) for a, b in zip(before_running, after_running))
            assert_same(before_w, weights(model))

    train_loop(model, opt, tasks, si, scaler=scaler, on_backward=poison)
    assert set(seen) == {4, 17}
    assert all(torch.isfinite(o).all() for o in _omegas(si).values())


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_bf16_autocast_with_scaler_stays_near_float32(importance):
    tasks = make_tasks(dtype=torch.float32)
    runs = []
    for autocast in (None, torch.bfloat16):
        model = mlp(dtype=torch.float32)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler("cpu") if autocast else None
        si = _si(model, opt, importance, scaler=scaler)
        train_loop(model, opt, tasks, si, scaler=scaler, autocast=autocast)
        runs.append((weights(model), _omegas(si)))
    for n in runs[0][0]:
        torch.testing.assert_close(runs[1][0][n], runs[0][0][n], rtol=0.05, atol=0.02, msg=n)
    total = sum(o.sum() for o in runs[0][1].values())
    err = sum((runs[1][1][n] - runs[0][1][n]).abs().sum() for n in runs[0][1])
    assert err / total < 0.05, float(err / total)


def test_compiled_model_trains_as_the_plain_one(tasks):
    runs = []
    for wrap in (lambda m: m, lambda m: torch.compile(m, backend="eager")):
        model = mlp()
        wrapped = wrap(model)
        opt = torch.optim.Adam(wrapped.parameters(), lr=0.05)
        si = _si(wrapped, opt, "total")
        train_loop(wrapped, opt, tasks, si)
        runs.append((weights(model), _omegas(si)))
    assert sorted(runs[1][1]) == sorted(runs[0][1])  # plain names, not _orig_mod.*
    assert_same(runs[0][0], runs[1][0])
    assert_same(runs[0][1], runs[1][1])


def test_state_dict_round_trip_resumes_exactly(tasks):
    full = mlp()
    opt = torch.optim.SGD(full.parameters(), lr=0.1)
    full_si = SynapticIntelligence(full, opt, si_lambda=5.0, eps=0.1)
    train_loop(full, opt, tasks, full_si)

    first = mlp()
    opt = torch.optim.SGD(first.parameters(), lr=0.1)
    si = SynapticIntelligence(first, opt, si_lambda=5.0, eps=0.1)
    train_loop(first, opt, tasks[:1], si)
    state = si.state_dict()
    resumed = SynapticIntelligence(si_lambda=5.0, eps=0.1)
    resumed.load_state_dict(state)
    resumed.bind(first, opt)
    train_loop(first, opt, tasks[1:], resumed)
    assert_same(weights(first), weights(full))
    assert_same(resumed.importances(), full_si.importances())
    assert resumed.consolidations == full_si.consolidations == 3


def test_calls_out_of_order_and_bad_arguments_say_what_to_do():
    si = SynapticIntelligence(si_lambda=1.0)
    with pytest.raises(RuntimeError, match=r"before_step\(\) before bind"):
        si.before_step()
    with pytest.raises(RuntimeError, match=r"start_task\(\) before bind"):
        si.start_task()
    with pytest.raises(RuntimeError, match="before the engine has the model's parameters"):
        si.consolidate_now()
    with pytest.raises(TypeError, match="torch.nn.Module"):
        si.bind("model")
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        si.bind(mlp(), optimizer=[1])
    with pytest.raises(TypeError, match="optimizer but no model"):
        SynapticIntelligence(optimizer=torch.optim.SGD(mlp().parameters(), lr=0.1))
    with pytest.raises(TypeError):
        SynapticIntelligence(mlp(), None, 1.0)  # options are keyword-only
    model = mlp()
    si = SynapticIntelligence(model, importance="delta_params")
    with pytest.raises(ValueError, match="bind"):
        si.start_task()
    with pytest.raises(AttributeError, match="did you mean 'si_lambda'"):
        si.si_lamda = 2.0
    with pytest.raises(AttributeError, match="SynapticIntelligence.importance cannot change"):
        si.importance = "task"


@pytest.mark.parametrize("bad, error", [
    (dict(si_lambda="1"), TypeError), (dict(si_lambda=-1.0), ValueError),
    (dict(eps="0.1"), TypeError), (dict(eps=float("inf")), ValueError),
    (dict(importance=3), TypeError), (dict(importance="tsk"), ValueError),
    (dict(regularize_norm_layers=1), TypeError), (dict(state_dtype="float32"), TypeError),
    (dict(scaler=object()), TypeError), (dict(excluded_parameters=[3]), TypeError),
])
def test_type_errors_are_type_errors_and_value_errors_are_not(bad, error):
    with pytest.raises(error) as info:
        SynapticIntelligence(**bad)
    if error is ValueError:
        assert not isinstance(info.value, TypeError)
    else:
        assert isinstance(info.value, ValueError)  # what 0.2 raised: old handlers still catch it


def test_damping_is_checked_in_one_place_for_every_api():
    from avalanche_si import functional as F

    model = mlp()
    params = list(model.parameters())
    F.si_pre_optim_step(model, params)
    for p in params:
        p.grad = torch.zeros_like(p)
    F.si_post_optim_step(model, params)
    for eps in (float("inf"), float("nan"), 0.0, -1.0):
        with pytest.raises(ValueError, match="epsilon"):
            F.si_compute_importance(model, params, epsilon=eps)
        with pytest.raises(ValueError, match="eps"):
            SynapticIntelligence(eps=eps)


def test_importing_the_engine_and_the_core_loads_no_framework():
    code = ("import sys, avalanche_si, avalanche_si.engine, avalanche_si.functional; "
            "from avalanche_si import SynapticIntelligence, ParamGroup; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('avalanche', 'lightning', 'pytorch_lightning')); print(bad)")
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    assert "avalanche." not in out.stderr.replace("avalanche_si", "")  # -X importtime's list
    # and the plugin still comes from the package face, loading Avalanche then
    code = "import avalanche_si, sys; avalanche_si.SIPlugin; print('avalanche' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


#: the package's layers, bottom up (docs/guide/architecture.md draws them); `estimators` is a
#: subpackage, one module per estimator
LAYERS = {"core": ["options", "_fused", "_compat", "functional", "groups", "state", "optim_step",
                   "amp", "consolidation", "graphs", "observe", "sharding"],
          "estimators": ["estimators"], "rooms": ["lists", "binding", "step", "legacy"],
          "engine": ["engine"], "adapter": ["plugin", "lightning"], "logger": ["wandb_logger"]}


def test_no_module_imports_a_layer_above_its_own():
    import re
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[1] / "src" / "avalanche_si"
    rank = {m: i for i, mods in enumerate(LAYERS.values()) for m in mods}
    assert set(rank) | {"__init__"} == {p.stem for p in pkg.glob("*.py")} | \
        {p.name for p in pkg.iterdir() if (p / "__init__.py").exists()}, "a module without a layer"
    page = (pkg.parents[1] / "docs" / "guide" / "architecture.md").read_text()
    sources = [(m, pkg / f"{m}.py") for m in rank if (pkg / f"{m}.py").exists()]
    sources += [(p.name, q) for p in pkg.iterdir() if (p / "__init__.py").exists()
                for q in p.glob("*.py")]
    for module in rank:
        assert f"`{module}`" in page or module == "_compat", module
    pattern = r"^\s*from (\.+)(\w*) import ?\(?\s*(\w*)"
    for module, path in sources:
        inside = path.parent != pkg
        for dots, name, first in re.findall(pattern, path.read_text(), re.M):
            if inside and dots == ".":
                continue  # a module of its own subpackage
            name = name or first
            assert rank[name] <= rank[module], f"{path.name} imports {name}, a layer above it"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # _foreach path, fused path
@pytest.mark.parametrize("importance", IMPORTANCES)
def test_the_penalty_value_is_the_definition_also_with_negative_importances(importance, dtype):
    # clamp="none" stores negative Ω; the value c Σ Ω (θ − θ*)² at the step must keep its sign
    tasks = make_tasks(dtype=dtype)
    model = mlp(dtype=dtype)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)  # steps against g: negative ω
    si = SynapticIntelligence(model, opt, si_lambda=3.0, eps=0.1, clamp="none",
                              importance=importance)
    train_loop(model, opt, tasks[:1], si)
    omega, star = si.importances(), weights(model)
    # what clamp="none" stores when a path integral is negative: Ω < 0 for one layer (the
    # importances are SI's own tensors)
    omega["2.weight"].mul_(-1.0)
    omega = {n: o.clone() for n, o in omega.items()}
    seen, values = {}, []
    train_loop(model, opt, tasks[1:2], si, epochs=1,
               on_backward=lambda m, step: seen.setdefault(step, weights(m)),
               on_step=lambda: values.append(si.penalty))
    # the last step's value, against the weights before that step
    last = seen[max(seen)]
    want = 3.0 * sum((omega[n].double() * (last[n].double() - star[n].double()) ** 2).sum()
                     for n in omega)
    assert want < sum(3.0 * (omega[n].double().abs() * (last[n].double() - star[n].double()) ** 2
                             ).sum() for n in omega)  # signs matter here
    torch.testing.assert_close(values[-1].double(), want, rtol=1e-5 if dtype == torch.float32
                               else 1e-12, atol=0)


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # _foreach path, fused path
def test_task_importance_reuses_the_last_steps_gradient_tensors(tasks, set_to_none, dtype):
    # importance="task" gives the optimizer other tensors than the task gradient's (which ω
    # needs after the step): from the second step on, the ones the last backward pass made,
    # free once ω has them, instead of a new copy per step; and still SI by the definition
    import functools

    _, ref_o = _reference(tasks, "task")
    model = mlp(dtype=dtype)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    opt.zero_grad = functools.partial(torch.optim.Adam.zero_grad, opt, set_to_none=set_to_none)
    si = _si(model, opt, "task")
    backward, stepped = [], []
    opt.register_step_pre_hook(lambda *_: stepped.append([p.grad for p in model.parameters()]))
    train_loop(model, opt, [(x.to(dtype), y, t) for x, y, t in tasks], si,
               on_backward=lambda m, step: backward.append([p.grad for p in m.parameters()]))
    assert len(stepped) == len(backward) > 10
    assert all(a is not b for a, b in zip(stepped[0], backward[0]))
    for k in range(1, len(stepped)):
        assert all(a is b for a, b in zip(stepped[k], backward[k - 1])), k
    _close(_omegas(si), {n: o.to(dtype) for n, o in ref_o.items()},
           **({} if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-5)))


def test_task_importance_does_not_write_into_gradients_that_share_memory(tasks):
    # DDP's gradient_as_bucket_view hands out gradients that are views of one bucket, the same
    # memory every step: the last step's gradient tensors are then no place for this step's
    def into_one_bucket(model, step):
        params = list(model.parameters())
        bucket = bucket_of.setdefault(0, torch.empty(sum(p.numel() for p in params),
                                                     dtype=params[0].dtype))
        at = 0
        for p in params:
            view = bucket[at:at + p.numel()].view_as(p)
            view.copy_(p.grad)
            p.grad, at = view, at + p.numel()

    _, ref_o = _reference(tasks, "task")
    bucket_of = {}
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    si = _si(model, opt, "task")
    train_loop(model, opt, tasks, si, on_backward=into_one_bucket)
    _close(_omegas(si), ref_o)


# ------------------------------------------- restart_path: weights re-initialised per task


def _reinit(model):
    """New weights at a task's start, the same draw in every run (Benzing's re-initialisation)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _restart(model, si, t):
    if t > 0:
        _reinit(model)
        si.restart_path()


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_restart_path_measures_the_task_from_the_new_weights(tasks, importance):
    ref_w, ref_o = _reference(tasks, importance, reinit=_reinit)
    model, si = _trained(tasks, importance, on_task_start=_restart)
    _close(weights(model), ref_w)
    _close(_omegas(si), ref_o)
    # without restart_path the jump to the new weights counts as path: another Ω
    _, plain = _trained(tasks, importance, on_task_start=lambda m, s, t: t and _reinit(m))
    assert not all(torch.allclose(a, b) for a, b in zip(_omegas(plain).values(),
                                                         ref_o.values()))
    assert not any(si._state.path_start.values())  # kept only until the consolidation


def test_restart_path_once_training_began_is_refused_and_changes_nothing(tasks):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    si = SynapticIntelligence(model, opt, si_lambda=1.0)
    train_loop(model, opt, tasks[:1], si)
    x, y, _ = tasks[1]
    torch.nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
    si.before_step()
    with pytest.raises(RuntimeError, match="before the first step"):
        si.restart_path()
    opt.step()
    si.after_step()
    with pytest.raises(RuntimeError, match="before the first step"):
        si.restart_path()
    assert not any(si._state.path_start.values())
    with pytest.raises(RuntimeError, match="bind"):
        SynapticIntelligence().restart_path()


def test_restart_path_is_saved_with_the_state_and_resumes_exactly(tasks):
    full = mlp()
    opt = torch.optim.SGD(full.parameters(), lr=0.1)
    full_si = SynapticIntelligence(full, opt, si_lambda=5.0, eps=0.1)
    train_loop(full, opt, tasks, full_si, on_task_start=_restart)

    first = mlp()
    opt = torch.optim.SGD(first.parameters(), lr=0.1)
    si = SynapticIntelligence(first, opt, si_lambda=5.0, eps=0.1)
    train_loop(first, opt, tasks[:1], si)
    si.start_task()
    _restart(first, si, 1)  # saved between the restart and the task's first step
    state = si.state_dict()
    assert set(state["path_start"]) == {f"si_path_start_weights_{i}" for i in range(6)}
    resumed = SynapticIntelligence(si_lambda=5.0, eps=0.1)
    resumed.load_state_dict(state)
    resumed.bind(first, opt)
    train_loop(first, opt, tasks[1:], resumed,
               on_task_start=lambda m, s, t: _restart(m, s, t + 1) if t else None)
    assert_same(weights(first), weights(full))
    assert_same(resumed.importances(), full_si.importances())
    assert "path_start" not in resumed.state_dict()

    broken = dict(state, path_start={**state["path_start"], "si_path_start_weights_9": 0})
    with pytest.raises(ValueError, match="belong to no parameter"):
        SynapticIntelligence().load_state_dict(broken)
    broken = dict(state, path_start={"si_path_start_weights_0": torch.zeros(3)})
    with pytest.raises(ValueError, match="shape"):
        SynapticIntelligence().load_state_dict(broken)
    nan = state["path_start"]["si_path_start_weights_0"] * float("nan")
    broken = dict(state, path_start={**state["path_start"], "si_path_start_weights_0": nan})
    with pytest.raises(ValueError, match="path start 'si_path_start_weights_0'.*non-finite"):
        SynapticIntelligence().load_state_dict(broken)


def test_restart_path_keeps_nothing_for_sos(tasks):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    si = SynapticIntelligence(model, opt, importance="sos")
    train_loop(model, opt, tasks[:1], si)
    si.start_task()
    si.restart_path()
    assert not any(si._state.path_start.values())


def test_restart_path_in_avalanche_is_the_plain_loop_bit_for_bit(tasks):
    from avalanche.core import SupervisedPlugin

    class Reinit(SupervisedPlugin):  # after SIPlugin in the list: SI has bound the model
        def __init__(self, si):
            super().__init__()
            self.si = si

        def before_training_exp(self, strategy, **kwargs):
            if strategy.clock.train_exp_counter > 0:
                _reinit(strategy.model)
                self.si.restart_path()

    model, si = _trained(tasks, "task", on_task_start=_restart)
    plugin_model, plugin_omegas = _plugin_trained(tasks, "task",
                                                  after=lambda plugin: [Reinit(plugin)])
    assert_same(weights(model), weights(plugin_model))
    assert_same(_omegas(si), plugin_omegas)


def test_a_diverged_task_drops_its_path_start_and_may_restart_again(tasks):
    from avalanche_si import NonFiniteImportanceError

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    si = SynapticIntelligence(model, opt, si_lambda=1.0)
    train_loop(model, opt, tasks[:1], si)
    saved = weights(model)
    si.start_task()
    _restart(model, si, 1)
    x, y, _ = tasks[1]
    torch.nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
    model[0].weight.grad.fill_(float("nan"))
    si.before_step()
    opt.step()
    si.after_step()
    with pytest.raises(NonFiniteImportanceError):
        si.end_task()
    # ω was reset and the weights are restored: the pending start no longer belongs to a path
    assert not any(si._state.path_start.values())
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    si.restart_path()  # a new attempt may re-initialise again
    assert any(si._state.path_start.values())
