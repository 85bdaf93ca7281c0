"""When SI consolidates: each policy on tiny ordinary and online Avalanche streams."""

import copy
import math

import numpy as np
import pytest
import torch
from avalanche.benchmarks.scenarios.online import (split_continuous_linear_decay_stream,
                                                   split_online_stream)
from avalanche.training import OnlineNaive

from avalanche_si import SIPlugin
from avalanche_si.consolidation import HiddenBoundariesError, LossPlateau
from conftest import assert_same, make_stream, make_tasks, mlp, strategy, train_stream, weights


class Counting(SIPlugin):
    """Records the global step of every consolidation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._steps, self._at = 0, []

    def after_update(self, strategy, **kwargs):
        self._steps += 1
        super().after_update(strategy, **kwargs)

    def consolidate_now(self):
        self._at.append(self._steps)
        super().consolidate_now()


def online(tasks, size, *, boundaries):
    bench = make_stream(tasks)
    return split_online_stream(bench.train_stream, experience_size=size, shuffle=False,
                               access_task_boundaries=boundaries)


def train_online(si, stream, *, mb, opt=lambda p: torch.optim.Adam(p, lr=0.05)):
    model = mlp()
    strat = OnlineNaive(model=model, optimizer=opt(model.parameters()), train_mb_size=mb,
                        plugins=[si], evaluator=None, device="cpu")
    for exp in stream:
        strat.train(exp, shuffle=False, num_workers=0, eval_streams=[])
    return model


@pytest.mark.parametrize("consolidate", [None, "boundary"])
@pytest.mark.parametrize("size", [8, 10])  # 48 samples a task: 8 divides it (no is_last), 10 not
def test_boundary_policy_on_an_online_stream_is_si_on_the_tasks(consolidate, size):
    tasks = make_tasks()
    ref_model, ref_si = mlp(), SIPlugin(3.0, eps=0.1)
    train_stream(strategy(ref_model, torch.optim.Adam(ref_model.parameters(), lr=0.05), [ref_si],
                          mb=size, epochs=1), make_stream(tasks))
    si = Counting(3.0, eps=0.1, consolidate=consolidate)
    model = train_online(si, online(tasks, size, boundaries=True), mb=size)
    assert_same(weights(model), weights(ref_model))
    per_task = math.ceil(48 / size)
    # consolidated at the end of tasks 1 and 2 (as task 2 and 3 start, when size divides 48),
    # and after the last sub-experience of task 3 only if it is marked as the last: else a
    # stream's last task is consolidated when the user says the stream ended
    expected = [per_task, 2 * per_task] + ([3 * per_task] if 48 % size else [])
    assert si._at == expected
    if 48 % size == 0:
        si.consolidate_now()
    assert_same(si.importances(), ref_si.importances())


def test_first_task_is_naive_with_boundaries():
    tasks = make_tasks()
    naive = train_online(SIPlugin(0.0), online(tasks[:1], 8, boundaries=True), mb=8)
    si = Counting(50.0, consolidate="boundary")
    model = train_online(si, online(tasks[:1], 8, boundaries=True), mb=8)
    assert_same(weights(model), weights(naive))  # no penalty inside the first task
    assert si._at == []


def test_default_refuses_an_online_stream_that_hides_its_boundaries():
    stream = online(make_tasks(), 8, boundaries=False)
    for consolidate in (None, "boundary"):
        with pytest.raises(HiddenBoundariesError, match="hides its task boundaries.*consolidate=k"):
            train_online(SIPlugin(1.0, consolidate=consolidate), stream, mb=8)


def test_experience_policy_consolidates_after_every_mini_experience():
    si = Counting(1.0, consolidate="experience")
    train_online(si, online(make_tasks(), 8, boundaries=False), mb=8)
    assert si._at == list(range(1, 19))


@pytest.mark.parametrize("k", [1, 5, 7])
def test_every_k_steps_counts_across_experience_ends(k):
    si = Counting(1.0, consolidate=k)
    model = mlp()
    # 3 tasks x 2 epochs x 6 batches = 36 steps; 7 does not divide an experience's 12
    train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [si]),
                 make_stream(make_tasks()))
    assert si._at == list(range(k, 37, k))
    assert si.state_dict()["consolidations"] == 36 // k


def test_every_k_steps_on_a_blurred_stream():
    bench = make_stream(make_tasks())
    stream = split_continuous_linear_decay_stream(bench.train_stream, experience_size=8,
                                                  iters_per_virtual_epoch=6, beta=2.0,
                                                  shuffle=False)
    with pytest.raises(HiddenBoundariesError):
        train_online(SIPlugin(1.0), stream, mb=8)
    stream = split_continuous_linear_decay_stream(bench.train_stream, experience_size=8,
                                                  iters_per_virtual_epoch=6, beta=2.0,
                                                  shuffle=False)
    si = Counting(1.0, consolidate=4)
    train_online(si, stream, mb=8)
    assert si._at == [4, 8, 12, 16]
    assert sum(float(o.sum()) for o in si.importances().values()) > 0


def test_consolidating_twice_in_a_row_changes_nothing():
    model, si = mlp(), SIPlugin(1.0)
    train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [si]),
                 make_stream(make_tasks(2)))
    before = {n: o.clone() for n, o in si.importances().items()}
    prev = [t.clone() for t in si.engine._groups[0].prev]
    si.consolidate_now()  # ω = 0: adds 0 / ((θ − θ*)² + ξ) = 0
    assert_same(si.importances(), before)
    assert all(torch.equal(a, b) for a, b in zip(si.engine._groups[0].prev, prev))


def test_consolidating_without_the_model_is_an_error_and_changes_nothing():
    # Before training, after load_state_dict and after unpickling the plugin holds no
    # parameters: consolidating then used to do nothing but count, so a list of strengths
    # moved on and the running ω of a resumed task was never consolidated.
    with pytest.raises(RuntimeError, match="before the plugin has the model's parameters"):
        SIPlugin(1.0).consolidate_now()
    model, si = mlp(), SIPlugin([1.0, 2.0], consolidate=10**6)  # never fires: ω runs on
    strat = strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [si])
    strat.train(make_stream(make_tasks(1)).train_stream[0], num_workers=0, eval_streams=[])
    saved = si.state_dict()
    running = {k: v for k, v in saved["buffers"].items() if "running" in k}
    assert running and all(float(v.abs().sum()) > 0 for v in running.values())
    loaded = SIPlugin([1.0, 2.0], consolidate=10**6)
    loaded.load_state_dict(saved)
    for fresh in (copy.deepcopy(si), loaded):  # unpickled (a checkpoint), state loaded
        with pytest.raises(RuntimeError, match="load_state_dict"):
            fresh.consolidate_now()
        after = fresh.state_dict()
        assert after["consolidations"] == 0
        assert_same(after["buffers"], saved["buffers"])
    si.consolidate_now()  # bound to the model: consolidates the running ω
    assert si.consolidations == si.state_dict()["consolidations"] == 1
    with pytest.raises(AttributeError, match="read-only"):
        si.consolidations = 0
    assert all(float(v.abs().sum()) == 0 for k, v in si.state_dict()["buffers"].items()
               if "running" in k)


def aljundi(losses, window, mean_t, var_t):
    """The plateau detector of Aljundi et al.'s code (method.py), on a list of losses."""
    win, peak, last_mean, last_var, fired = [], True, None, None, []
    for step, loss in enumerate(losses, 1):
        win.append(loss)
        if len(win) > window:
            del win[0]
        mean, var = np.mean(win), np.var(win)
        if not peak and mean > last_mean + np.sqrt(last_var):
            peak = True
        if mean < mean_t and var < var_t and peak:
            fired.append(step)
            last_mean, last_var, peak = mean, var, False
    return fired


