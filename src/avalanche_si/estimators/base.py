r"""The interface every importance estimator implements.

An estimator says how SI measures the importance of each weight during a period (a task, or
the steps between two consolidations) and what it adds to Ω when the period is consolidated.
The step code (`avalanche_si.step`) never asks which estimator it serves: it reads what the
estimator *needs* from the attributes below and calls its three methods.

What it needs, per optimizer step (class or instance attributes):

- `task_gradient`: ω multiplies the step by the gradient as `before_step()` finds it (the
  task loss's g, without SI's penalty), so that gradient must survive the optimizer step
  untouched; the step code gives the optimizer other tensors, `g' = g + 2cΩ(θ − θ*)`.
  Without it, the gradient the estimator sees at `before_step()` is the same g, but only
  until the penalty is added to it in place.
- `independent_gradient`: g_u, the task loss's gradient on a second, independent mini-batch,
  handed over by `record_independent_gradient()` before each step.
- `predicted_step`: the step the optimizer *would* take, predicted from its state before it
  steps (the estimator gets the optimizer in `prepare()`).
- `weights_before_step`: θ_pre, the weights just before the step (n numbers kept in SI's state),
  so that the step taken, θ − θ_pre, can be measured after it.
- `path_length`: the consolidation divides by the squared path length (θ − θ_start)² + ξ;
  then `eps` is used and `restart_path()` keeps a start. Otherwise neither.
- `accumulates`: a step may be carried over gradient accumulation (`before_step()` after
  each of k backward passes, the optimizer stepping after the last).
- `graphable`: its step work may be captured as a CUDA graph (`cuda_graphs=True`).

What it does: `before_step()` (before the penalty joins the gradient; returns what it will
need after the step, its *measure*), `after_step()` (the optimizer stepped: fold the measure
into ω) and `contribution()` (at consolidation: what the period adds to Ω, before the clamp).
What it keeps: `memory`, numbers per regularized weight between steps.

Nothing here imports a training framework.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["Estimator"]


class Estimator:
    r"""How SI measures importance (see the module's docstring for what each attribute means).

    A subclass sets `name` and the attributes it needs, and implements `before_step()`,
    `after_step()` and `contribution()`. Pass an instance as `importance=`, or register it by
    name in `avalanche_si.estimators.ESTIMATORS`. It must be picklable (Avalanche checkpoints
    pickle SI) and hold no per-step state of its own: whatever one step needs after the optimizer
    step is the measure `before_step()` returns.
    """

    #: the `importance=` string that names it
    name: str = ""
    task_gradient: bool = False
    independent_gradient: bool = False
    predicted_step: bool = False
    weights_before_step: bool = True
    path_length: bool = True
    accumulates: bool = False
    graphable: bool = False

    @property
    def memory(self) -> int:
        """Numbers per regularized weight kept between steps: Ω, θ*, the running measure
        (ω, or what the estimator accumulates instead) and, if needed, θ_pre; `"task"` adds
        the gradient the optimizer steps with (reused from step to step)."""
        return 3 + int(self.weights_before_step) + int(self.task_gradient)

    def prepare(self, optimizer: Optional[torch.optim.Optimizer],
                params: Sequence[Tensor]) -> Any:
        """A group's helper, built when SI (re)builds its per-step lists (at most once per
        task in practice), handed back as `group.helper`. Raise `ValueError` here when the
        estimator cannot serve this optimizer."""
        return None

    def before_step(self, grads: list[Tensor], group: Any,
                    found_inf: Optional[Tensor]) -> Any:
        r"""Called once per optimizer step, before the penalty joins the gradient.

        Args:
            grads: g, the gradients of the group's parameters that take part in this step
                (`group.pick(...)` selects the matching entries of its other lists).
            group: the group's lists: `running` (ω), `params` (θ), `pre` (θ_pre, written
                after this call), `indep` (g_u), `helper` (`prepare()`'s), `step_idx`.
            found_inf: None, or a 0-d tensor, 1 when a GradScaler skips this step and 0 when
                it takes it (no host sync: weigh by `1 − found_inf`).

        Returns:
            The measure `after_step()` gets (None: nothing to do after the step). With
            `task_gradient`, return `grads`: the step code keeps them (or an exact copy)
            untouched until then.
        """
        raise NotImplementedError

    def after_step(self, group: Any, measure: Any) -> None:
        """The optimizer stepped: fold this step's `measure` into ω (`group.running`)."""
        raise NotImplementedError

    def check_step(self, group: Any, measure: Any) -> None:
        """After the optimizer step and before any group's `after_step()`: raise if the step
        taken is not the one measured (nothing has changed yet)."""

    def contribution(self, running: Sequence[Tensor], params: Sequence[Tensor],
                     start: Sequence[Tensor], *, eps: float) -> list[Tensor]:
        r"""What the period adds to Ω, before the clamp (new tensors: `running` is reset
        after the consolidation is stored).

        Args:
            running: the measure accumulated over the period (ω).
            params: θ now.
            start: where the period's path began (θ*, or a `restart_path()` start).
            eps: the group's damping ξ.
        """
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The estimator's own settings, for `repr()` and `state_dict()`."""
        return {}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.options() == self.options()

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.options().items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args})"
