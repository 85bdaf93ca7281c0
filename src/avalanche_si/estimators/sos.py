r"""SOS (Benzing 2022): the square root of the gradient's second moment, no path integral,

    v ← β v + (1 − β) (g − α g_u)²   after each step,   Ω ← Ω + √v   at consolidation,

g the task loss's gradient on the step's mini-batch (without SI's penalty), β = 0.999, and
v starting at 0 after each consolidation, not bias-corrected, as in his code
(`worker_SI.py`). With α = 0 (the default, `importance="sos"`: his reported runs at batch
256) it needs nothing but g. With α ≠ 0 it also needs g_u, the task loss's gradient on an
independent mini-batch (`record_independent_gradient()`): his batch-2048 searches
(`param_grid6` of his MNIST and CIFAR `searcher_SI.py`) set α = 1, the second moment of
g − g_u, the mini-batch noise alone. Not divided by the path length: `eps` and
`restart_path()` do not apply. 3n numbers (with α ≠ 0, g_u and g − α g_u, 2n more, during
the step).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..functional import SOS_DECAY, accumulate_squares, sqrt_contribution
from ..options import as_number
from .base import Estimator

__all__ = ["SOS"]


class SOS(Estimator):
    r"""v ← β v + (1 − β)(g − α g_u)²; Ω += √v at consolidation.

    Args:
        alpha: α, how much of the independent gradient g_u is taken off g: 0 (default) uses
            g alone and needs no second mini-batch; 1 is Benzing's batch-2048 setting.
        decay: β, the decay of the running average, in [0, 1).
    """

    name = "sos"
    weights_before_step = False
    path_length = False

    def __init__(self, *, alpha: float = 0.0, decay: float = SOS_DECAY):
        a, b = as_number(alpha), as_number(decay)
        if a is None or not math.isfinite(a):
            raise ValueError(f"SOS(alpha=...) must be a finite number, got {alpha!r}.")
        if b is None or not math.isfinite(b) or not 0.0 <= b < 1.0:
            raise ValueError(f"SOS(decay=...) must be a number in [0, 1), got {decay!r}.")
        self.alpha, self.decay = a, b

    @property
    def independent_gradient(self) -> bool:  # type: ignore[override]
        """Whether an independent gradient g_u is needed: when α ≠ 0."""
        return self.alpha != 0.0

    def before_step(self, grads, group, found_inf) -> None:
        """v ← β v + (1 − β)(g − α g_u)² (unchanged for a step the scaler skips)."""
        if self.alpha != 0.0:  # g − α g_u
            g = torch._foreach_mul(group.pick(group.indep), -self.alpha)
            torch._foreach_add_(g, grads)
            grads = g
        accumulate_squares(group.pick(group.running), grads, decay=self.decay,
                           weight=None if found_inf is None else 1.0 - found_inf)

    def after_step(self, group: Any, measure: None) -> None:
        """Nothing: SOS needs no weights after the step."""

    def contribution(self, running, params, start, *, eps: float):
        """√v (ξ and the path are not used)."""
        return sqrt_contribution(running)

    def options(self) -> dict:
        """α and β, for `repr()` and `state_dict()`."""
        return {"alpha": self.alpha, "decay": self.decay}
