r"""SIB (Benzing 2022): the *bias* part of SI's path integral alone,

    ω ← ω + (g_u − g) ⊙ Δθ,

g the task loss's gradient on the step's mini-batch and g_u on an independent one
(`record_independent_gradient()`): SI's ω is SIU's plus this. Consolidation as SI's. 4n
numbers (and g_u, n more, during the step).
"""

from __future__ import annotations

import torch

from .path import PathIntegral

__all__ = ["SIB"]


class SIB(PathIntegral):
    """ω ← ω + (g_u − g) ⊙ Δθ."""

    name = "sib"
    independent_gradient = True

    def before_step(self, grads, group, found_inf):
        """m = g_u − g, before the penalty joins g."""
        measure = group.pick(group.indep)  # this step's own copy of g_u: free to overwrite
        torch._foreach_sub_(measure, grads)  # g_u − g, before the penalty joins g
        return measure

    def after_step(self, group, measure) -> None:
        """ω ← ω + (g_u − g) ⊙ (θ − θ_pre)."""
        # (g_u − g) ⊙ (θ − θ_pre): the path integral's pass with θ and θ_pre swapped
        self.accumulate(group.pick(group.running), measure, group.pick(group.params),
                        group.pick(group.pre))
