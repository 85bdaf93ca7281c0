"""SIPlugin inside real Avalanche strategies: switches, state, dynamic models, misuse."""

import copy

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import IncrementalClassifier, MultiHeadClassifier, MultiTaskModule

from avalanche_si import NonFiniteImportanceError, ParamGroup, SIPlugin, _fused
from conftest import DEVICES, make_stream, make_tasks, mlp, strategy, train_stream, weights


@pytest.mark.parametrize("device", DEVICES)
def test_strength_zero_is_bit_identical_to_no_plugin(tasks, device):
    runs = []
    for plugins in ([], [SIPlugin(si_lambda=0.0)], [SIPlugin(0.0, importance="task")],
                    [SIPlugin(0.0, importance="delta_params")]):
        model = mlp(device=device)
        train_stream(strategy(model, torch.optim.Adam(model.parameters(), lr=0.05), plugins),
                     make_stream(tasks))
        runs.append(weights(model))
    for other in runs[1:]:
        assert all(torch.equal(runs[0][n], other[n]) for n in runs[0])


def test_strength_changes_training(tasks):
    runs = []
    for c in (0.0, 10.0):
        model = mlp()
        train_stream(strategy(model, torch.optim.Adam(model.parameters(), lr=0.05), [SIPlugin(c)]),
                     make_stream(tasks))
        runs.append(weights(model))
    assert not torch.equal(runs[0]["0.weight"], runs[1]["0.weight"])


class Probe(SupervisedPlugin):
    """Records the SI plugin's penalty and importances at each step and experience."""

    def __init__(self, si):
        super().__init__()
        self.si, self.penalties, self.omegas = si, [], []

    def after_training_iteration(self, strategy, **kwargs):
        p = self.si.penalty
        self.penalties.append((strategy.clock.train_exp_counter, None if p is None else p.item()))

    def after_training_exp(self, strategy, **kwargs):
        self.omegas.append({n: o.clone() for n, o in self.si.importances().items()})


@pytest.mark.parametrize("importance", ["total", "task", "delta_params"])
def test_omega_nonnegative_and_penalty_zero_before_first_consolidation(tasks, importance):
    model, si = mlp(), SIPlugin(5.0, importance=importance)
    probe = Probe(si)
    train_stream(strategy(model, torch.optim.Adam(model.parameters(), lr=0.05), [si, probe]),
                 make_stream(tasks))
    first = [v for exp, v in probe.penalties if exp == 0]
    assert first and all(v is None for v in first)
    for task in (1, 2):
        later = [v for exp, v in probe.penalties if exp == task]
        assert later[0] == 0.0  # a task's first step starts at θ*
        assert all(v > 0 for v in later[1:])
    for omegas in probe.omegas:
        assert all((o >= 0).all() for o in omegas.values())
        assert sum(o.sum() for o in omegas.values()) > 0
    # Ω only grows: every task adds a non-negative contribution
    for before, after in zip(probe.omegas, probe.omegas[1:]):
        assert all((after[n] >= before[n]).all() for n in before)


def test_state_on_parameter_dtype_and_model_state_dict_unchanged(tasks):
    model, si = mlp(), SIPlugin(1.0)
    reference_keys = set(model.state_dict())
    train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [si]),
                 make_stream(tasks[:2]))
    assert set(model.state_dict()) == reference_keys
    mlp(seed=1).load_state_dict(model.state_dict(), strict=True)
    state = si.state_dict()
    assert all(t.dtype == torch.float64 for t in state["buffers"].values())
    n = sum(p.numel() for p in model.parameters())
    assert sum(b.numel() for b in si.engine._state.store.buffers()) == 4 * n  # held in memory
    # saved: Ω, θ*, ω; θ_pre is scratch that every step rewrites before reading it
    assert sum(t.numel() for t in state["buffers"].values()) == 3 * n
    assert "si_omega_weights_0" in state["buffers"]


