"""delta_params: every predicted step equals the real optimizer's step on the same gradient."""

import copy

import pytest
import torch

from avalanche_si.optim_step import StepPredictor, check_optimizer_supported

CONFIGS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, weight_decay=0.01, maximize=True)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.02)),
    ("SGD", dict(lr=0.1, momentum=0.8, nesterov=True)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.9), weight_decay=0.1, eps=1e-6)),
    ("Adam", dict(lr=0.01, amsgrad=True, maximize=True)),
    ("Adam", dict(lr=0.01, foreach=False)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    ("RMSprop", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, alpha=0.9, centered=True, weight_decay=0.05)),
    ("RMSprop", dict(lr=0.01, momentum=0.9, centered=True, maximize=True)),
]


@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=[f"{n}-{sorted(k)}" for n, k in CONFIGS])
def test_prediction_equals_the_real_step(name, kwargs):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, dtype=torch.float64)) for s in [(3, 4), (4,), (2,)]]
    opt = getattr(torch.optim, name)([{"params": params[:2]},
                                      {"params": params[2:], "lr": kwargs["lr"] * 3}], **kwargs)
    predictor = StepPredictor(opt, params)
    for step in range(5):
        grads = [torch.randn_like(p) for p in params]
        before_state = copy.deepcopy(opt.state_dict())
        before = [p.detach().clone() for p in params]
        masked = step == 3  # one step where the last parameter has no gradient
        use = [0, 1] if masked else None
        predicted = predictor.predict(grads[:2] if masked else grads, mask=use)
        after_state = opt.state_dict()["state"]  # the prediction leaves the state untouched
        assert after_state.keys() == before_state["state"].keys()
        for key, entry in before_state["state"].items():
            for field, value in entry.items():
                assert torch.equal(torch.as_tensor(after_state[key][field]), torch.as_tensor(value))
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if masked:
            params[2].grad = None
        opt.step()
        for k, d in enumerate(predicted):
            torch.testing.assert_close(d, params[k].detach() - before[k], rtol=1e-12, atol=1e-15)


def test_unsupported_optimizers_are_named():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="Adagrad.*importance='task'"):
        check_optimizer_supported(torch.optim.Adagrad(p))
    with pytest.raises(ValueError, match="capturable=False"):
        check_optimizer_supported(torch.optim.Adam(p, capturable=True))
    with pytest.raises(ValueError, match="not in the optimizer"):
        StepPredictor(torch.optim.SGD(p, lr=0.1), [torch.nn.Parameter(torch.zeros(3))])
