r"""SOS (Benzing 2022): the square root of the gradient's second moment, no path integral,

    v ← β v + (1 − β) g²   after each step,   Ω ← Ω + √v   at consolidation,

g the task loss's gradient on the step's mini-batch (without SI's penalty), β = 0.999, and
v starting at 0 after each consolidation, not bias-corrected, as in his code
(`worker_SI.py`). Not divided by the path length: `eps` and `restart_path()` do not apply.
3n numbers.
"""

from __future__ import annotations

import math
from typing import Any

from ..functional import SOS_DECAY, accumulate_squares, sqrt_contribution
from ..options import as_number
from .base import Estimator

__all__ = ["SOS"]


class SOS(Estimator):
    r"""v ← β v + (1 − β) g²; Ω += √v at consolidation.

    Args:
        decay: β, the decay of the running average, in [0, 1).
    """

    name = "sos"
    weights_before_step = False
    path_length = False

    def __init__(self, *, decay: float = SOS_DECAY):
        b = as_number(decay)
        if b is None or not math.isfinite(b) or not 0.0 <= b < 1.0:
            raise ValueError(f"SOS(decay=...) must be a number in [0, 1), got {decay!r}.")
        self.decay = b

    def before_step(self, grads, group, found_inf) -> None:
        accumulate_squares(group.pick(group.running), grads, decay=self.decay,
                           weight=None if found_inf is None else 1.0 - found_inf)

    def after_step(self, group: Any, measure: None) -> None:
        pass

    def contribution(self, running, params, start, *, eps: float):
        return sqrt_contribution(running)

    def options(self) -> dict:
        return {"decay": self.decay}
