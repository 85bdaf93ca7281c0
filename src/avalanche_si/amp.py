r"""Mixed precision: SI with `torch.amp.GradScaler`.

With a gradient scaler the backward pass leaves Sg in `.grad` (S the loss
scale, 65,536 at the start), and `scaler.step` divides by S and *skips* the step
(weights unchanged) when any gradient is inf or NaN. SI must therefore

- add its penalty's gradient `2cΩ(θ - θ*)` to the *unscaled*
  gradient, or the penalty acts S times too weakly;
- measure ω with unscaled gradients;
- add nothing to ω for a skipped step (its inf gradient times a zero step is
  NaN otherwise).

`unscale_()` does the first two the way PyTorch documents for gradient clipping
(`scaler.unscale_(optimizer)` between the backward pass and `scaler.step`) and the third
by zeroing the non-finite entries of the gradients SI reads: the step is skipped anyway, as
the scaler decided when it unscaled, and a step that does not move a weight then adds
exactly 0. `SIPlugin` calls it in `after_backward` when the strategy
has a scaler (or one is passed as `scaler=`); with the functional API call it yourself:

```python
scaler.scale(loss).backward()
found_inf = avalanche_si.amp.unscale_(scaler, optimizer, params)
F.si_pre_optim_step(net, params)
scaler.step(optimizer)
scaler.update()
F.si_post_optim_step(net, params)
```

Nothing here imports Avalanche.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torch.amp.grad_scaler import GradScaler, OptState

from .options import OptionTypeError

__all__ = ["unscale_", "zero_nonfinite_", "find_scaler", "check_scaler", "stepped", "rescale_",
           "unscaled_optimizers"]


def check_scaler(value: Any) -> Optional[GradScaler]:
    """``value`` if it is a ``torch.amp.GradScaler`` or None; else a clear ``TypeError``."""
    if value is None or isinstance(value, GradScaler):
        return value
    raise OptionTypeError(f"scaler must be a torch.amp.GradScaler (or None: the strategy's own, "
                          f"if it has one), got {value!r}.")


def find_scaler(strategy: Any) -> Optional[GradScaler]:
    """The `torch.amp.GradScaler` the strategy holds (an AMP subclass's `self.scaler`,
    whatever its name), or None. Looked for among its attributes, its class's, and one level
    down, in the attributes of the objects it holds (a helper with a `.scaler`).

    Raises:
        ValueError: the strategy holds several; pass the one in use as `scaler=`.
    """
    own = dict(vars(strategy))
    for cls in reversed(type(strategy).__mro__):  # class attributes, the instance's win
        own = {**{k: v for k, v in vars(cls).items() if isinstance(v, GradScaler)}, **own}
    found = {name: v for name, v in own.items() if isinstance(v, GradScaler)}
    if not found:
        for name, holder in own.items():
            if isinstance(holder, (torch.nn.Module, Tensor, torch.optim.Optimizer)) or \
                    not hasattr(holder, "__dict__") or isinstance(holder, type):
                continue
            for inner, v in vars(holder).items():
                if isinstance(v, GradScaler):
                    found[f"{name}.{inner}"] = v
    unique: dict[str, GradScaler] = {}  # one scaler reached by two names counts once
    for name, v in sorted(found.items()):
        if all(v is not w for w in unique.values()):
            unique[name] = v
    found = unique
    if len(found) > 1:
        raise ValueError(f"the strategy holds several GradScalers ({', '.join(sorted(found))}); "
                         "pass the one that scales the loss as SIPlugin(scaler=...).")
    return next(iter(found.values()), None)


def unscale_(scaler: GradScaler, optimizer: torch.optim.Optimizer,
             params: Sequence[Tensor] = ()) -> Optional[Tensor]:
    r"""Unscale `optimizer`'s gradients now (unless already done for this step) and zero
    the non-finite entries of `params`' gradients.

    Call between the backward pass and `scaler.step(optimizer)`. `scaler.step` then
    neither unscales again nor changes its decision to skip the step.

    Returns:
        `found_inf`, a float 0-d tensor on the scaler's device: 1 when `scaler.step`
        will skip this step, else 0 (no host synchronisation); None when the scaler is
        disabled (the gradients are not scaled then).
    """
    if not scaler.is_enabled():
        return None
    try:
        opt_state = scaler._per_optimizer_states[id(optimizer)]
        if opt_state["stage"] is OptState.READY:
            scaler.unscale_(optimizer)
        elif opt_state["stage"] is OptState.STEPPED:
            raise RuntimeError("avalanche_si.amp.unscale_ was called after scaler.step(); "
                               "call it between the backward pass and the step.")
        per_device = list(opt_state["found_inf_per_device"].values())
    except (AttributeError, KeyError, TypeError) as exc:  # pragma: no cover - torch changed
        raise RuntimeError(f"this torch's GradScaler ({torch.__version__}) keeps its state in "
                           f"a way avalanche_si does not know ({exc!r}); please report it.") from exc
    device = scaler._scale.device if scaler._scale is not None else None
    found_inf = sum(t.to(device, non_blocking=True) for t in per_device) if per_device else \
        torch.zeros((), device=device)
    zero_nonfinite_([p.grad for p in params if p.grad is not None])
    return found_inf


def zero_nonfinite_(grads: Sequence[Tensor]) -> None:
    """Zero the inf and NaN entries of `grads` in place (what `unscale_()` does to the
    gradients SI reads; SI's CUDA graphs do it inside their replay instead)."""
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)


def unscaled_optimizers(scaler: GradScaler) -> set[int]:
    """The ids of the optimizers whose gradients `scaler` has unscaled for the step under way
    (`scaler.unscale_(optimizer)` before `scaler.step`)."""
    return {key for key, state in getattr(scaler, "_per_optimizer_states", {}).items()
            if state.get("stage") is OptState.UNSCALED}


def stepped(scaler: GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """After `unscale_()`: whether `scaler.step(optimizer)` ran since (the step taken or
    skipped), or `scaler.update()` did. False means the loop went on to another backward pass
    without stepping: gradient accumulation."""
    state = scaler._per_optimizer_states.get(id(optimizer))
    return state is None or state["stage"] is not OptState.UNSCALED


@torch.no_grad()
def rescale_(scaler: GradScaler, optimizer: torch.optim.Optimizer,
             found_inf: Optional[Tensor], params: Sequence[Tensor] = ()) -> None:
    r"""Undo `unscale_()` for a step that did not happen (gradient accumulation): multiply
    the optimizer's gradients by the scale S again (a power of 2: exact) and mark the
    optimizer as not unscaled, so that the next backward pass adds Sg to
    Sg and the real step unscales the sum once. Where `unscale_()` zeroed
    non-finite entries of `params`' gradients (`found_inf` = 1), one NaN is put back, so
    that the scaler skips the real step as it would have without SI. No host sync."""
    grads: dict[torch.device, list[Tensor]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                grads.setdefault(p.grad.device, []).append(p.grad)
    for device, gs in grads.items():
        torch._foreach_mul_(gs, scaler._scale.to(device, non_blocking=True))
    if found_inf is not None:
        first = next((p.grad for p in params if p.grad is not None and p.grad.numel()), None)
        if first is not None:
            bad = torch.where(found_inf.to(first.device) > 0, float("nan"), 0.0)
            first[(0,) * first.dim()].add_(bad.to(first.dtype))
    scaler._per_optimizer_states.pop(id(optimizer), None)  # READY again
