r"""OnAF (Benzing 2022): the online absolute Fisher, the gradient's magnitude summed along the
path,

    a ← a + |g|   after each step,   Ω ← Ω + a   at consolidation,

g the task loss's gradient on the step's mini-batch (without SI's penalty), a starting at 0
after each consolidation: his `contributions_OnAF` (`CIFAR/summed_importances.py`), which
his code sums over a task to set beside SI's ω (his paper's Figure 1, where the two track
each other under Adam). No path integral and no division by the path length: `eps` and
`restart_path()` do not apply, and a step a GradScaler skips adds nothing. 3n numbers.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Estimator

__all__ = ["OnAF"]


class OnAF(Estimator):
    """a ← a + |g| per step; Ω += a at consolidation."""

    name = "onaf"
    weights_before_step = False
    path_length = False

    def before_step(self, grads, group, found_inf) -> None:
        """a ← a + |g| (nothing for a step the scaler skips)."""
        size = torch._foreach_abs(grads)
        if found_inf is not None:  # 0 for a step the scaler skips (no host sync)
            torch._foreach_mul_(size, 1.0 - found_inf)
        torch._foreach_add_(group.pick(group.running), size)

    def after_step(self, group: Any, measure: None) -> None:
        """Nothing: OnAF needs no weights after the step."""

    def contribution(self, running, params, start, *, eps: float):
        """a itself."""
        return [r.clone() for r in running]  # the sum itself (running is reset afterwards)
