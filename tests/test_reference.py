"""The plugin and the functional API against SI by the definition, in float64."""

import pytest
import torch

from avalanche_si import ParamGroup, SIPlugin, functional as F
from conftest import DEVICES, make_stream, mlp, reference_si, strategy, train_stream

GROUPS = {"body": (["0.weight", "0.bias", "2.weight", "2.bias"], 0.7, 1e-3),
          "head": (["4.weight", "4.bias"], 3.0, 0.1)}

OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=0.05),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("importance", ["total", "task", "delta_params"])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_plugin_matches_reference_with_two_groups(tasks, importance, opt, device):
    ref_model = mlp(device=device)
    ref_omega, ref_model = reference_si(
        ref_model, OPTIMIZERS[opt](ref_model.parameters()), tasks,
        list(GROUPS.values()), importance=importance)

    model = mlp(device=device)
    plugin = SIPlugin(si_lambda=123.0, eps=5.0, importance=importance, groups={
        name: ParamGroup(params=names, si_lambda=c, eps=xi) for name, (names, c, xi) in GROUPS.items()})
    train_stream(strategy(model, OPTIMIZERS[opt](model.parameters()), [plugin]), make_stream(tasks))

    for name, (names, _, _) in GROUPS.items():
        assert_importances_match(plugin.importances(name), ref_omega, names)
    assert_weights_match(model, ref_model)


def assert_importances_match(got, ref_omega, names):
    """Ω of `names`, each nonzero, equals the float64 reference's."""
    assert sorted(got) == sorted(names)
    for n in names:
        torch.testing.assert_close(got[n], ref_omega[n], rtol=1e-9, atol=1e-12)
        assert got[n].abs().max() > 0


def assert_weights_match(model, ref_model):
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("importance", ["total", "task"])
def test_plugin_with_cuda_graphs_matches_reference(graphs_everywhere, tasks, importance, device):
    # the step work replayed as graphs (on the CPU: conftest's stand-in, each replay checked)
    ref_model = mlp(device=device)
    names = [n for n, _ in ref_model.named_parameters()]
    ref_omega, ref_model = reference_si(ref_model, OPTIMIZERS["adam"](ref_model.parameters()),
                                        tasks, [(names, 2.0, 0.1)], importance=importance)
    model = mlp(device=device)
    plugin = SIPlugin(si_lambda=2.0, eps=0.1, importance=importance, cuda_graphs=True)
    opt = OPTIMIZERS["adam"](model.parameters())
    if device == "cpu":  # keeps the gradient tensors (the CPU allocator rarely gives the same
        # memory back to a gradient set to None and allocated again)
        opt.zero_grad = lambda set_to_none=True: type(opt).zero_grad(opt, set_to_none=False)
    train_stream(strategy(model, opt, [plugin]), make_stream(tasks))
    assert_importances_match(plugin.importances(), ref_omega, names)
    assert_weights_match(model, ref_model)
    graphs = plugin.engine._groups[0].graphs
    assert graphs.replays > 0  # on a GPU: the allocator gives the same blocks back
    if device == "cpu":  # kept from experience to experience: before the step without the
        # penalty and with it, and after it ("task" too: the task gradient is copied into
        # tensors that stay, so no address alternates)
        assert graphs.captures == 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("importance", ["total", "delta_params"])
