"""SI in a Hugging Face Accelerate loop (docs/guide/accelerate.md), against SI by the definition
computed from the same run: an oracle records, at every optimizer step, the gradient the step
used and the weights before and after it, in float64."""

import pytest
import torch

from avalanche_si import SynapticIntelligence
from conftest import make_tasks, mlp

accelerate = pytest.importorskip("accelerate")

C, XI = 3.0, 0.1


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


class Oracle:
    """SI by the definition, from what one run did: ω −= g ⊙ Δθ per optimizer step, with g the
    gradient read just before the step (`"total"`) or before SI's penalty (`"task"`), and
    Ω += max(0, ω / ((θ − θ*)² + ξ)) per task; all in float64."""

    def __init__(self, model):
        self.named = dict(model.named_parameters())
        self.omega = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in self.named.items()}
        self.start_task()

    def start_task(self):
        self.star = {n: p.detach().double().clone() for n, p in self.named.items()}
        self.running = {n: torch.zeros_like(o) for n, o in self.omega.items()}

    def gradient(self):
        self.g = {n: p.grad.detach().double().clone() for n, p in self.named.items()}

    def before(self):
        self.pre = {n: p.detach().double().clone() for n, p in self.named.items()}

    def after(self):
        for n, p in self.named.items():
            self.running[n] -= self.g[n] * (p.detach().double() - self.pre[n])

    def end_task(self):
        for n, p in self.named.items():
            d = p.detach().double() - self.star[n]
            self.omega[n] += torch.clamp(self.running[n] / (d * d + XI), min=0)

    def check(self, si, **tol):
        for n, o in si.importances().items():
            torch.testing.assert_close(o.double(), self.omega[n], msg=n, **tol)
        assert sum(float(o.sum()) for o in self.omega.values()) > 0


def _train(importance, *, steps=2, mixed_precision="no", clip=None, dtype=torch.float64,
           tasks=None, save_at=None, load=None, tmp=None):
    """Tasks of mini-batches of 8 as `steps` micro-batches under accelerator.accumulate,
    accelerator.backward, clip_grad_norm_ when the gradients are synced; SI bound to the
    prepared (wrapped) optimizer and registered for checkpointing."""
    from accelerate import Accelerator

    tasks = tasks or make_tasks(dtype=dtype)
    acc = Accelerator(cpu=True, mixed_precision=mixed_precision,
                      gradient_accumulation_steps=steps)
    model = mlp(dtype=dtype)
    model, opt = acc.prepare(model, torch.optim.Adam(model.parameters(), lr=0.05))
    si = SynapticIntelligence(model, opt, si_lambda=C, eps=XI, importance=importance)
    acc.register_for_checkpointing(si)
    if load is not None:
        acc.load_state(load)
    oracle = Oracle(model)
    ce = torch.nn.CrossEntropyLoss()
    k = 0
    for x_all, y_all, _ in tasks:
        si.start_task()
        oracle.start_task()
        for _ in range(2):
            for i in range(0, len(x_all), 8 // steps):
                k += 1
                if load is not None and k <= save_at:
                    continue  # already trained before the checkpoint
                with acc.accumulate(model):
                    acc.backward(ce(model(x_all[i:i + 8 // steps]).float(),
                                    y_all[i:i + 8 // steps]))
                    if importance == "task":
                        oracle.gradient()
                    si.before_step()
                    if acc.sync_gradients and clip is not None:
                        acc.clip_grad_norm_(model.parameters(), clip)
                    if importance == "total":
                        oracle.gradient()
                    oracle.before()
                    opt.step()
                    opt.zero_grad()
                    si.after_step()
                    if acc.sync_gradients:
                        oracle.after()
                if save_at == k and load is None:
                    acc.save_state(tmp)
        si.end_task()
        oracle.end_task()
    return model, si, oracle


@pytest.mark.parametrize("importance", ["total", "task"])
def test_accumulation_and_clipping_are_the_definition(importance):
    _, si, oracle = _train(importance, steps=2, clip=0.5)
    oracle.check(si, rtol=1e-9, atol=1e-12)
    assert si.consolidations == 3


def test_si_sees_through_the_accelerated_optimizer():
    # bound to the AcceleratedOptimizer, which never runs torch's Optimizer.__init__: before,
    # SI saw no step and Ω stayed 0
    _, si, oracle = _train("total", steps=1)
    from accelerate.optimizer import AcceleratedOptimizer

    assert isinstance(si.optimizer, AcceleratedOptimizer)
    oracle.check(si, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("importance", ["total", "task"])
def test_bf16_mixed_precision_is_the_definition_of_its_own_run(importance):
    _, si, oracle = _train(importance, steps=2, mixed_precision="bf16", dtype=torch.float32)
    oracle.check(si, rtol=1e-5, atol=1e-7)


def test_save_state_and_load_state_resume_the_uninterrupted_run_bit_for_bit(tmp_path):
    whole, si_whole, _ = _train("task", steps=2)
    _train("task", steps=2, save_at=20, tmp=tmp_path / "ckpt")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    resumed, si_resumed, _ = _train("task", steps=2, save_at=20, load=tmp_path / "ckpt")
    for (n, p), (_, q) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n
    for n, o in si_whole.importances().items():
        assert torch.equal(o, si_resumed.importances()[n]), n
