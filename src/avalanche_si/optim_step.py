r"""Predict the step an optimizer would take from a given gradient, without taking it.

Used by the `"delta_params"` importance: `ω ← ω - g ⊙ Δθ`
with g the task gradient and Δθ the step the optimizer *would*
take from g alone, read from its current state (which is left unchanged).
Supported, with the exact update rules of `torch.optim` (2.x):

- `torch.optim.SGD`: momentum, dampening, nesterov, weight decay, maximize;
- `torch.optim.Adam` / `torch.optim.AdamW`: weight decay (coupled or
  decoupled), amsgrad, maximize;
- `torch.optim.RMSprop`: alpha, centered, momentum, weight decay, maximize.

Every function works on lists with fused `torch._foreach_*` operations. Nothing here
imports Avalanche.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["StepPredictor", "SUPPORTED_OPTIMIZERS", "check_optimizer_supported"]

SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)


def _scalar(x) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def check_optimizer_supported(optimizer: torch.optim.Optimizer) -> None:
    """Raise `ValueError` if `StepPredictor` cannot predict `optimizer`'s steps."""
    if type(optimizer) not in SUPPORTED_OPTIMIZERS:
        names = ", ".join(f"torch.optim.{c.__name__}" for c in SUPPORTED_OPTIMIZERS)
        raise ValueError(
            f"importance='delta_params' cannot predict the steps of {type(optimizer).__name__}: "
            f"it supports {names}. Use importance='task' (same gradient, the step actually "
            "taken) or importance='total' with this optimizer.")
    for group in optimizer.param_groups:
        for flag in ("capturable", "differentiable"):
            if group.get(flag, False):
                raise ValueError(
                    f"importance='delta_params' does not support {type(optimizer).__name__}("
                    f"{flag}=True); create the optimizer with {flag}=False or use "
                    "importance='task'.")


@dataclass
class _Slot:
    """The regularized parameters that one optimizer param group holds."""
    positions: list[int]
    group: dict
    params: list[Tensor] = field(default_factory=list)


