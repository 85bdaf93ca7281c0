r"""`delta_params`: the task gradient times the step the optimizer *would* take from it alone,

    ω ← ω − g ⊙ Δθ̂,   Δθ̂ = the optimizer's update rule applied to g, from its state now,

predicted before the step (`avalanche_si.optim_step`: SGD, Adam, AdamW, RMSprop), so that
neither SI's penalty nor anything else added to the gradient counts, and no copy of the
weights is kept: 3n numbers between steps (g ⊙ Δθ̂, n more, during the step). The prediction
holds only if the optimizer steps with the learning rate it predicted with: a change between
`before_step()` and the step is refused after the step. Consolidation as SI's.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..optim_step import StepPredictor, check_optimizer_supported
from .path import PathIntegral

__all__ = ["DeltaParams"]


class _Predicted:
    """One step's g ⊙ Δθ̂, and the learning rates it was predicted with."""

    __slots__ = ("products", "lrs")

    def __init__(self, products: list[Tensor], lrs: list):
        self.products, self.lrs = products, lrs


class DeltaParams(PathIntegral):
    """ω ← ω − g ⊙ Δθ̂, Δθ̂ the optimizer's predicted step from the task gradient g."""

    name = "delta_params"
    predicted_step = True
    weights_before_step = False

    @property
    def memory(self) -> int:
        """3 numbers per weight: no copy of θ before the step."""
        return 3

    def prepare(self, optimizer: Optional[torch.optim.Optimizer],
                params: Sequence[Tensor]) -> Optional[StepPredictor]:
        """A predictor of the optimizer's next step (SGD, Adam, AdamW and their options)."""
        if optimizer is None:
            raise ValueError("importance='delta_params' predicts the optimizer's steps: bind "
                             "SI to the optimizer too, bind(model, optimizer).")
        check_optimizer_supported(optimizer)
        return StepPredictor(optimizer, params) if params else None

    def before_step(self, grads, group, found_inf) -> _Predicted:
        """g ⊙ Δθ̂, with the learning rates it was predicted with (0 for a skipped step)."""
        predictor = group.helper
        delta = predictor.predict(grads, mask=group.step_idx)
        # what it predicted with, checked after the step (a scheduler or plugin that changes
        # the learning rate in between makes the prediction wrong)
        lrs = [(slot.group, slot.group["lr"]) for slot in predictor.slots]
        if found_inf is not None:  # a step the scaler skips moves nothing
            torch._foreach_mul_(delta, 1.0 - found_inf)
        # g·Δθ̂, taken from ω after the step, so that a consolidation between here and the
        # step leaves it to the next period
        torch._foreach_mul_(delta, grads)
        return _Predicted(delta, lrs)

    def check_step(self, group: Any, measure: _Predicted) -> None:
        """Refuses a step whose learning rate changed after the prediction."""
        for opt_group, lr in measure.lrs:
            now = opt_group["lr"]
            if now is not lr and not (isinstance(now, float) and now == lr):
                raise RuntimeError(
                    f"importance='delta_params' predicted this step with lr={lr!r}, but the "
                    f"optimizer stepped with lr={now!r}: something changed it between "
                    "before_step() and the step. Change the learning rate after the step "
                    "(a scheduler steps after optimizer.step()), or use importance='task'.")

    def after_step(self, group: Any, measure: _Predicted) -> None:
        """ω ← ω − g ⊙ Δθ̂."""
        torch._foreach_sub_(group.pick(group.running), measure.products)  # ω −= g·Δθ̂
