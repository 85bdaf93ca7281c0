"""Which parameters SI regularizes: patterns, unfrozen parameters, normalization layers,
sparse gradients, and the gradient a later plugin rewrites."""

import warnings

import pytest
import torch
from avalanche.core import SupervisedPlugin

from avalanche_si import SIPlugin
from conftest import (DEVICES, Every, make_stream, make_tasks, mlp, reference_si, strategy,
                      train_stream)


def test_patterns_that_match_nothing_are_reported_when_training_starts():
    tasks = make_tasks(1)
    model = mlp()
    si = SIPlugin(1.0, groups={"body": ["0", "2"], "head": ["classifier"]})
    with pytest.raises(ValueError, match=r"group\(s\) 'head' match no parameter.*'0.weight'"):
        train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [si]),
                     make_stream(tasks))
    si = SIPlugin(1.0, excluded_parameters=["4.wieght"])
    with pytest.warns(UserWarning, match="'4.wieght' matches no parameter"):
        train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [si]),
                     make_stream(tasks))
    # a frozen parameter's name is a match: freezing is not a typo
    model[4].weight.requires_grad_(False)
    si = SIPlugin(1.0, groups={"body": ["0", "2"], "head": ["4.weight"]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [si]),
                     make_stream(tasks))
    assert not [w for w in caught if "SIPlugin" in str(w.message)]


def test_parameter_unfrozen_during_an_experience_is_tracked_from_the_next():
    tasks = make_tasks()
    model = mlp()
    model[0].weight.requires_grad_(False)
    si = SIPlugin(1.0)
    thaw = Every("before_training_iteration", [(0, 3)],
                 lambda s: s.model[0].weight.requires_grad_(True))
    strat = strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [thaw, si])
    exps = make_stream(tasks).train_stream
    with pytest.warns(UserWarning, match="'0.weight' became trainable during this experience"):
        strat.train(exps[0], shuffle=False, num_workers=0, eval_streams=[])
    assert "0.weight" not in si.importances()
    strat.train(exps[1], shuffle=False, num_workers=0, eval_streams=[])
    assert si.importances()["0.weight"].abs().sum() > 0


class BNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(6, 8).double()
        self.bn = torch.nn.BatchNorm1d(8).double()
        self.ln = torch.nn.LayerNorm(8).double()
        self.out = torch.nn.Linear(8, 2).double()

    def forward(self, x):
        return self.out(self.ln(torch.tanh(self.bn(self.fc(x)))))


def test_normalization_layers_excluded_by_default_as_in_avalanche():
    runs = {}
    for flag in (False, True):
        model, si = BNNet(), SIPlugin(1.0, regularize_norm_layers=flag)
        train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [si]),
                     make_stream(make_tasks(2)))
        runs[flag] = sorted(si.importances())
    assert runs[False] == ["fc.bias", "fc.weight", "ln.bias", "ln.weight", "out.bias", "out.weight"]
    assert runs[True] == sorted(runs[False] + ["bn.bias", "bn.weight"])


def _halve(model):
    for p in model.parameters():
        p.grad.mul_(0.5)


class HalveGrads(SupervisedPlugin):
    """What a gradient-clipping plugin does: rewrites .grad in place in after_backward."""

    def after_backward(self, strategy, **kwargs):
        _halve(strategy.model)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("importance", ["task", "total"])
def test_gradient_rewritten_by_a_later_plugin_is_defined_the_same_in_every_task(device, importance):
    # "task": ω uses the gradient as SI's after_backward finds it, in the first experience
    # (no penalty yet) as in later ones; "total": the gradient the optimizer used.
    tasks = make_tasks()
    ref_model = mlp(device=device)
    names = [n for n, _ in ref_model.named_parameters()]
    ref_omega, _ = reference_si(ref_model, torch.optim.SGD(ref_model.parameters(), lr=0.1),
                                tasks, [(names, 2.0, 0.1)], importance=importance,
                                rewrite_grads=_halve)
    model, si = mlp(device=device), SIPlugin(2.0, eps=0.1, importance=importance)
    train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [si, HalveGrads()]),
                 make_stream(tasks))
    for n in names:
        torch.testing.assert_close(si.importances()[n], ref_omega[n], rtol=1e-9, atol=1e-12)


class SparseEmbedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.EmbeddingBag(10, 8, sparse=True).double()
        self.out = torch.nn.Linear(14, 2).double()

    def forward(self, x):
        return self.out(torch.cat([self.emb((x.abs() * 3).long().clamp(max=9)), x], 1))


def test_sparse_gradients_are_refused_before_training_naming_the_fix():
    model = SparseEmbedding()
    si = SIPlugin(1.0)
    with pytest.raises(ValueError, match="'emb.weight' get sparse ones.*sparse=False.*excluded"):
        train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [si]),
                     make_stream(make_tasks(2)))
    si = SIPlugin(1.0, excluded_parameters=["emb"])
    train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [si]),
                 make_stream(make_tasks(2)))
    assert sorted(si.importances()) == ["out.bias", "out.weight"]
