"""The functional core: closed form, buffer layout, misuse, kernels against a plain loop."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from avalanche_si import NonFiniteImportanceError, functional as F


def test_closed_form_scalar_quadratic_sgd():
    """L = (w - 1)^2 / 2, w0 = 0, SGD lr 0.5: g0 = -1, w1 = .5; g1 = -.5, w2 = .75."""
    net = torch.nn.Module()
    w = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        (0.5 * (w - 1) ** 2).backward()
        F.si_pre_optim_step(net, [w])
        opt.step()
        F.si_post_optim_step(net, [w])
    # omega = -g0*d0 - g1*d1 = 1*0.5 + 0.5*0.25 = 0.625
    assert net.si_running_omega_weights_0.item() == pytest.approx(0.625, abs=1e-15)
    F.si_compute_importance(net, [w], epsilon=1e-3)
    assert net.si_omega_weights_0.item() == pytest.approx(0.625 / (0.75 ** 2 + 1e-3), rel=1e-14)
    assert net.si_prev_theta_weights_0.item() == 0.75
    assert net.si_running_omega_weights_0 is None
    # the penalty: Omega * (w - 0.75)^2, no 1/2, no strength
    with torch.no_grad():
        w.fill_(1.75)
    assert F.si_regularizer(net, [w]).item() == pytest.approx(0.625 / 0.5635, rel=1e-14)


def test_buffer_names_and_groups_and_frozen_params():
    net = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.ones(4), requires_grad=False)
    params = [net.weight, frozen, net.bias]
    net(torch.ones(1, 3)).sum().backward()
    F.si_pre_optim_step(net, params, "enc")
    F.si_post_optim_step(net, params, "enc")
    F.si_compute_importance(net, params, "enc")
    names = {n for n, _ in net.named_buffers()}
    assert names == {"si_omega_enc_weights_0", "si_prev_theta_enc_weights_0",
                     "si_omega_enc_weights_2", "si_prev_theta_enc_weights_2"}
    assert F.si_buffer_names(3) == ("si_omega_weights_3", "si_prev_theta_weights_3",
                                    "si_running_omega_weights_3", "si_pre_step_theta_weights_3")


def test_no_pre_step_ckpt_keeps_three_n():
    net = torch.nn.Linear(3, 2)
    params = list(net.parameters())
    F.si_pre_optim_step(net, params, no_pre_step_ckpt=True)
    net(torch.ones(1, 3)).sum().backward()
    F.si_post_optim_step(net, params, delta_params=[torch.full_like(p, -0.1) for p in params])
    n = sum(p.numel() for p in params)
    assert sum(b.numel() for b in net.buffers() if b is not None) == 2 * n  # theta_prev and omega
    F.si_compute_importance(net, params)
    assert sum(b.numel() for b in net.buffers() if b is not None) == 2 * n  # Omega, theta_prev


def test_misuse_names_the_missing_call():
    net = torch.nn.Linear(3, 2)
    params = list(net.parameters())
    with pytest.raises(ValueError, match="si_pre_optim_step"):
        F.si_compute_importance(net, params)
    with pytest.raises(ValueError, match="no gradient.*backward"):
        F.si_post_optim_step(net, params)
    net(torch.ones(1, 3)).sum().backward()
    with pytest.raises(ValueError, match="call si_pre_optim_step.*or pass delta_params"):
        F.si_post_optim_step(net, params)
    F.si_pre_optim_step(net, params)
    with pytest.raises(ValueError, match="si_post_optim_step"):
        F.si_compute_importance(net, params)
    F.si_post_optim_step(net, params)
    with pytest.raises(ValueError, match="call si_pre_optim_step"):
        F.si_post_optim_step(net, params)  # a second post-step needs a new pre-step
    with pytest.raises(ValueError, match="si_compute_importance"):
        F.si_regularizer(net, params)
    with pytest.raises(ValueError, match="epsilon"):
        F.si_compute_importance(net, params, epsilon=0.0)
    with pytest.raises(ValueError, match="one step tensor per parameter"):
        F.si_post_optim_step(net, params, delta_params=[torch.zeros(1)])
    F.si_compute_importance(net, params)
    assert F.si_regularizer(net, params).item() == 0.0


def test_non_finite_importance_raises_and_keeps_omega():
    net = torch.nn.Linear(2, 2)
    params = list(net.parameters())
    for value in (1.0, float("nan")):
        F.si_pre_optim_step(net, params)
        for p in params:
            p.grad = torch.full_like(p, value)
        with torch.no_grad():
            for p in params:
                p.sub_(0.1)
        F.si_post_optim_step(net, params)
        if math.isfinite(value):
            F.si_compute_importance(net, params)
            kept = [net.si_omega_weights_0.clone(), net.si_omega_weights_1.clone()]
    with pytest.raises(NonFiniteImportanceError, match="#0 is not finite.*diverged"):
        F.si_compute_importance(net, params)
    torch.testing.assert_close(net.si_omega_weights_0, kept[0], rtol=0, atol=0)
    torch.testing.assert_close(net.si_omega_weights_1, kept[1], rtol=0, atol=0)


shapes = st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3), min_size=1, max_size=5)


@settings(max_examples=40, deadline=None)
@given(shapes=shapes, steps=st.integers(1, 4), eps=st.floats(1e-6, 1.0), c=st.floats(0.0, 10.0),
       seed=st.integers(0, 2 ** 16))
def test_kernels_against_a_plain_loop(shapes, steps, eps, c, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(s):
        return torch.randn(s, generator=g, dtype=torch.float64)

    params = [rnd(s) for s in shapes]
    prev = [rnd(s) for s in shapes]
    omega = [rnd(s).abs() for s in shapes]
    running = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    ref_running = [r.clone() for r in running]
    for _ in range(steps):
        grads = [rnd(s) for s in shapes]
        ref_grads = [gr.clone() for gr in grads]
        ref_value = 0.0
        for k in range(len(shapes)):  # the penalty's gradient and value, by hand
            ref_grads[k] = ref_grads[k] + 2 * c * omega[k] * (params[k] - prev[k])
            ref_value += c * float((omega[k] * (params[k] - prev[k]) ** 2).sum())
        kept = [gr.clone() for gr in grads]
        out, d_out = F.penalty_grad(grads, omega, params, prev, strength=c)  # out of place
        assert all(torch.equal(gr, k) for gr, k in zip(grads, kept))
        d = F.penalty_grad_(grads, omega, params, prev, strength=c)
        for k in range(len(shapes)):
            assert torch.equal(out[k], grads[k]) and torch.equal(d_out[k], d[k])
        for k in range(len(shapes)):
            torch.testing.assert_close(grads[k], ref_grads[k])
            torch.testing.assert_close(d[k], params[k] - prev[k])
        value = F.penalty_value(omega, d, strength=c)
        assert value.item() == pytest.approx(ref_value, rel=1e-12, abs=1e-12)
        new = [p + rnd(p.shape) * 0.1 for p in params]
        neg_delta = [p - q for p, q in zip(params, new)]
        F.accumulate_from_step(running, grads, neg_delta)
        for k in range(len(shapes)):
            ref_running[k] = ref_running[k] - ref_grads[k] * (new[k] - params[k])
            torch.testing.assert_close(running[k], ref_running[k])
        params = new
    ref_omega = [o + torch.clamp(r / ((p - q) ** 2 + eps), min=0)
                 for o, r, p, q in zip(omega, ref_running, params, prev)]
    F.consolidate(omega, prev, running, params, eps=eps)
    for k in range(len(shapes)):
        torch.testing.assert_close(omega[k], ref_omega[k])
        assert (omega[k] >= 0).all()
        assert torch.equal(prev[k], params[k]) and not running[k].any()


def test_si_regularizer_refuses_the_same_parameters_in_another_order():
    # before: same-shaped parameters in another order paired each with another's state, and
    # the penalty's value was silently wrong
    net = torch.nn.Module()
    a = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    F.si_pre_optim_step(net, [a, b])
    for p in (a, b):
        p.grad = torch.ones_like(p)
    F.si_post_optim_step(net, [a, b])
    F.si_compute_importance(net, [a, b])
    F.si_regularizer(net, [a, b])  # the same order: fine
    with pytest.raises(ValueError, match="another order"):
        F.si_regularizer(net, [b, a])


def test_a_parameter_on_the_meta_device_is_a_clear_error():
    from avalanche_si import SynapticIntelligence

    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="on the meta device .*to_empty"):
        F.si_pre_optim_step(torch.nn.Module(), list(model.parameters()))
    si = SynapticIntelligence(model)
    with pytest.raises(ValueError, match="'weight' is on the meta device"):
        si.start_task()


def test_a_diverged_run_names_the_strength_beside_the_learning_rate():
    # before: a strength of 1e30 failed at the consolidation with a message that blamed the
    # learning rate alone
    from avalanche_si import SynapticIntelligence

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    si = SynapticIntelligence(model, opt, si_lambda=1e30)
    for _ in range(2):
        si.start_task()
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(8, 3)).pow(2).mean().backward()
            si.before_step()
            opt.step()
            si.after_step()
        with pytest.raises(NonFiniteImportanceError, match="strength c") if si.consolidations \
                else _nothing():
            si.end_task()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
