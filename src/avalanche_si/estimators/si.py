r"""SI's own estimators (Zenke, Poole & Ganguli 2017): ω ← ω − g ⊙ Δθ along the steps taken.

- `Total` (`importance="total"`, the default): g is the gradient the optimizer stepped with,
  the task loss's, SI's penalty and anything else added to `.grad` before the step (clipping
  after `before_step()` aside). 4n numbers.
- `Task` (`importance="task"`, Zenke et al.'s code): g is the gradient as `before_step()`
  finds it, the task loss's without SI's penalty. The optimizer steps on other tensors,
  `g + 2cΩ(θ − θ*)`, reused from step to step: 5n numbers.

Both carry a step over gradient accumulation and may be captured as CUDA graphs.
"""

from __future__ import annotations

from .path import PathIntegral

__all__ = ["Total", "Task"]


class Total(PathIntegral):
    """ω ← ω − g' ⊙ Δθ, g' the gradient the optimizer used (SI's penalty included)."""

    name = "total"
    accumulates = True
    graphable = True

    def before_step(self, grads, group, found_inf):
        """m = g' (the tensors the penalty is then added to in place)."""
        # g gets the penalty in place after this call: ω reads the g' the optimizer steps with
        return grads


class Task(Total):
    """ω ← ω − g ⊙ Δθ, g the task loss's gradient (without SI's penalty)."""

    name = "task"
    task_gradient = True