def _run(tasks, *, stop_after=None, resume=None, opt=lambda p: torch.optim.SGD(p, lr=0.1),
         device="cpu"):
    model = mlp(device=device)
    si = SIPlugin(3.0, eps=0.1)
    strat = strategy(model, opt(model.parameters()), [si])
    bench = make_stream(tasks)
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        si.load_state_dict(resume["si"])
        start = resume["next"]
    for exp in bench.train_stream[start:]:
        strat.train(exp, shuffle=False, num_workers=0, eval_streams=[])
        if stop_after is not None and exp.current_experience == stop_after:
            return {"model": copy.deepcopy(model.state_dict()), "si": si.state_dict(),
                    "next": stop_after + 1}
    return weights(model), si


@pytest.mark.parametrize("device", DEVICES)
def test_resume_from_plugin_state_dict_equals_uninterrupted(tasks, device):
    full, si_full = _run(tasks, device=device)
    saved = _run(tasks, stop_after=0, device=device)
    resumed, si_resumed = _run(tasks, resume=saved, device=device)
    for n in full:
        assert torch.equal(full[n], resumed[n]), n
    for n, o in si_full.importances().items():
        assert torch.equal(o, si_resumed.importances()[n])


@pytest.mark.parametrize("device", DEVICES)
def test_resume_from_avalanche_checkpoint_equals_uninterrupted(tasks, tmp_path, device):
    from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint

    def build():
        model = mlp(device=device)
        return strategy(model, torch.optim.Adam(model.parameters(), lr=0.05),
                        [SIPlugin(3.0, eps=0.1, importance="task")]), model

    bench = make_stream(tasks)
    strat, model = build()
    for exp in bench.train_stream:
        strat.train(exp, shuffle=False, num_workers=0, eval_streams=[])
    full = weights(model)

    strat, _ = build()
    for exp in bench.train_stream[:2]:
        strat.train(exp, shuffle=False, num_workers=0, eval_streams=[])
    save_checkpoint(strat, tmp_path / "ckpt.pkl")
    strat, _ = build()
    strat, start = maybe_load_checkpoint(strat, tmp_path / "ckpt.pkl")
    assert start == 2
    for exp in bench.train_stream[start:]:
        strat.train(exp, shuffle=False, num_workers=0, eval_streams=[])
    for n, p in strat.model.named_parameters():
        assert torch.equal(p, full[n]), n