def test_functional_api_matches_reference(tasks, importance, device):
    """A manual loop on the four functions, two groups on one net, equals the definition."""
    ref_model = mlp(device=device)
    ref_omega, ref_model = reference_si(ref_model, torch.optim.Adam(ref_model.parameters(), lr=0.05),
                                        tasks, list(GROUPS.values()), importance=importance)
    from conftest import predict_with_real_optimizer

    model = mlp(device=device)
    named = dict(model.named_parameters())
    groups = {g: ([named[n] for n in names], c, xi) for g, (names, c, xi) in GROUPS.items()}
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    ce = torch.nn.CrossEntropyLoss()
    for t, (x_all, y_all, _) in enumerate(tasks):
        for _ in range(2):
            for i in range(0, len(x_all), 8):
                task_loss = ce(model(x_all[i:i + 8].to(device)), y_all[i:i + 8].to(device))
                loss = task_loss
                if t > 0:
                    loss = loss + sum(c * F.si_regularizer(model, ps, g) for g, (ps, c, _) in groups.items())
                if importance == "delta_params":
                    task_grads = dict(zip(named, torch.autograd.grad(task_loss, list(named.values()),
                                                                     retain_graph=True)))
                opt.zero_grad()
                loss.backward()
                if importance == "delta_params":
                    deltas = predict_with_real_optimizer(opt, named, task_grads)
                for g, (ps, _, _) in groups.items():
                    F.si_pre_optim_step(model, ps, g, no_pre_step_ckpt=importance == "delta_params")
                if importance == "delta_params":
                    # delta_params mode measures with the task gradient: put it in .grad
                    total = {n: p.grad.clone() for n, p in named.items()}
                    for n, p in named.items():
                        p.grad = task_grads[n]
                    for g, (ps, _, _) in groups.items():
                        names = GROUPS[g][0]
                        F.si_post_optim_step(model, ps, g, delta_params=[deltas[n] for n in names])
                    for n, p in named.items():
                        p.grad = total[n]
                    opt.step()
                else:
                    opt.step()
                    for g, (ps, _, _) in groups.items():
                        F.si_post_optim_step(model, ps, g)
        for g, (ps, _, xi) in groups.items():
            F.si_compute_importance(model, ps, g, epsilon=xi)
    for g, (names, _, _) in GROUPS.items():
        for i, n in enumerate(names):
            got = getattr(model, f"si_omega_{g}_weights_{i}")
            torch.testing.assert_close(got, ref_omega[n], rtol=1e-9, atol=1e-12)
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("clamp", ["total", "none"])
def test_other_clamp_conventions_match_reference(tasks, clamp):
    """clamp="total" (Zenke's code) and "none" (van de Ven's code) against the definition."""
    ref_model = mlp()
    ref_omega, _ = reference_si(ref_model, torch.optim.Adam(ref_model.parameters(), lr=0.05),
                                tasks, list(GROUPS.values()), importance="total", clamp=clamp)
    model = mlp()
    plugin = SIPlugin(clamp=clamp, groups={
        name: ParamGroup(params=names, si_lambda=c, eps=xi) for name, (names, c, xi) in GROUPS.items()})
    train_stream(strategy(model, torch.optim.Adam(model.parameters(), lr=0.05), [plugin]),
                 make_stream(tasks))
    got = {**plugin.importances("body"), **plugin.importances("head")}
    for n, ref in ref_omega.items():
        torch.testing.assert_close(got[n], ref, rtol=1e-9, atol=1e-12, msg=n)
    smallest = min(float(o.min()) for o in got.values())
    # The conventions differ on these tasks: without a clamp some Ω are negative.
    assert smallest < 0 if clamp == "none" else smallest >= 0


def test_clamp_conventions_differ_where_a_task_contributes_negatively():
    omega = [torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)]
    running = [torch.tensor([-3.0, 2.0, -1.0], dtype=torch.float64)]
    params, prev = [torch.zeros(3, dtype=torch.float64)], [torch.zeros(3, dtype=torch.float64)]
    out = {}
    for clamp in ("task", "total", "none"):
        o, r = [omega[0].clone()], [running[0].clone()]
        F.consolidate(o, [prev[0].clone()], r, params, eps=1.0, clamp=clamp)
        out[clamp] = o[0].tolist()
    assert out == {"task": [1.0, 3.0, 0.0], "total": [0.0, 3.0, 0.0], "none": [-2.0, 3.0, -1.0]}
    with pytest.raises(ValueError, match="clamp must be one of"):
        F.consolidate(omega, prev, running, params, eps=1.0, clamp="relu")
    with pytest.raises(ValueError, match="clamp must be one of"):
        SIPlugin(clamp="relu")


def test_plugin_pickled_by_version_0_1_loads_whole_and_trains_on(tasks):
    # tests/data/siplugin-0.1.pt: an SIPlugin with two groups, trained on two tasks by
    # avalanche_si 0.1.0 and pickled as an Avalanche checkpoint pickles it (see its README)
    import pickle
    from pathlib import Path

    blob = torch.load(Path(__file__).parent / "data" / "siplugin-0.1.pt", weights_only=False)
    old = pickle.loads(blob["plugin"])
    assert old.group_names == ["body", "head"] and old.clamp == "task"
    saved = {k: v for k, v in blob["state_dict"]["buffers"].items()
             if not k.startswith("si_pre_step_theta")}  # 0.1 also saved this scratch copy
    assert old.state_dict()["buffers"].keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(old.state_dict()["buffers"][k], v), k
    # it trains on exactly like a new plugin given the same state
    fresh = SIPlugin(3.0, eps=0.1, regularize_norm_layers=True,
                     groups={"body": ["0", "2"], "head": ParamGroup(params=["4"], si_lambda=1.0)})
    fresh.load_state_dict(blob["state_dict"])
    runs = []
    for plugin in (old, fresh):
        model = mlp()
        model.load_state_dict(blob["model"])
        train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [plugin]),
                     make_stream(tasks[2:]))
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not torch.equal(runs[0]["0.weight"], blob["model"]["0.weight"])