def synthetic_losses(seed=0):
    g = np.random.default_rng(seed)
    out = []
    for task in range(4):  # a peak as each task starts, decaying to a plateau
        out += list(2.0 * np.exp(-np.arange(60) / 8.0) + 0.05 + 0.02 * g.random(60))
    return out


@pytest.mark.parametrize("window", [1, 5, 10])
def test_loss_plateau_fires_where_aljundis_detector_does(window):
    losses = synthetic_losses()
    expected = aljundi(losses, window, 0.2, 0.1)
    assert len(expected) == 4  # once per task
    policy = LossPlateau(window, 0.2, 0.1)
    fired = [k for k, loss in enumerate(losses, 1)
             if policy.at_step(torch.tensor(loss, dtype=torch.float64))]
    assert fired == expected


def test_loss_plateau_checked_every_few_steps_fires_at_the_next_check():
    losses = synthetic_losses()
    every = LossPlateau(5, 0.2, 0.1, check_every=4)
    fired = [k for k, loss in enumerate(losses, 1) if every.at_step(torch.tensor(loss))]
    assert len(fired) == 4 and all(k % 4 == 0 for k in fired)
    exact = aljundi(losses, 5, 0.2, 0.1)
    assert all(0 <= f - e < 4 + 5 for f, e in zip(fired, exact))


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=0), "window"), (dict(mean_threshold=-1.0), "mean_threshold"),
    (dict(variance_threshold=float("nan")), "variance_threshold"), (dict(check_every=1.5), "check")])
