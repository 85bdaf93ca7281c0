"""torch.compile: names, groups, state and compiling between experiences."""

import pytest
import torch

from avalanche_si import ParamGroup, SIPlugin
from conftest import (assert_same, make_stream, make_tasks, mlp, omegas, strategy, train_stream,
                      weights)


# ------------------------------------------------------------------------ torch.compile


def _compiled(model):
    return torch.compile(model, backend="eager")  # the wrapper and its names; no C++ build


def test_state_saved_from_a_compiled_model_drives_the_plain_one():
    tasks = make_tasks()
    full_model, full_si = mlp(), SIPlugin(5.0, eps=0.1)
    strat = strategy(full_model, torch.optim.SGD(full_model.parameters(), lr=0.1), [full_si])
    train_stream(strat, make_stream(tasks))

    model, si = mlp(), SIPlugin(5.0, eps=0.1)
    compiled = _compiled(model)
    strat = strategy(compiled, torch.optim.SGD(compiled.parameters(), lr=0.1), [si])
    train_stream(strat, make_stream(tasks[:1]))
    state = si.state_dict()
    assert "0.weight" in state["groups"][None]["index"]  # plain names
    resumed = SIPlugin(5.0, eps=0.1)
    resumed.load_state_dict(state)
    strat = strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [resumed])
    train_stream(strat, make_stream(tasks[1:]))
    assert_same(weights(model), weights(full_model))
    assert_same(omegas(resumed), omegas(full_si))


def test_compiled_model_groups_and_exclusions_match_plain_names():
    tasks = make_tasks()
    runs = []
    for wrap in (lambda m: m, _compiled):
        model = mlp()
        si = SIPlugin(1.0, excluded_parameters=["4.bias"], groups={
            "body": ["0", "2"], "head": ParamGroup(params="4.*", si_lambda=8.0)})
        wrapped = wrap(model)
        train_stream(strategy(wrapped, torch.optim.Adam(wrapped.parameters(), lr=0.05), [si]),
                     make_stream(tasks))
        runs.append((weights(model), omegas(si)))
    assert sorted(runs[1][1]) == ["body/0.bias", "body/0.weight", "body/2.bias", "body/2.weight",
                                  "head/4.weight"]
    assert_same(runs[0][0], runs[1][0])
    assert_same(runs[0][1], runs[1][1])


def test_compiling_between_experiences_keeps_all_state():
    tasks = make_tasks()
    plain_model, plain_si = mlp(), SIPlugin(5.0, groups={"body": ["0", "2"], "head": ["4"]})
    train_stream(strategy(plain_model, torch.optim.SGD(plain_model.parameters(), lr=0.1),
                          [plain_si]), make_stream(tasks))
    model, si = mlp(), SIPlugin(5.0, groups={"body": ["0", "2"], "head": ["4"]})
    strat = strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [si])
    bench = make_stream(tasks)
    for k, exp in enumerate(bench.train_stream):
        if k == 1:
            strat.model = _compiled(model)
        strat.train(exp, shuffle=False, num_workers=0, eval_streams=[])
    assert_same(weights(model), weights(plain_model))
    assert_same(omegas(si), omegas(plain_si))


def test_compile_with_inductor():
    # the default backend, as users call it (builds C++: a few seconds on a CPU)
    pytest.importorskip("torch._inductor")
    tasks = make_tasks(dtype=torch.float32)
    model, si = mlp(dtype=torch.float32), SIPlugin(5.0)
    compiled = torch.compile(model)
    try:
        train_stream(strategy(compiled, torch.optim.SGD(compiled.parameters(), lr=0.1), [si]),
                     make_stream(tasks[:2]))
    except Exception as exc:  # no working compiler here: not this library's concern
        if "inductor" in type(exc).__module__ or "Compiler" in type(exc).__name__:
            pytest.skip(f"torch.compile unavailable here: {exc}")
        raise
    assert sorted(si.importances()) == sorted(n for n, _ in model.named_parameters())
    assert sum(float(o.sum()) for o in si.importances().values()) > 0


@pytest.mark.parametrize("importance", ["siu", "sib", "sos"])
def test_benzings_variants_on_a_compiled_model_equal_the_plain_one(importance):
    # the plugin's independent mini-batch goes through the compiled model's forward too
    tasks = make_tasks()
    runs = []
    for wrap in (lambda m: m, _compiled):
        torch.manual_seed(3)  # the plugin's independent loader is seeded from it
        model = mlp()
        si = SIPlugin(5.0, eps=0.1, importance=importance, groups={"body": ["0", "2"],
                                                                  "head": ["4"]})
        wrapped = wrap(model)
        train_stream(strategy(wrapped, torch.optim.Adam(wrapped.parameters(), lr=0.05), [si]),
                     make_stream(tasks))
        runs.append((weights(model), omegas(si)))
    assert_same(runs[0][0], runs[1][0])
    assert_same(runs[0][1], runs[1][1])