#: stored numbers come from another machine: float64 training on another CPU may differ by an
#: ulp per operation (seen: 5.6e-17 on an AMD EPYC), so they are compared to this tolerance
STORED = dict(rtol=1e-10, atol=1e-12)


def test_plugin_pickled_by_version_0_2_loads_whole_and_trains_on_as_0_2_did(tasks):
    # tests/data/siplugin-0.2.pt: an SIPlugin of version 0.2.0 (its engine's fields on the
    # plugin itself), trained on two tasks and pickled; with what 0.2.0 trained on from it
    import pickle
    from pathlib import Path

    blob = torch.load(Path(__file__).parent / "data" / "siplugin-0.2.pt", weights_only=False)
    old = pickle.loads(blob["plugin"])
    assert old.group_names == ["body", "head"] and old.importance == "task"
    assert old.consolidations == blob["state_dict"]["consolidations"]
    for k, v in blob["state_dict"]["buffers"].items():
        assert torch.equal(old.state_dict()["buffers"][k], v), k
    model = mlp()
    model.load_state_dict(blob["model"])
    train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [old]),
                 make_stream(tasks[2:]))
    # computed on another machine: to a stated tolerance (STORED), not to the bit
    for k, v in blob["trained_on"].items():
        torch.testing.assert_close(model.state_dict()[k], v, **STORED, msg=k)
    for g, omegas in blob["omega_after"].items():
        for n, o in omegas.items():
            torch.testing.assert_close(old.importances(g)[n], o, **STORED, msg=f"{g} {n}")
    # and pickles again in today's layout
    again = pickle.loads(pickle.dumps(old))
    assert again.state_dict()["buffers"].keys() == old.state_dict()["buffers"].keys()



@pytest.mark.parametrize("entry", ["plugin", "total", "delta_params", "sos"])
def test_engines_and_plugins_pickled_by_version_0_3_load_and_train_on_as_0_3_did(tasks, entry):
    # tests/data/si-0.3.pt: pickles of avalanche_si 0.3.0 (an SIPlugin with two groups and
    # importance="task"; bare engines with "total", "delta_params" and "sos"), trained on two
    # tasks, with the weights and Ω that 0.3.0 reached training on over the third (its README)
    import pickle
    from pathlib import Path

    blob = torch.load(Path(__file__).parent / "data" / "si-0.3.pt", weights_only=False)[entry]
    old = pickle.loads(blob["pickle"])
    for k, v in blob["state_dict"]["buffers"].items():
        assert torch.equal(old.state_dict()["buffers"][k], v), k
    model = mlp()
    model.load_state_dict(blob["model"])
    if entry == "plugin":
        assert old.importance == "task" and old.group_names == ["body", "head"]
        train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [old]),
                     make_stream(tasks[2:]))
        omega = {g: old.importances(g) for g in old.group_names}
    else:
        assert old.importance == entry
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        opt.load_state_dict(blob["optimizer"])
        old.bind(model, opt)
        ce = torch.nn.CrossEntropyLoss()
        for x, y, _ in tasks[2:]:
            old.start_task()
            for i in range(0, len(x), 8):
                opt.zero_grad()
                ce(model(x[i:i + 8]), y[i:i + 8]).backward()
                old.before_step()
                opt.step()
                old.after_step()
            old.end_task()
        omega = {None: old.importances()}
        blob["omega_after"] = {None: blob["omega_after"]}
    for k, v in blob["trained_on"].items():
        torch.testing.assert_close(model.state_dict()[k], v, **STORED, msg=k)
    for g, omegas in blob["omega_after"].items():
        for n, o in omegas.items():
            torch.testing.assert_close(omega[g][n], o, **STORED, msg=f"{g} {n}")
    # and pickles again in today's layout
    again = pickle.loads(pickle.dumps(old))
    assert again.state_dict()["buffers"].keys() == old.state_dict()["buffers"].keys()