def test_loss_plateau_options_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossPlateau(**kwargs)


@pytest.mark.parametrize("bad", ["tasks", 0, -3, 2.5, True])
def test_consolidate_option_is_checked(bad):
    with pytest.raises(ValueError, match="consolidate"):
        SIPlugin(consolidate=bad)


@pytest.mark.parametrize("policy", [lambda: 5, lambda: LossPlateau(4, 1.0, 1.0)])
def test_resume_in_the_middle_of_a_window_equals_an_uninterrupted_run(policy):
    tasks = make_tasks()

    def run(stop_after=None, resume=None):
        model = mlp()
        si = SIPlugin(2.0, eps=0.1, consolidate=policy())
        strat = strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [si])
        exps = make_stream(tasks).train_stream
        start = 0
        if resume is not None:
            model.load_state_dict(resume["model"])
            si.load_state_dict(resume["si"])
            start = resume["next"]
        for k, exp in enumerate(exps):
            if k < start:
                continue
            strat.train(exp, shuffle=False, num_workers=0, eval_streams=[])
            if k == stop_after:
                return {"model": copy.deepcopy(model.state_dict()), "si": si.state_dict(),
                        "next": k + 1}
        return weights(model), si

    full, si_full = run()
    assert si_full.state_dict()["consolidations"] >= 2  # the policy did fire
    resumed, si_resumed = run(resume=run(stop_after=0))
    assert_same(resumed, full)
    assert_same(si_resumed.importances(), si_full.importances())
    assert si_resumed.state_dict()["consolidations"] == si_full.state_dict()["consolidations"]


def test_state_of_another_policy_is_refused():
    model, si = mlp(), SIPlugin(1.0, consolidate=5)
    train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [si]),
                 make_stream(make_tasks(1)))
    with pytest.raises(ValueError, match="policy EveryKSteps.*LossPlateau"):
        SIPlugin(1.0, consolidate=LossPlateau()).load_state_dict(si.state_dict())
    with pytest.raises(ValueError, match="every 5 steps, this one every 6"):
        SIPlugin(1.0, consolidate=6).load_state_dict(si.state_dict())


def test_the_0_1_call_consolidate_names_its_new_name():
    # avalanche_si 0.1's si.consolidate() consolidated; si.consolidate is now the policy
    from avalanche_si import SIPlugin, SynapticIntelligence

    for si in (SIPlugin(1.0), SynapticIntelligence(si_lambda=1.0), SIPlugin(1.0, consolidate=5)):
        with pytest.raises(TypeError, match=r"call si.consolidate_now\(\) \(renamed from "
                                            r"consolidate\(\) in 0.2\)"):
            si.consolidate()
