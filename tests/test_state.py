"""SI's state: recovery after divergence, shapes that may grow, checked loading."""

import copy

import pytest
import torch
from avalanche.core import SupervisedPlugin

from avalanche_si import NonFiniteImportanceError, SIPlugin
from avalanche_si import functional as F
from conftest import (assert_same, make_stream, make_tasks, mlp, omegas, strategy, train_stream,
                      weights)


# ---------------------------------------------------------------- recovery after divergence


class NaNGradsOnce(SupervisedPlugin):
    def __init__(self, exp):
        super().__init__()
        self.exp, self.on = exp, True

    def after_backward(self, strategy, **kwargs):
        if self.on and strategy.clock.train_exp_counter == self.exp:
            strategy.model[0].weight.grad.fill_(float("nan"))


def test_retraining_after_divergence_equals_a_run_that_never_diverged():
    tasks = make_tasks()
    ref_model, ref_si = mlp(), SIPlugin(3.0, eps=0.1)
    train_stream(strategy(ref_model, torch.optim.SGD(ref_model.parameters(), lr=0.1), [ref_si]),
                 make_stream(tasks))

    model, si, nan = mlp(), SIPlugin(3.0, eps=0.1), NaNGradsOnce(1)
    strat = strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [nan, si])
    exps = make_stream(tasks).train_stream
    strat.train(exps[0], shuffle=False, num_workers=0, eval_streams=[])
    saved = copy.deepcopy(model.state_dict())
    with pytest.raises(NonFiniteImportanceError,
                       match=r"'0.weight'.*non-finite entries.*diverged.*Restore the weights"):
        strat.train(exps[1], shuffle=False, num_workers=0, eval_streams=[])
    state = si.state_dict()
    assert all(torch.isfinite(t).all() for t in state["buffers"].values())  # nothing NaN saved
    # the documented recovery: restore the weights, fix the cause, train the task again
    model.load_state_dict(saved)
    nan.on = False
    for exp in exps[1:]:
        strat.train(exp, shuffle=False, num_workers=0, eval_streams=[])
    assert_same(weights(model), weights(ref_model))
    assert_same(omegas(si), omegas(ref_si))


def test_damping_too_small_for_the_dtype_is_named():
    model = mlp(dtype=torch.float32)
    strat = strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [SIPlugin(eps=1e-40)])
    with pytest.raises(ValueError, match="eps = 1e-40 is below the smallest normal torch.float32"):
        train_stream(strat, make_stream(make_tasks(1, dtype=torch.float32)))
    # ω finite, but ω / ξ overflows where a weight ended where it started
    omega, prev, params = [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)]
    running = [torch.tensor([0.0, 1e3, 0.0])]
    with pytest.raises(NonFiniteImportanceError,
                       match=r"#0.*ω is finite.*overflows torch.float32.*ξ = 1e-37 is too small"):
        F.consolidate(omega, prev, running, params, eps=1e-37)


# ------------------------------------------------------------ validated structure and state


def _trained_state(tasks, **kwargs):
    model, si = mlp(**kwargs), SIPlugin(1.0)
    train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [si]),
                 make_stream(tasks))
    return model, si


def test_shape_changes_other_than_growth_are_refused_naming_both_shapes():
    tasks = make_tasks(2)
    model, si = _trained_state(tasks[:1])
    state = si.state_dict()
    # a wider hidden layer: layer 0 grows its outputs (allowed alone) but layer 2's inputs grow
    wide = mlp(hidden=16)
    fresh = SIPlugin(1.0)
    fresh.load_state_dict(state)
    with pytest.raises(ValueError, match=r"'2.weight' has shape \(8, 8\).*\(16, 16\).*first "
                                         r"dimension"):
        train_stream(strategy(wide, torch.optim.SGD(wide.parameters(), lr=0.1), [fresh]),
                     make_stream(tasks[1:]))
    # a grown input dimension, refused at load time (the plugin has seen the model)
    wider_in = mlp(dim=7)
    si_seen = SIPlugin(1.0)
    train_stream(strategy(wider_in, torch.optim.SGD(wider_in.parameters(), lr=0.1), [si_seen]),
                 make_stream([(torch.randn(16, 7, dtype=torch.float64), y[:16], 0)
                              for _, y, _ in tasks[:1]]))
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(8, 6\).*\(8, 7\)"):
        si_seen.load_state_dict(state)
    assert si_seen.importances()["0.weight"].shape == (8, 7)  # nothing changed
    # a smaller parameter
    small = SIPlugin(1.0)
    small.load_state_dict(state)
    narrow = mlp(out=1)
    with pytest.raises(ValueError, match=r"'4.weight' has shape \(2, 8\).*\(1, 8\)"):
        train_stream(strategy(narrow, torch.optim.SGD(narrow.parameters(), lr=0.1), [small]),
                     make_stream([(x, y * 0, t) for x, y, t in tasks[1:]]))


def test_load_state_dict_rejects_bad_values_and_unknown_names():
    tasks = make_tasks(2)
    _, si = _trained_state(tasks[:1])
    state = si.state_dict()
    bad = copy.deepcopy(state)
    bad["buffers"]["si_omega_weights_1"][0] = float("nan")
    with pytest.raises(ValueError, match="'si_omega_weights_1'.*non-finite"):
        SIPlugin(1.0).load_state_dict(bad)
    neg = copy.deepcopy(state)
    neg["buffers"]["si_omega_weights_2"][0, 0] = -1.0
    with pytest.raises(ValueError, match="negative entries.*clamp='none'"):
        SIPlugin(1.0).load_state_dict(neg)
    SIPlugin(1.0, clamp="none").load_state_dict(neg)
    renamed = copy.deepcopy(state)
    renamed["groups"][None]["index"] = {f"encoder.{n}": i for n, i in
                                        state["groups"][None]["index"].items()}
    loaded = SIPlugin(1.0)
    loaded.load_state_dict(renamed)
    model = mlp()
    with pytest.raises(ValueError, match=r"names 6 parameter\(s\) the model does not have.*"
                                         r"'encoder.0.bias'.*strict=False"):
        train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [loaded]),
                     make_stream(tasks[1:]))
    lenient = SIPlugin(1.0)
    lenient.load_state_dict(renamed, strict=False)
    train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [lenient]),
                 make_stream(tasks[1:]))
    assert "encoder.0.weight" in lenient.state_dict()["groups"][None]["index"]  # kept, unused


def test_a_path_start_grows_with_its_parameter_and_moves_with_it():
    from avalanche_si.state import SIState

    state = SIState([None], ("omega", "prev_theta", "running_omega"), None)
    head = torch.arange(6.0).reshape(3, 2)
    i = state.track(None, "head.weight", head)
    state.mark_path_start(None, i, head)
    grown = torch.cat([head + 100, -torch.ones(2, 2)])  # trained rows, and two new units
    state.track(None, "head.weight", grown)
    start = state.path_start[None][i]
    # the old rows' path began at the marked weights; the new rows' path begins now
    assert torch.equal(start, torch.cat([head, -torch.ones(2, 2)]))
    assert state.starts(None, ["head.weight"], [state.get(None, "prev_theta", i)])[0] is start
    state.track(None, "head.weight", grown.double())
    assert state.path_start[None][i].dtype == torch.float64
