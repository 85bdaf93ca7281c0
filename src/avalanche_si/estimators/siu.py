r"""SIU (Benzing 2022, "Unifying Importance Based Regularisation Methods for Continual
Learning"): SI's path integral measured with an *unbiased* gradient,

    ω ← ω − g_u ⊙ Δθ,

g_u the task loss's gradient on a mini-batch drawn independently of the step's (the same
size, the same task), at the weights before the step (`record_independent_gradient()`).
Consolidation as SI's. 4n numbers (and g_u, n more, during the step).
"""

from __future__ import annotations

from .path import PathIntegral

__all__ = ["SIU"]


class SIU(PathIntegral):
    """ω ← ω − g_u ⊙ Δθ, g_u from an independent mini-batch."""

    name = "siu"
    independent_gradient = True

    def before_step(self, grads, group, found_inf):
        """m = g_u, so that the path integral adds −g_u ⊙ Δθ."""
        return group.pick(group.indep)
