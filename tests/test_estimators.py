"""Benzing (2022)'s variants of SI, `importance="siu"`, `"sib"` and `"sos"`, against a float64
reference written from his definitions:

- SI:  ω += −g·Δθ, g the task loss's gradient on the step's mini-batch (`importance="task"`);
- SIU: ω += −g_u·Δθ, g_u the task loss's gradient on an independent mini-batch;
- SIB: ω += (−g + g_u)·Δθ, the bias part alone;
- SOS: v ← 0.999 v + 0.001 g², and Ω += √v at consolidation (no path length, no damping);
- OnAF: a ← a + |g|, and Ω += a at consolidation (`CIFAR/summed_importances.py`);

the path-length variants consolidate Ω += max(0, ω / ((θ − θ*)² + ξ)); each resets ω (v) at
each consolidation, as his code does at each task start.
"""

import pytest
import torch

from avalanche_si import SIPlugin, SynapticIntelligence
from avalanche_si.estimators import SOS
from conftest import DEVICES, make_stream, make_tasks, mlp, strategy, train_stream, weights

FAMILY = ["siu", "sib", "sos", "onaf"]
INDEPENDENT = ("siu", "sib")  # the members that need g_u (SOS with α = 0 does not)
C, XI = 3.0, 0.1


def _draws(tasks, *, mb=8, epochs=2, seed=1):
    """Per task and step, the indices of an independent mini-batch of that task."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randperm(len(x), generator=g)[:mb] for _ in range(epochs * len(x) // mb)]
            for x, _, _ in tasks]


def reference(model, optimizer, tasks, draws, *, importance, mb=8, epochs=2, cs=None, xis=None,
              every=None, alpha=0.0):
    """The definitions above, one parameter at a time, the penalty through autograd.
    `cs`, `xis`: strength and damping per parameter name (default C, XI); `every`: consolidate
    every that many steps instead of after each task; `alpha`: SOS's α, as in Benzing's
    `worker_SI.py` (v ← b2·v + (1 − b2)(g − α g_u)²)."""
    named = dict(model.named_parameters())
    cs = cs or {n: C for n in named}
    xis = xis or {n: XI for n in named}
    steps = 0
    omega = {n: torch.zeros_like(p) for n, p in named.items()}
    star = {n: p.detach().clone() for n, p in named.items()}
    ce = torch.nn.CrossEntropyLoss()
    consolidated = False
    running = {n: torch.zeros_like(p) for n, p in named.items()}  # reset at consolidation
    for (x_all, y_all, _), task_draws in zip(tasks, draws):
        k = 0
        for _ in range(epochs):
            for i in range(0, len(x_all), mb):
                x, y = x_all[i:i + mb], y_all[i:i + mb]
                u = task_draws[k]
                k += 1
                g_u = dict(zip(named, torch.autograd.grad(ce(model(x_all[u]), y_all[u]),
                                                          list(named.values()))))
                task_loss = ce(model(x), y)
                g = dict(zip(named, torch.autograd.grad(task_loss, list(named.values()),
                                                        retain_graph=True)))
                penalty = sum(cs[n] * (omega[n] * (named[n] - star[n]) ** 2).sum()
                              for n in named) if consolidated else 0.0
                optimizer.zero_grad()
                (task_loss + penalty).backward()
                before = {n: p.detach().clone() for n, p in named.items()}
                optimizer.step()
                for n, p in named.items():
                    step = p.detach() - before[n]
                    if importance == "task":
                        running[n] -= g[n] * step
                    elif importance == "siu":
                        running[n] -= g_u[n] * step
                    elif importance == "sib":
                        running[n] += (-g[n] + g_u[n]) * step
                    elif importance == "onaf":
                        running[n] = running[n] + g[n].abs()
                    else:
                        running[n] = 0.999 * running[n] + 0.001 * (g[n] - alpha * g_u[n]) ** 2
                steps += 1
                if every is not None and steps % every == 0:
                    _consolidate(named, omega, star, running, importance, xis)
                    consolidated = True
        if every is None:
            _consolidate(named, omega, star, running, importance, xis)
            consolidated = True
    return omega


def _consolidate(named, omega, star, running, importance, xis):
    for n, p in named.items():
        if importance == "sos":
            omega[n] = omega[n] + running[n].sqrt()
        elif importance == "onaf":
            omega[n] = omega[n] + running[n]
        else:
            omega[n] = omega[n] + torch.clamp(running[n] / ((p.detach() - star[n]) ** 2 + xis[n]),
                                              min=0)
        star[n] = p.detach().clone()
        running[n] = torch.zeros_like(p)


def _engine_run(importance, tasks, draws, *, device="cpu", mb=8, epochs=2, **options):
    model = mlp(device=device)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    si = SynapticIntelligence(model, opt, **{"si_lambda": C, "eps": XI, **options},
                              importance=importance)
    needs_gu = si.estimator.independent_gradient
    ce = torch.nn.CrossEntropyLoss()
    for (x_all, y_all, _), task_draws in zip(tasks, draws):
        x_all, y_all = x_all.to(device), y_all.to(device)
        si.start_task()
        k = 0
        for _ in range(epochs):
            for i in range(0, len(x_all), mb):
                opt.zero_grad()
                if needs_gu:
                    u = task_draws[k].to(device)
                    si.record_independent_gradient(ce(model(x_all[u]), y_all[u]))
                k += 1
                ce(model(x_all[i:i + mb]), y_all[i:i + mb]).backward()
                si.before_step()
                opt.step()
                si.after_step()
        si.end_task()
    return si, model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("importance", ["task", *FAMILY])
def test_each_estimator_is_its_definition(importance, device):
    tasks = make_tasks()
    draws = _draws(tasks)
    ref_model = mlp()
    ref = reference(ref_model, torch.optim.Adam(ref_model.parameters(), lr=0.05), tasks, draws,
                    importance=importance)
    si, model = _engine_run(importance, tasks, draws, device=device)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.cpu(), dict(ref_model.named_parameters())[n].detach(),
                                   rtol=1e-9, atol=1e-12, msg=n)
        torch.testing.assert_close(si.importances()[n].cpu(), ref[n], rtol=1e-9, atol=1e-12,
                                   msg=n)
    # (SIU's per-task clamp may zero a small layer whole: its expected contribution is ~0)
    assert sum(bool(o.abs().max() > 0) for o in si.importances().values()) >= 4


def test_the_estimators_differ_from_each_other():
    # the test above could not tell them apart if they measured the same thing
    tasks = make_tasks()
    draws = _draws(tasks)
    got = {imp: _engine_run(imp, tasks, draws)[0].importances()["2.weight"]
           for imp in ["task", *FAMILY]}
    for a in got:
        for b in got:
            if a < b:
                assert not torch.allclose(got[a], got[b], rtol=1e-3), (a, b)


def test_sos_keeps_three_numbers_per_weight_and_siu_four():
    tasks = make_tasks(1)
    for importance, per in (("sos", 3), ("siu", 4), ("sib", 4), ("onaf", 3)):
        si, model = _engine_run(importance, tasks, _draws(tasks))
        n = sum(p.numel() for p in model.parameters())
        assert sum(b.numel() for b in si._state.store.buffers()) == per * n


def test_siu_without_the_independent_gradient_is_a_clear_error():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    si = SynapticIntelligence(model, opt, importance="siu")
    si.start_task()
    model(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
    with pytest.raises(RuntimeError, match=r"call record_independent_gradient\(loss\) before"):
        si.before_step()
    with pytest.raises(ValueError, match="for importance='siu' or 'sib'"):
        SynapticIntelligence(model, opt).record_independent_gradient(torch.zeros(()))
    with pytest.raises(TypeError, match="takes the loss"):
        si.record_independent_gradient(torch.zeros(3))


def test_the_family_refuses_gradient_accumulation():
    tasks = make_tasks(1)
    for importance in FAMILY:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        si = SynapticIntelligence(model, opt, importance=importance)
        si.start_task()
        x, y, _ = tasks[0]
        if importance in INDEPENDENT:
            si.record_independent_gradient(torch.nn.functional.cross_entropy(model(x), y))
        torch.nn.functional.cross_entropy(model(x[:4]), y[:4]).backward()
        si.before_step()
        with pytest.raises(RuntimeError, match=f"importance='{importance}' measures each step"):
            si.after_step()  # the optimizer did not step


@pytest.mark.parametrize("importance", FAMILY)
def test_siplugin_draws_the_independent_mini_batch_itself(importance, monkeypatch):
    _plugin_draws_and_is_the_definition(importance, monkeypatch)


def _plugin_draws_and_is_the_definition(importance, monkeypatch, alpha=0.0):
    # the plugin draws each step's independent mini-batch from the current experience; with
    # the batches it drew, the float64 reference gives the same weights and importances
    tasks = make_tasks()
    drawn = []
    real = SIPlugin._next_independent_batch

    def recording(self, strat):
        batch = real(self, strat)
        drawn.append(batch)
        return batch

    monkeypatch.setattr(SIPlugin, "_next_independent_batch", recording)
    model = mlp()
    si = SIPlugin(C, eps=XI, importance=SOS(alpha=alpha) if importance == "sos" else importance)
    train_stream(strategy(model, torch.optim.Adam(model.parameters(), lr=0.05), [si]),
                 make_stream(tasks))
    if importance not in INDEPENDENT and alpha == 0:
        assert not drawn  # SOS and OnAF need no second mini-batch
        draws = _draws(tasks)
    else:
        steps = 2 * len(tasks[0][0]) // 8
        assert len(drawn) == steps * len(tasks)
        # each drawn batch is a batch of the current task's data, in another order
        draws = []
        for t, (x, _, _) in enumerate(tasks):
            rows = []
            for xb, _, _ in drawn[t * steps:(t + 1) * steps]:
                rows.append(torch.tensor([int((x == r).all(dim=1).nonzero()) for r in xb]))
            draws.append(rows)
        assert not all(torch.equal(r, torch.arange(8 * (k % 6), 8 * (k % 6) + 8))
                       for k, r in enumerate(draws[0]))
    ref_model = mlp()
    ref = reference(ref_model, torch.optim.Adam(ref_model.parameters(), lr=0.05), tasks, draws,
                    importance=importance, alpha=alpha)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, dict(ref_model.named_parameters())[n], rtol=1e-9,
                                   atol=1e-12, msg=n)
        torch.testing.assert_close(si.importances()[n], ref[n], rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("importance", FAMILY)
def test_state_dict_round_trip_and_pickle(importance):
    import pickle

    tasks = make_tasks(2)
    si, model = _engine_run(importance, tasks, _draws(tasks))
    again = SynapticIntelligence(si_lambda=C, eps=XI, importance=importance)
    again.load_state_dict(si.state_dict())
    again.bind(model, torch.optim.Adam(model.parameters()))
    again.start_task()
    for n, o in si.importances().items():
        assert torch.equal(again.importances()[n], o)
    clone = pickle.loads(pickle.dumps(si))
    assert clone.importance == importance and clone.consolidations == 2
    assert weights(model)  # the model is untouched by either


@pytest.mark.parametrize("importance", FAMILY)
def test_groups_with_their_own_strength_and_damping(importance):
    from avalanche_si import ParamGroup

    tasks = make_tasks()
    draws = _draws(tasks)
    body = ["0.weight", "0.bias", "2.weight", "2.bias"]
    cs = {n: 0.7 if n in body else 3.0 for n in dict(mlp().named_parameters())}
    xis = {n: 1e-3 if n in body else 0.1 for n in cs}
    ref_model = mlp()
    ref = reference(ref_model, torch.optim.Adam(ref_model.parameters(), lr=0.05), tasks, draws,
                    importance=importance, cs=cs, xis=xis)
    si, model = _engine_run(importance, tasks, draws, groups={
        "body": ParamGroup(params=["0", "2"], si_lambda=0.7, eps=1e-3),
        "head": ParamGroup(params=["4"], si_lambda=3.0, eps=0.1)})
    for group in ("body", "head"):
        for n, o in si.importances(group).items():
            torch.testing.assert_close(o, ref[n], rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("importance", FAMILY)
def test_task_free_consolidation_every_k_steps(importance):
    tasks = make_tasks()
    draws = _draws(tasks)
    ref_model = mlp()
    ref = reference(ref_model, torch.optim.Adam(ref_model.parameters(), lr=0.05), tasks, draws,
                    importance=importance, every=5)
    si, model = _engine_run(importance, tasks, draws, consolidate=5)
    assert si.consolidations == 3 * 12 // 5
    for n, o in si.importances().items():
        torch.testing.assert_close(o, ref[n], rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("importance", FAMILY)
def test_16_bit_weights_keep_float32_state(importance):
    # bfloat16 weights: the state (Ω, θ*, ω or v, θ_pre) in float32, as for SI
    tasks = make_tasks(2, dtype=torch.bfloat16)
    model = mlp(dtype=torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    si = SynapticIntelligence(model, opt, si_lambda=C, eps=XI, importance=importance)
    ce = torch.nn.CrossEntropyLoss()
    for x, y, _ in tasks:
        si.start_task()
        for i in range(0, len(x), 8):
            opt.zero_grad()
            if importance in INDEPENDENT:
                si.record_independent_gradient(ce(model(x.flip(0)[i:i + 8]).float(),
                                                  y.flip(0)[i:i + 8]))
            ce(model(x[i:i + 8]).float(), y[i:i + 8]).backward()
            si.before_step()
            opt.step()
            si.after_step()
        si.end_task()
    assert {b.dtype for b in si._state.store.buffers()} == {torch.float32}
    omega = si.importances()
    assert all(torch.isfinite(o).all() for o in omega.values())
    assert sum(float(o.abs().sum()) for o in omega.values()) > 0


# ----------------------------------------------------------- SOS with alpha (his batch 2048)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_sos_with_alpha_is_benzings_definition(alpha, device):
    # v ← 0.999 v + 0.001 (g − α g_u)², Ω += √v: α = 1 in his batch-2048 searches
    tasks = make_tasks()
    draws = _draws(tasks)
    ref_model = mlp()
    ref = reference(ref_model, torch.optim.Adam(ref_model.parameters(), lr=0.05), tasks, draws,
                    importance="sos", alpha=alpha)
    si, model = _engine_run(SOS(alpha=alpha), tasks, draws, device=device)
    assert si.importance == "sos" and si.estimator.independent_gradient
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.cpu(), dict(ref_model.named_parameters())[n].detach(),
                                   rtol=1e-9, atol=1e-12, msg=n)
        torch.testing.assert_close(si.importances()[n].cpu(), ref[n], rtol=1e-9, atol=1e-12,
                                   msg=n)
    # α matters: the same run with α = 0 measures something else
    plain = reference(mlp(), torch.optim.Adam(mlp().parameters(), lr=0.05), tasks, draws,
                      importance="sos")
    assert not torch.allclose(ref["2.weight"], plain["2.weight"], rtol=1e-3)


def test_sos_with_alpha_0_is_the_sos_of_before_bit_for_bit():
    tasks = make_tasks()
    draws = _draws(tasks)
    a, _ = _engine_run("sos", tasks, draws)
    b, _ = _engine_run(SOS(alpha=0.0), tasks, draws)
    for n, o in a.importances().items():
        assert torch.equal(o, b.importances()[n]), n
    assert SOS() == SOS(alpha=0) and SOS(alpha=1) != SOS()
    assert repr(b) == repr(a) and "SOS(alpha=1.0" in repr(_engine_run(SOS(alpha=1), tasks[:1],
                                                                        draws)[0])


def test_siplugin_draws_the_independent_mini_batch_for_sos_with_alpha(monkeypatch):
    _plugin_draws_and_is_the_definition("sos", monkeypatch, alpha=1.0)


def test_sos_options_are_checked():
    for bad in (float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match=r"SOS\(alpha=...\) must be a finite number"):
            SOS(alpha=bad)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"SOS\(decay=...\) must be a number in \[0, 1\)"):
            SOS(decay=bad)
    with pytest.raises(TypeError):
        SOS(1.0)  # keyword-only


def test_sos_with_alpha_without_the_independent_gradient_is_a_clear_error():
    model = mlp()
    si = SynapticIntelligence(model, torch.optim.SGD(model.parameters(), lr=0.1),
                              importance=SOS(alpha=1.0))
    si.start_task()
    model(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
    with pytest.raises(RuntimeError, match=r"call record_independent_gradient\(loss\) before"):
        si.before_step()


def test_the_estimators_registry_is_the_importance_option():
    from avalanche_si import IMPORTANCE_MODES
    from avalanche_si.estimators import ESTIMATORS, Estimator, make_estimator

    assert tuple(ESTIMATORS) == IMPORTANCE_MODES  # options lists them without importing torch
    for name, cls in ESTIMATORS.items():
        made = make_estimator(name)
        assert type(made) is cls and made.name == name and isinstance(made, Estimator)
    with pytest.raises(ValueError, match="importance must be one of .*or an avalanche_si"):
        make_estimator("SOS")
    with pytest.raises(TypeError, match="importance must be one of"):
        SynapticIntelligence(importance=SOS)  # the class, not an object


def test_onaf_adds_nothing_for_a_step_the_scaler_skips():
    # |g| of a step that a GradScaler skips must not count (the step moved nothing): a run with
    # a skipped step in the middle equals the run without it, to the bit (unscaling by a power
    # of two is exact)
    def run(poisoned):
        model = mlp(dtype=torch.float32)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
        si = SynapticIntelligence(model, opt, importance="onaf", scaler=scaler)
        si.start_task()
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
        for poison in poisoned:
            opt.zero_grad()
            scaler.scale(model(x).pow(2).mean()).backward()
            if poison:
                next(model.parameters()).grad[0, 0] = float("inf")
            si.before_step()
            scaler.step(opt)
            scaler.update()
            si.after_step()
        return [r.clone() for r in si._groups[0].running]

    with_skip, without = run([False, True, False]), run([False, False])
    assert all(torch.equal(a, b) for a, b in zip(with_skip, without))
    assert not all(torch.equal(a, b) for a, b in zip(with_skip, run([False])))