def test_load_state_dict_validates_and_casts(tasks):
    model, si = mlp(), SIPlugin(1.0)
    train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [si]),
                 make_stream(tasks[:1]))
    state = si.state_dict()
    with pytest.raises(ValueError, match="not an SIPlugin state"):
        SIPlugin(1.0).load_state_dict({"buffers": {}})
    with pytest.raises(ValueError, match=r"groups \[None\] but this plugin has \['a'\].*same groups="):
        SIPlugin(1.0, groups={"a": ["0"]}).load_state_dict(state)
    broken = copy.deepcopy(state)
    del broken["buffers"]["si_prev_theta_weights_2"]
    with pytest.raises(ValueError, match="'si_prev_theta_weights_2'.*missing"):
        SIPlugin(1.0).load_state_dict(broken)
    broken = copy.deepcopy(state)
    broken["buffers"]["si_omega_weights_1"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        SIPlugin(1.0).load_state_dict(broken)
    # a float32 state loads into a float64 model, cast to the live parameters' dtype
    as32 = copy.deepcopy(state)
    as32["buffers"] = {k: v.float() for k, v in as32["buffers"].items()}
    fresh = SIPlugin(1.0)
    fresh.load_state_dict(as32)
    model2 = mlp()
    train_stream(strategy(model2, torch.optim.SGD(model2.parameters(), lr=0.1), [fresh]),
                 make_stream(tasks[1:2]))
    assert all(o.dtype == torch.float64 for o in fresh.importances().values())
    # and a state of another architecture is refused when training starts
    other = SIPlugin(1.0)
    other.load_state_dict(state)
    small = mlp(hidden=4)
    with pytest.raises(ValueError, match=r"'0.weight'.*\(8, 6\).*\(4, 6\).*only the first dimension may grow"):
        train_stream(strategy(small, torch.optim.SGD(small.parameters(), lr=0.1), [other]),
                     make_stream(tasks[:1]))


class Net(MultiTaskModule):
    def __init__(self, head):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(6, 8)  # float32: Avalanche's dynamic heads are float32
        self.head = head

    def forward_single_task(self, x, task_label):
        h = torch.tanh(self.body(x))
        return self.head(h, task_label) if isinstance(self.head, MultiHeadClassifier) else self.head(h)


class Snapshot(SupervisedPlugin):
    """State of the SI plugin right at the start of each experience (after adaptation)."""

    def __init__(self, si):
        super().__init__()
        self.si, self.starts, self.ends = si, [], []

    def before_training_exp(self, strategy, **kwargs):
        self.starts.append(copy.deepcopy(self.si.state_dict()))

    def after_training_exp(self, strategy, **kwargs):
        self.ends.append(copy.deepcopy(self.si.state_dict()))


def test_incremental_classifier_grows_and_keeps_old_slice():
    tasks = make_tasks(offset_labels=True, dtype=torch.float32)  # classes 0-1, 2-3, 4-5
    model = Net(IncrementalClassifier(8, initial_out_features=2))
    si = SIPlugin(2.0)
    snap = Snapshot(si)
    train_stream(strategy(model, torch.optim.Adam(model.parameters(), lr=0.05), [si, snap]),
                 make_stream(tasks))
    index = snap.ends[-1]["groups"][None]["index"]
    w = index["head.classifier.weight"]
    for k in (1, 2):
        before, start = snap.ends[k - 1]["buffers"], snap.starts[k]["buffers"]
        om = start[f"si_omega_weights_{w}"]
        rows = before[f"si_omega_weights_{w}"].shape[0]
        assert om.shape[0] == 2 * (k + 1) and rows == 2 * k
        assert torch.equal(om[:rows], before[f"si_omega_weights_{w}"])  # old slice kept
        assert not om[rows:].any()                                        # new rows start at 0
        assert torch.equal(start[f"si_prev_theta_weights_{w}"][:rows],
                           before[f"si_prev_theta_weights_{w}"])
    assert index["body.weight"] == 0 and index["body.bias"] == 1


def test_multi_head_new_heads_take_new_indices_and_idle_heads_are_skipped():
    tasks = make_tasks(dtype=torch.float32)
    model = Net(MultiHeadClassifier(8, initial_out_features=2, masking=False))
    si = SIPlugin(2.0, importance="task")
    snap = Snapshot(si)
    train_stream(strategy(model, torch.optim.Adam(model.parameters(), lr=0.05), [si, snap]),
                 make_stream(tasks))
    index = snap.ends[-1]["groups"][None]["index"]
    head = {t: index[f"head.classifiers.{t}.classifier.weight"] for t in range(3)}
    assert index["body.weight"] == 0 and index["body.bias"] == 1
    assert head[0] < head[1] < head[2]
    # head 0 gets no gradient in tasks 1 and 2: it does not move and its Ω stays as after task 0
    end0, last = snap.ends[0]["buffers"], snap.ends[-1]["buffers"]
    assert torch.equal(end0[f"si_omega_weights_{head[0]}"], last[f"si_omega_weights_{head[0]}"])
    assert torch.equal(end0[f"si_prev_theta_weights_{head[0]}"],
                       last[f"si_prev_theta_weights_{head[0]}"])
    assert torch.equal(model.head.classifiers["0"].classifier.weight,
                       last[f"si_prev_theta_weights_{head[0]}"])
    assert last[f"si_omega_weights_{head[2]}"].sum() > 0


def test_frozen_and_excluded_parameters_are_not_regularized(tasks):
    model = mlp()
    model[0].weight.requires_grad_(False)
    si = SIPlugin(2.0, excluded_parameters=["4"])
    train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [si]),
                 make_stream(tasks))
    assert sorted(si.importances()) == ["0.bias", "2.bias", "2.weight"]


def test_groups_by_callable_and_unknown_group():
    model = mlp()
    si = SIPlugin(1.0, groups={"biases": lambda name, p: name.endswith("bias"),
                               "last": ParamGroup(params="4.weight", si_lambda=0.0)})
    train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [si]),
                 make_stream(make_tasks(2)))
    assert sorted(si.importances("biases")) == ["0.bias", "2.bias", "4.bias"]
    assert sorted(si.importances("last")) == ["4.weight"]
    assert "si_omega_biases_weights_2" in si.state_dict()["buffers"]
    with pytest.raises(KeyError, match="no SI group 'nope'"):
        si.importances("nope")


