"""Options that change during training, numbers of every kind, typos and fixed options."""

import numpy as np
import pytest
import torch

from avalanche_si import ParamGroup, SIPlugin
from conftest import (assert_same, make_stream, make_tasks, mlp, omegas, strategy, weights)


# ------------------------------------------------------------------ options that change


def _run_with(si, tasks=None, *, between=None, opt=lambda p: torch.optim.SGD(p, lr=0.1)):
    tasks = tasks or make_tasks()
    model = mlp()
    strat = strategy(model, opt(model.parameters()), [si])
    for k, exp in enumerate(make_stream(tasks).train_stream):
        if between is not None:
            between(k, si)
        strat.train(exp, shuffle=False, num_workers=0, eval_streams=[])
    return weights(model), omegas(si)


def test_assigning_the_strength_takes_effect():
    def off_after_first(k, si):
        if k == 1:
            si.si_lambda = 0.0
    changed = _run_with(SIPlugin(5.0), between=off_after_first)
    zero = _run_with(SIPlugin(0.0))
    assert_same(changed[0], zero[0])
    assert not torch.equal(_run_with(SIPlugin(5.0))[0]["0.weight"], zero[0]["0.weight"])


def test_assigning_a_group_strength_and_the_damping_takes_effect():
    def change(k, si):
        if k == 0:
            si.eps = 0.5
            si.group("head").si_lambda = 0.0
            si.group("head").eps = 0.05
    groups = {"body": ["0", "2"], "head": ParamGroup(params=["4"], si_lambda=9.0)}
    changed = _run_with(SIPlugin(2.0, eps=0.1, groups=groups), between=change)
    built = _run_with(SIPlugin(2.0, eps=0.5, groups={
        "body": ["0", "2"], "head": ParamGroup(params=["4"], si_lambda=0.0, eps=0.05)}))
    assert_same(changed[0], built[0])
    assert_same(changed[1], built[1])


@pytest.mark.parametrize("value", [np.float32(3.0), np.float64(3.0), np.int64(3),
                                   torch.tensor(3.0), torch.tensor([3.0]), np.array(3.0)])
def test_numpy_and_tensor_scalars_are_numbers(value):
    ref = _run_with(SIPlugin(3.0, eps=3.0))
    si = SIPlugin(value, eps=value)
    assert type(si.si_lambda) is float and type(si.eps) is float
    assert_same(ref[0], _run_with(si)[0])
    si.si_lambda, si.eps = value, value  # assigned later, too


def test_strength_per_experience_as_list_or_callable():
    # Avalanche's SynapticIntelligencePlugin takes one strength per experience, the last
    # repeated; the first experience has no penalty, so [anything, c] is c.
    ref = _run_with(SIPlugin(4.0))
    assert_same(_run_with(SIPlugin([0.0, 4.0]))[0], ref[0])
    assert_same(_run_with(SIPlugin(lambda k: 4.0 * min(k, 1)))[0], ref[0])
    schedule = _run_with(SIPlugin([0.0, 4.0, 0.0]))
    by_hand = _run_with(SIPlugin(4.0), between=lambda k, si: setattr(si, "si_lambda", 4.0 * (k < 2)))
    assert_same(schedule[0], by_hand[0])
    with pytest.raises(ValueError, match=r"si_lambda\(1\).*>= 0"):
        _run_with(SIPlugin(lambda k: -1.0 * k))
    with pytest.raises(ValueError, match=r"si_lambda\[1\]"):
        SIPlugin([1.0, float("nan")])


def test_assignments_are_checked_and_fixed_options_refuse():
    si = SIPlugin(1.0)
    for name, value, match in [("si_lambda", -1.0, "si_lambda.*>= 0"), ("eps", 0.0, "eps.*> 0"),
                               ("clamp", "relu", "clamp must be one of")]:
        with pytest.raises(ValueError, match=match):
            setattr(si, name, value)
    with pytest.raises(ValueError, match=r"groups\[None\].si_lambda"):
        si.group().si_lambda = -2
    assert si.si_lambda == 1.0 and si.eps == 1e-3 and si.clamp == "task"
    with pytest.raises(AttributeError, match="importance cannot change.*new SIPlugin"):
        si.importance = "task"
    with pytest.raises(AttributeError, match="no option 'si_lamda'.*did you mean 'si_lambda'"):
        si.si_lamda = 0.0
    with pytest.raises(AttributeError, match="si_lambda and eps"):
        si.group().lr = 1
    with pytest.raises(KeyError, match="no SI group 'x'"):
        si.group("x")


def test_options_given_by_position_say_they_are_keyword_only():
    # before: Python's "takes from 1 to 2 positional arguments but 3 were given"
    import torch

    from avalanche_si import SIPlugin, SynapticIntelligence

    with pytest.raises(TypeError, match=r"SIPlugin\(\) takes si_lambda by position; its "
                                        r"options are keyword-only, as in SIPlugin\(si_lambda, "
                                        r"eps=0.1"):
        SIPlugin(10, 0.1)
    with pytest.raises(TypeError, match=r"takes model, optimizer by position"):
        SynapticIntelligence(torch.nn.Linear(2, 2), None, 1.0)
    assert SIPlugin(10, eps=0.1).si_lambda == 10.0  # as documented
