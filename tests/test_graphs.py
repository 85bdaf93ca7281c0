"""cuda_graphs=True: the step work replayed as CUDA graphs, bit-identical to the eager path.

Without a GPU the graphs are stood in for by ``ReplayedOnTheCPU`` (conftest): a capture keeps
the callable and its scalars, a replay runs it on tensors that ``graphs.CHECK`` proves are
the captured ones. So every key that would let a real graph replay on stale memory or with
a stale scalar fails here, on the CPU; on a GPU the same tests run the real graphs.

On the CPU the C kernels are switched off (``no_c_kernels``): a GPU runs the ``_foreach``
path, and the C kernel's penalty value is summed differently (in float64, in its pass).
"""

import pytest
import torch

from avalanche_si import SIPlugin, SynapticIntelligence, _fused
from avalanche_si import graphs as G
from avalanche_si.options import OptionTypeError
from conftest import DEVICES, ReplayedOnTheCPU

CE = torch.nn.functional.cross_entropy


@pytest.fixture(autouse=True)
def no_c_kernels():
    with _fused.disabled():
        yield


class TwoHeads(torch.nn.Module):
    """A body and one head per task parity: the other head has no gradient in a step."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(),
                                        torch.nn.Linear(16, 16), torch.nn.ReLU())
        self.heads = torch.nn.ModuleList([torch.nn.Linear(16, 3), torch.nn.Linear(16, 3)])
        self.task = 0

    def forward(self, x):
        return self.heads[self.task % 2](self.body(x))


def run(device, dtype, *, graphs, importance="total", set_to_none=True, scaler=False,
        accumulate=False, move_weights_at=None, tasks=3, steps=8, inf_at=None,
        si_lambda=(0.5, 2.0, 3.0)):
    """Train three tasks; returns what must not depend on graphs (weights, state, the
    penalty at each step) and the engine."""
    torch.manual_seed(0)
    model = TwoHeads().to(device, dtype)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    amp = torch.amp.GradScaler(device, init_scale=2.0 ** 8) if scaler else None
    si = SynapticIntelligence(model, opt, si_lambda=si_lambda, eps=0.1,
                              importance=importance, scaler=amp, cuda_graphs=graphs,
                              groups={"body": ["body"], "heads": ["heads"]})
    data = torch.randn(tasks, steps, 2, 12, 6, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 3, (tasks, steps, 2, 12), generator=torch.Generator().manual_seed(2))
    penalties, step, kept = [], 0, []
    for t in range(tasks):
        model.task = t
        si.start_task()
        for s in range(steps):
            if step == move_weights_at:  # model.to(...) does this: same objects, new memory
                for p in model.parameters():
                    p.data = p.data.clone()
            opt.zero_grad(set_to_none=set_to_none)
            for k in range(2 if accumulate else 1):
                loss = CE(model(data[t, s, k].to(device, dtype)), labels[t, s, k].to(device))
                (amp.scale(loss) if amp else loss).backward()
                if step == inf_at and k == 0:
                    with torch.no_grad():
                        model.body[0].weight.grad[0, 0] = float("inf")
                if accumulate:  # the engine's hooks after every backward pass
                    si.before_step()
                    if k == 1:
                        (amp.step(opt), amp.update()) if amp else opt.step()
                    si.after_step(loss.detach())
            if not accumulate:
                si.before_step()
                (amp.step(opt), amp.update()) if amp else opt.step()
                si.after_step(loss.detach())
            penalties.append(None if si.penalty is None else si.penalty.clone())
            step += 1
        kept.append([g.graphs for g in si._groups])
        si.end_task()
    state = si.state_dict()["buffers"]
    assert len(state) == 3 * 8
    return dict(weights=[p.detach().clone() for p in model.parameters()], state=state,
                penalties=penalties), si, kept


def assert_identical(a, b):
    for x, y in zip(a["weights"], b["weights"], strict=True):
        assert torch.equal(x, y)
    assert sorted(a["state"]) == sorted(b["state"])
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    for x, y in zip(a["penalties"], b["penalties"], strict=True):
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y))


def replays(kept):
    return sum(g.replays for per_task in kept for g in per_task if g is not None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("importance", ["total", "task"])
@pytest.mark.parametrize("set_to_none", [False, True])
@pytest.mark.parametrize("si_lambda", [1.0, (0.5, 2.0, 3.0)])  # the penalty switched on; c
def test_graphed_steps_equal_the_eager_ones_to_the_bit(graphs_everywhere, device, dtype,
                                                       importance, set_to_none, si_lambda):
    kw = dict(importance=importance, set_to_none=set_to_none, si_lambda=si_lambda)
    eager, _, _ = run(device, dtype, graphs=False, **kw)
    graphed, si, kept = run(device, dtype, graphs=True, **kw)
    assert_identical(eager, graphed)
    assert any(p is not None for p in graphed["penalties"])
    if not set_to_none or device == "cuda":  # the same gradient tensors, or the same blocks
        assert replays(kept) > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("importance", ["total", "task"])
def test_graphed_steps_with_a_scaler_and_a_skipped_step_equal_the_eager_ones(
        graphs_everywhere, device, importance):
    kw = dict(importance=importance, scaler=True, set_to_none=False, inf_at=5)
    eager, _, _ = run(device, torch.float32, graphs=False, **kw)
    graphed, _, kept = run(device, torch.float32, graphs=True, **kw)
    assert_identical(eager, graphed)
    assert replays(kept) > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("importance", ["total", "task"])
def test_graphed_steps_under_gradient_accumulation_equal_the_eager_ones(
        graphs_everywhere, device, importance):
    kw = dict(importance=importance, accumulate=True, set_to_none=False)
    eager, _, _ = run(device, torch.float32, graphs=False, **kw)
    graphed, _, kept = run(device, torch.float32, graphs=True, **kw)
    assert_identical(eager, graphed)
    assert replays(kept) > 0


@pytest.mark.parametrize("device", DEVICES)
def test_weights_moved_to_new_memory_are_not_replayed_on(graphs_everywhere, device):
    # p.data = ... (what model.to() does) keeps the parameter objects and moves their memory;
    # the key holds the addresses, so the graphs captured before are not replayed after
    kw = dict(set_to_none=False, move_weights_at=12)
    eager, _, _ = run(device, torch.float32, graphs=False, **kw)
    graphed, _, kept = run(device, torch.float32, graphs=True, **kw)
    assert_identical(eager, graphed)
    assert replays(kept) > 0 and sum(g.captures for g in kept[1] if g is not None) > 2


def test_the_check_refuses_a_replay_on_other_tensors(graphs_everywhere):
    calls = []
    graphs = G.StepGraphs(torch.device("cpu"))
    a, b = [torch.zeros(3)], [torch.zeros(3)]
    for _ in range(3):
        graphs.run("k", lambda t: calls.append(t[0].data_ptr()), a)
    assert graphs.captures == 1 and graphs.replays == 2 and len(calls) == 3
    with pytest.raises(RuntimeError, match="other tensors than it was captured with"):
        graphs.run("k", lambda t: None, b)  # a key that missed a change


def test_each_run_does_the_work_once_and_moving_tensors_stop_the_captures(graphs_everywhere):
    graphs = G.StepGraphs(torch.device("cpu"))
    done = []
    work = lambda t: done.append(1)  # noqa: E731
    t = [torch.zeros(2)]
    for key in ("a", "b"):  # two keys in turn (gradients that alternate), replayed for good
        graphs.run(key, work, t)
    for _ in range(10):
        for key in ("a", "b"):
            graphs.run(key, work, t)
    assert graphs.captures == 2 and graphs.replays == 20 and graphs.off is None
    # then keys that come back once only: each graph is dropped unused, and after
    # MAX_WASTED of them the group stops capturing; "a" and "b", used last, stay
    fresh = G.KEEP - 2 + G.MAX_WASTED
    for key in range(fresh):
        graphs.run(key, work, t)
        graphs.run(key, work, t)
        graphs.run("a", work, t)
        graphs.run("b", work, t)
    assert graphs.wasted == G.MAX_WASTED and "dropped unused" in graphs.off
    assert graphs.captures == 2 + fresh
    graphs.run("new", work, t)
    graphs.run("new", work, t)  # seen twice, but no capture now
    assert graphs.captures == 2 + fresh and "new" not in graphs._graphs
    assert len(done) == 22 + 4 * fresh + 2  # every run did the work once


def test_a_capture_that_fails_warns_once_and_the_work_runs_eagerly(monkeypatch):
    class Broken(ReplayedOnTheCPU):
        def __init__(self, fn, lists, pool):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(G, "backend_for", lambda device: Broken)
    graphs = G.StepGraphs(torch.device("cpu"))
    done = []
    graphs.run("k", lambda: done.append(1))
    with pytest.warns(UserWarning, match="could not be captured as a CUDA graph"):
        graphs.run("k", lambda: done.append(1))
    graphs.run("k", lambda: done.append(1))
    assert len(done) == 3 and graphs.captures == 0 and "capture failed" in graphs.off


def test_the_option_is_checked_fixed_and_passed_through():
    with pytest.raises(OptionTypeError, match="cuda_graphs"):
        SynapticIntelligence(cuda_graphs="yes")
    plugin = SIPlugin(1.0, cuda_graphs=True)
    assert plugin.cuda_graphs is True and plugin.engine.cuda_graphs is True
    with pytest.raises(AttributeError):
        plugin.engine.cuda_graphs = False
    assert SynapticIntelligence().cuda_graphs is False


@pytest.mark.parametrize("importance", ["delta_params", "sos"])
def test_modes_that_read_per_step_scalars_stay_eager(graphs_everywhere, importance):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters())
    si = SynapticIntelligence(model, opt, importance=importance, cuda_graphs=True)
    si.start_task()
    assert all(g.graphs is None for g in si._groups)


def test_without_a_gpu_the_option_changes_nothing():
    model = torch.nn.Linear(4, 2)
    si = SynapticIntelligence(model, torch.optim.SGD(model.parameters(), lr=0.1),
                              cuda_graphs=True)
    si.start_task()
    assert si._groups[0].graphs is None  # CPU tensors: the eager path (the C kernels)


@pytest.mark.parametrize("device", DEVICES)
def test_task_gradients_in_fixed_buffers_stay_apart_from_the_optimizers(graphs_everywhere,
                                                                        device):
    # DDP's gradient_as_bucket_view hands out the same gradient tensors every step. Eagerly
    # "task" writes the optimizer's gradient into other tensors (which may not share memory
    # with the task gradient); graphed, it copies the task gradient into SI's own tensors and
    # the penalty goes into the given ones: the same numbers either way
    def train(graphs):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(),
                                    torch.nn.Linear(8, 3)).to(device)
        buffers = [torch.zeros_like(p) for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        si = SynapticIntelligence(model, opt, importance="task", cuda_graphs=graphs)
        x = torch.randn(2, 6, 16, 6, generator=torch.Generator().manual_seed(1)).to(device)
        y = torch.randint(0, 3, (2, 6, 16), generator=torch.Generator().manual_seed(2))
        given = []  # the optimizer's gradients, kept: their memory is not reused
        for t in range(2):
            si.start_task()
            for s in range(6):
                for p, b in zip(model.parameters(), buffers):
                    b.zero_()
                    p.grad = b
                CE(model(x[t, s]), y[t, s].to(device)).backward()
                si.before_step()
                opt.step()
                si.after_step()
                given.append([p.grad for p in model.parameters()])
            si.end_task()
        # eagerly the optimizer gets other tensors; graphed, .grad keeps the given ones (the
        # task gradient is copied into SI's own tensors)
        assert all((p.grad is b) == graphs for p, b in zip(model.parameters(), buffers))
        return [p.detach().clone() for p in model.parameters()], si.state_dict()["buffers"]

    (w0, s0), (w1, s1) = train(False), train(True)
    assert all(torch.equal(a, b) for a, b in zip(w0, w1, strict=True))
    assert all(torch.equal(s0[k], s1[k]) for k in s0)


@pytest.mark.parametrize("importance", ["total", "task"])
def test_graphs_outlive_a_new_optimizer_but_not_a_loaded_state(graphs_everywhere, importance):
    def train(graphs):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        si = SynapticIntelligence(model, opt, si_lambda=2.0, importance=importance,
                                  cuda_graphs=graphs)
        x, y = torch.randn(4, 16, 6), torch.randint(0, 3, (4, 16))
        seen, task_grads = [], []
        for t in range(4):
            if t == 1:  # a new optimizer: the lists are rebuilt on the same tensors, and the
                opt = torch.optim.Adam(model.parameters(), lr=0.05)  # graphs stay valid
                si.bind(model, opt)
            if t == 2:  # a checkpoint reloaded: new state tensors, so the old graphs must go
                si.load_state_dict(si.state_dict())
            si.start_task()
            for _ in range(4):
                opt.zero_grad(set_to_none=False)
                CE(model(x[t]), y[t]).backward()
                si.before_step()
                opt.step()
                si.after_step()
            seen.append(si._groups[0].graphs)
            task_grads.append(si._groups[0].task_grads)  # "task": captured on them too
            si.end_task()
        return ([p.detach().clone() for p in model.parameters()], si.state_dict()["buffers"],
                seen, task_grads)

    (w0, s0, _, _), (w1, s1, seen, task_grads) = train(False), train(True)
    assert all(torch.equal(a, b) for a, b in zip(w0, w1, strict=True))
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert seen[0] is seen[1] and seen[1] is not seen[2] and seen[2] is seen[3]
    assert all(g.replays > 0 for g in seen)
    if importance == "task":
        assert task_grads[0] is task_grads[1] and task_grads[1] is not task_grads[2]


def test_addresses_are_reused_only_while_every_tensor_stays_where_it_was():
    graphs = G.StepGraphs(torch.device("cpu"))
    a, b = [torch.zeros(3), torch.zeros(2, 2)], [torch.zeros(5)]
    first = graphs.addresses(a, b)
    assert graphs.addresses(a, b) is first  # the same tensors: the same key object
    moved = [a[0], torch.zeros(2, 2)]
    second = graphs.addresses(moved, b)
    assert second is not first and second != first
    assert graphs.addresses(a, b) == first and hash(graphs.addresses(a, b)) == hash(first)
    assert graphs.addresses(a, b + [torch.zeros(1)]) != first  # a list grew
    assert graphs.addresses(a) != first                         # a list fewer
    a[1].data = torch.zeros(2, 2)  # what model.to() does: the same object, other memory
    assert graphs.addresses(a, b) != first


@pytest.mark.parametrize("check", [G._same_addresses, G._same_addresses_in_python])
def test_the_address_check_compares_every_pointer(check):
    ts = [torch.zeros(2), torch.zeros(3)]
    ptrs = [t.data_ptr() for t in ts]
    assert check(ts, ptrs, [0, 1])
    assert not check(ts, [ptrs[0], ptrs[1] + 4], [0, 1])
    assert not check(ts, [ptrs[0] + 4, ptrs[1]], [0, 1])


@pytest.mark.parametrize("importance", ["total", "task"])
def test_graphed_steps_on_an_online_stream_equal_the_eager_ones(graphs_everywhere, importance):
    # an online stream: one step per mini-experience and SI's per-experience hooks around
    # each; the graphs must outlive them and the boundary consolidations
    from avalanche.benchmarks.scenarios.online import split_online_stream

    from avalanche_si import SIPlugin
    from conftest import make_stream, make_tasks, mlp, strategy

    def train(graphs):
        model = mlp()
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        opt.zero_grad = lambda set_to_none=True: type(opt).zero_grad(opt, set_to_none=False)
        si = SIPlugin(3.0, eps=0.1, importance=importance, consolidate="boundary",
                      cuda_graphs=graphs)
        strat = strategy(model, opt, [si], mb=8, epochs=1)
        stream = split_online_stream(make_stream(make_tasks()).train_stream, experience_size=8,
                                     shuffle=False, access_task_boundaries=True)
        for exp in stream:
            strat.train(exp, shuffle=False, num_workers=0, eval_streams=[])
        si.consolidate_now()
        return [p.detach().clone() for p in model.parameters()], si.importances(), si

    (w0, i0, _), (w1, i1, si) = train(False), train(True)
    assert all(torch.equal(a, b) for a, b in zip(w0, w1, strict=True))
    assert i0.keys() == i1.keys() and all(torch.equal(i0[k], i1[k]) for k in i0)
    graphs = si.engine._groups[0].graphs
    assert graphs.replays > 10 and graphs.captures <= 4 and graphs.off is None


def test_the_summary_says_how_the_graphs_were_used(graphs_everywhere):
    from types import SimpleNamespace

    graphs = G.StepGraphs(torch.device("cpu"))
    t = [torch.zeros(2)]
    for _ in range(3):
        graphs.run("k", lambda t: None, t)
    engine = SimpleNamespace(cuda_graphs=True, _groups=[SimpleNamespace(graphs=graphs)])
    assert G.summary(engine) == "2 replays, 1 captures"
    graphs.off = "4 graphs dropped unused"
    assert G.summary(engine) == "2 replays, 1 captures (stopped: 4 graphs dropped unused)"
    assert G.summary(SimpleNamespace(cuda_graphs=True, _groups=[SimpleNamespace(graphs=None)])) \
        == "not used on this device"
    assert G.summary(SimpleNamespace(cuda_graphs=False, _groups=[])) == ""