class NaNGrads(SupervisedPlugin):
    def __init__(self, from_exp):
        super().__init__()
        self.from_exp = from_exp

    def after_backward(self, strategy, **kwargs):
        if strategy.clock.train_exp_counter >= self.from_exp:
            strategy.model[0].weight.grad.fill_(float("nan"))


def test_divergence_raises_naming_the_parameter_and_keeps_omega(tasks):
    model, si = mlp(), SIPlugin(1.0)
    strat = strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [NaNGrads(1), si])
    bench = make_stream(tasks)
    strat.train(bench.train_stream[0], shuffle=False, num_workers=0, eval_streams=[])
    kept = {n: o.clone() for n, o in si.importances().items()}
    with pytest.raises(NonFiniteImportanceError, match="'0.weight'.*not finite"):
        strat.train(bench.train_stream[1], shuffle=False, num_workers=0, eval_streams=[])
    for n, o in si.importances().items():
        assert torch.equal(o, kept[n])


@pytest.mark.parametrize("kwargs,match", [
    (dict(si_lambda=-1.0), "si_lambda.*>= 0"),
    (dict(si_lambda=float("nan")), "si_lambda"),
    (dict(eps=0.0), "eps.*> 0"),
    (dict(importance="fisher"), "importance must be one of"),
    (dict(groups={}), "non-empty mapping"),
    (dict(groups={"a.b": ["x"]}), "without '.'"),
    (dict(groups={"a": [3]}), "non-empty strings"),
    (dict(groups={"a": ParamGroup(params="x", eps=-1)}), r"groups\['a'\].eps"),
    (dict(excluded_parameters=5), "excluded_parameters"),
])
def test_bad_options_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SIPlugin(**kwargs)


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        SIPlugin(1.0, 1e-3)


def test_errors_at_training_start_before_any_step(tasks):
    model = mlp()
    start = weights(model)
    si = SIPlugin(1.0, importance="delta_params")
    with pytest.raises(ValueError, match="Adagrad.*importance='task'"):
        train_stream(strategy(model, torch.optim.Adagrad(model.parameters()), [si]),
                     make_stream(tasks))
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())
    si = SIPlugin(1.0, groups={"a": ["0", "2"], "b": ["2.weight"]})
    with pytest.raises(ValueError, match="'2.weight' is in SI groups.*one group only"):
        train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [si]),
                     make_stream(tasks))


class StateSize(SupervisedPlugin):
    def __init__(self, si):
        super().__init__()
        self.si, self.sizes = si, []

    def after_training_iteration(self, strategy, **kwargs):
        held = sum(b.numel() for b in self.si.engine._state.store.buffers())
        # what the last step's penalty value keeps alive until it is read or dropped
        held += sum(t.numel() for g in self.si.engine._groups if g.value is not None
                    for t in g.value.held)
        self.sizes.append(held)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("importance", ["total", "task", "delta_params"])
def test_nothing_grows_from_step_to_step(importance, dtype):
    tasks = make_tasks(dtype=dtype)
    model = mlp(dtype=dtype)
    si = SIPlugin(1.0, importance=importance)
    probe = StateSize(si)
    train_stream(strategy(model, torch.optim.Adam(model.parameters(), lr=0.05), [si, probe]),
                 make_stream(tasks))
    n = sum(p.numel() for p in model.parameters())
    per_state = 3 if importance == "delta_params" else 4
    steps = len(probe.sizes) // 3
    assert probe.sizes[:steps] == [per_state * n] * steps          # task 1: no penalty yet
    if (dtype == torch.float32 and _fused.available()) or importance == "delta_params":
        # only one float64 sum per tensor for the penalty's value: the fused pass computes it;
        # without a copy of the weights before the step (delta_params) it is summed at the step
        extra = len(list(model.parameters()))
    else:
        extra = 0  # the value is read from the copy of the weights before the step
    assert probe.sizes[steps:] == [per_state * n + extra] * (2 * steps)