class StepPredictor:
    r"""Predicts Δθ for a fixed list of parameters of one optimizer.

    Built once per experience (it maps each parameter to its optimizer param group);
    `predict()` then does fused list operations only.

    Args:
        optimizer: one of `SUPPORTED_OPTIMIZERS`.
        params: the parameters whose steps are wanted, in a fixed order.

    Raises:
        ValueError: unsupported optimizer or option, or a parameter the optimizer
            does not hold (it would never move, so its importance would be 0).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor]):
        check_optimizer_supported(optimizer)
        self.optimizer = optimizer
        where = {}
        for gi, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                where[id(p)] = gi
        slots: dict[int, _Slot] = {}
        for pos, p in enumerate(params):
            gi = where.get(id(p))
            if gi is None:
                raise ValueError(
                    f"importance='delta_params': regularized parameter #{pos} (shape "
                    f"{tuple(p.shape)}) is not in the optimizer; add it to the optimizer or "
                    "exclude it from SI (excluded_parameters=...).")
            slots.setdefault(gi, _Slot([], optimizer.param_groups[gi])).positions.append(pos)
        self.slots = list(slots.values())
        self.n = len(params)
        for slot in self.slots:
            slot.params = [params[i] for i in slot.positions]
        self._rule: Callable = {
            torch.optim.SGD: self._sgd, torch.optim.Adam: self._adam,
            torch.optim.AdamW: self._adam, torch.optim.RMSprop: self._rmsprop,
        }[type(optimizer)]

    @torch.no_grad()
    def predict(self, grads: Sequence[Tensor], mask: Optional[Sequence[int]] = None) -> list[Tensor]:
        r"""The steps Δθ the optimizer would take from `grads`.

        Args:
            grads: one gradient per parameter, in the constructor's order (or, with
                `mask`, one per listed position).
            mask: positions (into the constructor's list) to predict; default all.

        Returns:
            New tensors, one per gradient, in the same order.
        """
        positions = list(range(self.n)) if mask is None else list(mask)
        out: list[Optional[Tensor]] = [None] * len(positions)
        rank = {pos: k for k, pos in enumerate(positions)}
        for slot in self.slots:
            if mask is None:
                ks, params = slot.positions, slot.params
            else:
                ks = [k for k in slot.positions if k in rank]
                if not ks:
                    continue
                params = [slot.params[slot.positions.index(k)] for k in ks]
            g = [grads[rank[k]] for k in ks]
            states = [self.optimizer.state.get(p, {}) for p in params]
            for k, d in zip(ks, self._rule(slot.group, params, g, states)):
                out[rank[k]] = d
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ update rules

    @staticmethod
    def _effective_grad(group: dict, params, grads, *, coupled_decay: bool) -> list[Tensor]:
        g = torch._foreach_neg(grads) if group.get("maximize", False) else list(grads)
        wd = group.get("weight_decay", 0.0)
        if coupled_decay and wd != 0:
            g = torch._foreach_add(g, [p.detach() for p in params], alpha=wd)
        return g

    def _sgd(self, group, params, grads, states) -> list[Tensor]:
        lr, momentum = _scalar(group["lr"]), group["momentum"]
        d_p = self._effective_grad(group, params, grads, coupled_decay=True)
        if momentum == 0:
            return torch._foreach_mul(d_p, -lr)
        bufs = [s.get("momentum_buffer") for s in states]
        if any(b is None for b in bufs):  # first step: the buffer starts as the gradient
            new_buf = [torch.clone(g) if b is None else b * momentum + g * (1 - group["dampening"])
                       for b, g in zip(bufs, d_p)]
        else:
            new_buf = torch._foreach_mul(bufs, momentum)
            torch._foreach_add_(new_buf, d_p, alpha=1 - group["dampening"])
        step = torch._foreach_add(d_p, new_buf, alpha=momentum) if group["nesterov"] else new_buf
        torch._foreach_mul_(step, -lr)
        return step

    def _adam(self, group, params, grads, states) -> list[Tensor]:
        lr = _scalar(group["lr"])
        beta1, beta2 = (_scalar(b) for b in group["betas"])
        decoupled = group.get("decoupled_weight_decay", type(self.optimizer) is torch.optim.AdamW)
        g = self._effective_grad(group, params, grads, coupled_decay=not decoupled)
        steps = [_scalar(s["step"]) + 1 if "step" in s else 1.0 for s in states]
        m = [s["exp_avg"] if "exp_avg" in s else torch.zeros_like(p) for s, p in zip(states, params)]
        v = [s["exp_avg_sq"] if "exp_avg_sq" in s else torch.zeros_like(p)
             for s, p in zip(states, params)]
        new_m = torch._foreach_mul(m, beta1)
        torch._foreach_add_(new_m, g, alpha=1 - beta1)
        denom = torch._foreach_mul(v, beta2)
        torch._foreach_addcmul_(denom, g, g, value=1 - beta2)
        if group.get("amsgrad", False):
            vmax = [s["max_exp_avg_sq"] if "max_exp_avg_sq" in s else torch.zeros_like(p)
                    for s, p in zip(states, params)]
            torch._foreach_maximum_(denom, vmax)
        torch._foreach_sqrt_(denom)
        torch._foreach_div_(denom, [(1 - beta2 ** t) ** 0.5 for t in steps])
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_div_(new_m, denom)
        torch._foreach_mul_(new_m, [-lr / (1 - beta1 ** t) for t in steps])
        wd = group.get("weight_decay", 0.0)
        if decoupled and wd != 0:  # θ ← θ(1 − lr·wd) happens before the Adam step
            torch._foreach_add_(new_m, [p.detach() for p in params], alpha=-lr * wd)
        return new_m

    def _rmsprop(self, group, params, grads, states) -> list[Tensor]:
        lr, alpha, momentum = _scalar(group["lr"]), group["alpha"], group["momentum"]
        g = self._effective_grad(group, params, grads, coupled_decay=True)

        def state(key):
            return [s[key] if key in s else torch.zeros_like(p) for s, p in zip(states, params)]

        avg = torch._foreach_mul(state("square_avg"), alpha)
        torch._foreach_addcmul_(avg, g, g, value=1 - alpha)
        if group["centered"]:
            grad_avg = torch._foreach_mul(state("grad_avg"), alpha)
            torch._foreach_add_(grad_avg, g, alpha=1 - alpha)
            torch._foreach_addcmul_(avg, grad_avg, grad_avg, value=-1)
        torch._foreach_sqrt_(avg)
        torch._foreach_add_(avg, group["eps"])
        step = torch._foreach_div(g, avg)
        if momentum > 0:
            buf = torch._foreach_mul(state("momentum_buffer"), momentum)
            torch._foreach_add_(buf, step)
            step = buf
        torch._foreach_mul_(step, -lr)
        return step
