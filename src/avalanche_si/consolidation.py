r"""When SI consolidates: after each experience, at real task boundaries, every k steps, or
on a loss plateau.

Consolidation is `Ω ← Ω + max(0, ω / ((θ - θ*)² + ξ))`, `θ* ← θ`, `ω ← 0`. On an ordinary stream
an experience is a task and consolidating after each is the paper's algorithm. On an
online stream (Avalanche's `split_online_stream`) an experience is a mini-batch or a few,
so "after each experience" is after every few samples: the penalty starts inside the first
task. The policies here decide instead:

- `"experience"`: after every experience (`AfterEachExperience`);
- `"boundary"`: at the real task boundaries of an online stream built with
  `access_task_boundaries=True` (`AtTaskBoundaries`); an error if it hides them;
- an `int` k: every k optimizer steps, across experience ends, as van de Ven's task-free
  SI does with `--update-every` (`EveryKSteps`);
- `LossPlateau`: when the training loss settles on a plateau after a peak (Aljundi,
  Kelchtermans & Tuytelaars, "Task-Free Continual Learning", CVPR 2019).

`None` (the default) is `"boundary"`: after each experience on ordinary streams, at the
task boundaries on an online stream that shows them, and an error on an online stream that
hides them, where no choice is right for every user.

Consolidating when `ω = 0` adds nothing, so consolidating twice in a row is
harmless. Consolidating often (small k) makes `(θ - θ*)²` small, and
`Ω ≈ ω / ξ`: then the damping ξ sets the scale of the
importances, and the strength c that works depends on it.

Each policy's state (step counts, the loss window) is part of the plugin's `state_dict`.
Nothing here imports Avalanche: experiences are read by duck typing.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch

__all__ = ["ConsolidationPolicy", "AfterEachExperience", "AtTaskBoundaries", "EveryKSteps",
           "LossPlateau", "make_policy", "check_policy_state", "HiddenBoundariesError"]


class HiddenBoundariesError(ValueError):
    """The stream hides the task boundaries the policy needs."""


def _boundaries(experience) -> Optional[tuple[bool, bool, Any]]:
    """`(is_first_subexp, is_last_subexp, origin id)` of an online sub-experience, or None
    for an ordinary experience. Raises `HiddenBoundariesError` if it hides them."""
    if not hasattr(type(experience), "__mro__") or not any(
            c.__name__ == "OnlineCLExperience" for c in type(experience).__mro__):
        return None
    try:
        # Avalanche 0.6.0's strategies leave experiences in logging mode, where nothing is
        # masked: the stream's own flag says whether the learner may use the boundaries
        if not getattr(experience, "access_task_boundaries", False):
            raise AttributeError("access_task_boundaries is False")
        first, last = bool(experience.is_first_subexp), bool(experience.is_last_subexp)
        origin = experience.origin_experience
    except Exception as exc:  # that, or Avalanche's MaskedAttributeError in train mode
        raise HiddenBoundariesError(
            "this online stream hides its task boundaries (access_task_boundaries=False), so SI "
            "cannot consolidate at them: choose consolidate=k (every k steps), "
            "consolidate=LossPlateau(...) or consolidate='experience'. The guide 'When SI "
            "consolidates' compares them.") from exc
    if origin is None:  # blurred streams (their flag is False anyway)
        raise HiddenBoundariesError(
            "this online stream has no task boundaries (its sub-experiences mix tasks): choose "
            "consolidate=k or consolidate=LossPlateau(...). The guide 'When SI consolidates' "
            "compares them.")
    return first, last, getattr(origin, "current_experience", id(origin))


class ConsolidationPolicy:
    """When to consolidate. The plugin calls the three methods; each returns whether to
    consolidate now. Subclass to write your own; keep its state in `state_dict()`."""

    def at_experience_start(self, experience) -> bool:
        """Called as a task (an experience) starts; `experience` is Avalanche's, or None
        in a plain loop. True: consolidate now (a task boundary seen as the next task
        starts)."""
        return False

    #: whether `at_step()` needs the step's training loss
    needs_loss = False

    def at_step(self, loss: Optional[torch.Tensor]) -> bool:
        """Called after every optimizer step SI measured; `loss` is the step's training
        loss (None where the loop gave none). True: consolidate now."""
        return False

    def at_experience_end(self, experience) -> bool:
        """Called as a task (an experience) ends. True: consolidate now."""
        return False

    def consolidated(self) -> None:
        """Told after every consolidation, whoever asked for it."""

    def state_dict(self) -> dict[str, Any]:
        """The policy's state, saved in SI's `state_dict()` (counts, windows): plain
        values."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` of this policy (checked: raise `ValueError` for
        another policy's)."""
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        # `si.consolidate()` consolidated in 0.1; since 0.2 `si.consolidate` is this policy
        raise TypeError(f"{type(self).__name__} is SI's consolidation policy (si.consolidate), "
                        "not a method: to consolidate now, call si.consolidate_now() (renamed "
                        "from consolidate() in 0.2).")


class AfterEachExperience(ConsolidationPolicy):
    """After every experience (the paper's algorithm on an ordinary stream of tasks)."""

    def at_experience_end(self, experience) -> bool:
        """Every experience's end consolidates."""
        return True


class AtTaskBoundaries(ConsolidationPolicy):
    """At the real task boundaries of an online stream; after each experience on an ordinary
    one.

    A task ends with the sub-experience marked `is_last_subexp`, or, since Avalanche
    0.6.0's `split_online_stream` marks it only when the experience size does not divide
    the task's length, when a sub-experience marked `is_first_subexp` (or of another
    origin experience) starts after training on another task: then the consolidation
    happens before training on the new task, with the weights the old one ended with.
    """

    def __init__(self) -> None:
        self.pending = False   # trained since the last consolidation, on the current task
        self.origin: Any = None

    def at_experience_start(self, experience) -> bool:
        """On an online stream, the first sub-experience of a new task consolidates what
        the last task left (a stream that ends a task without a last sub-experience)."""
        b = _boundaries(experience)
        if b is None:
            return False
        first, _, origin = b
        new_task = first or (self.origin is not None and origin != self.origin)
        self.origin = origin
        return new_task and self.pending

    def at_step(self, loss) -> bool:
        """Notes that the task trained (no consolidation per step)."""
        self.pending = True
        return False

    def at_experience_end(self, experience) -> bool:
        """An ordinary experience's end, or an online stream's last sub-experience of a
        task, consolidates."""
        b = _boundaries(experience)
        return True if b is None else (b[1] and self.pending)

    def consolidated(self) -> None:
        """Nothing is pending after a consolidation."""
        self.pending = False

    def state_dict(self):
        """Whether a task's steps wait for a consolidation, and the task they belong to."""
        return {"pending": self.pending, "origin": self.origin}

    def load_state_dict(self, state):
        """Restore `state_dict()`."""
        self.pending, self.origin = bool(state["pending"]), state["origin"]


class EveryKSteps(ConsolidationPolicy):
    """Every `k` optimizer steps, counted across experience ends (van de Ven's task-free
    SI, `--update-every k`; 100 in his code).

    Args:
        k: steps between consolidations (>= 1).
    """

    def __init__(self, k: int):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"consolidate=k must be a whole number of steps >= 1, got {k!r}.")
        self.k, self.steps = k, 0

    def at_step(self, loss) -> bool:
        """Every k-th step consolidates (counted across experience ends)."""
        self.steps += 1
        return self.steps % self.k == 0

    def state_dict(self):
        """k and the steps counted so far."""
        return {"k": self.k, "steps": self.steps}

    def load_state_dict(self, state):
        """Restore `state_dict()`; a state saved with another k is refused."""
        if state["k"] != self.k:
            raise ValueError(f"the saved policy consolidated every {state['k']} steps, this one "
                             f"every {self.k}; build the plugin with consolidate={state['k']}.")
        self.steps = int(state["steps"])

    def __repr__(self) -> str:
        return f"EveryKSteps({self.k})"


class LossPlateau(ConsolidationPolicy):
    r"""Consolidate when the training loss settles on a plateau after a peak (Aljundi,
    Kelchtermans & Tuytelaars, CVPR 2019, as in their code).

    The last `window` training losses (`strategy.loss` after each step, SI's penalty
    not included) have mean μ and variance `σ²` (over fewer losses
    until `window` have been seen). A *peak* is `μ > μ_p + σ_p`, with
    `μ_p, σ_p²` the window's statistics at the last plateau (the first one
    needs no peak). A *plateau* after a peak is `μ <` `mean_threshold` and
    `σ² <` `variance_threshold`: then SI consolidates.

    The losses stay on their device; reading the window's statistics is one host
    synchronisation, every `check_every` steps (1: every step, as in their code; more
    keeps a GPU's queue full at the price of up to that many steps of delay). Under DDP the
    window holds the losses averaged over the ranks (one all-reduce per check), so every rank
    decides alike, and as one process training on the global mini-batch would.

    Args:
        window: losses in the window (5 in their code).
        mean_threshold: the plateau's bound on μ (0.2 in their code, for their
            loss; set it for yours: about the loss a task settles at, under SI: its penalty
            keeps the task loss higher as Ω grows, and a bound read from an unregularized run
            can stop firing after a few consolidations; check `SIPlugin.consolidations`).
        variance_threshold: the plateau's bound on `σ²` (0.1 in their code; how
            much the settled loss still moves).
        check_every: steps between two checks of the window.
    """

    def __init__(self, window: int = 5, mean_threshold: float = 0.2,
                 variance_threshold: float = 0.1, *, check_every: int = 1):
        for name, v in (("window", window), ("check_every", check_every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LossPlateau({name}=...) must be a whole number >= 1, "
                                 f"got {v!r}.")
        for name, v in (("mean_threshold", mean_threshold),
                        ("variance_threshold", variance_threshold)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v <= 0:
                raise ValueError(f"LossPlateau({name}=...) must be a finite number > 0, "
                                 f"got {v!r}.")
        self.window, self.check_every = window, check_every
        self.mean_threshold, self.variance_threshold = float(mean_threshold), \
            float(variance_threshold)
        self.losses: Optional[torch.Tensor] = None  # ring buffer, on the loss's device
        self.seen = 0
        self.peak = True              # a first plateau needs no peak
        self.last_mean = self.last_var = math.inf

    needs_loss = True

    def at_step(self, loss) -> bool:
        """Adds the step's loss to the window and, every `check_every` steps,
        consolidates on a plateau after a peak (see the class)."""
        if loss is None:
            raise ValueError("LossPlateau needs the training loss: strategy.loss was not set "
                             "at this step.")
        loss = loss.detach().reshape(()).float()
        if self.losses is None or self.losses.device != loss.device:
            self.losses = torch.zeros(self.window, device=loss.device)
        self.losses[self.seen % self.window] = loss  # no host synchronisation
        self.seen += 1
        if self.seen % self.check_every:
            return False
        n = min(self.seen, self.window)
        # under DDP, the window of the losses averaged over the ranks (step by step): the
        # loss of the global mini-batch, as one process would see it
        recent = _mean_across_ranks(self.losses)[:n]
        stats = torch.stack([recent.mean(), recent.var(unbiased=False)])
        mean, var = (float(x) for x in stats.tolist())  # the one host synchronisation
        if not self.peak and mean > self.last_mean + math.sqrt(self.last_var):
            self.peak = True
        if self.peak and mean < self.mean_threshold and var < self.variance_threshold:
            self.peak, self.last_mean, self.last_var = False, mean, var
            return True
        return False

    def state_dict(self):
        """The window of losses and the statistics of the last plateau."""
        return {"window": self.window, "seen": self.seen, "peak": self.peak,
                "last_mean": self.last_mean, "last_var": self.last_var,
                "losses": None if self.losses is None else self.losses.detach().cpu().clone()}

    def load_state_dict(self, state):
        """Restore `state_dict()`; a state saved with another window is refused."""
        if state["window"] != self.window:
            raise ValueError(f"the saved LossPlateau had window={state['window']}, this one "
                             f"{self.window}.")
        self.seen, self.peak = int(state["seen"]), bool(state["peak"])
        self.last_mean, self.last_var = float(state["last_mean"]), float(state["last_var"])
        self.losses = None if state["losses"] is None else state["losses"].clone()

    def __repr__(self) -> str:
        return (f"LossPlateau(window={self.window}, mean_threshold={self.mean_threshold:g}, "
                f"variance_threshold={self.variance_threshold:g}, "
                f"check_every={self.check_every})")


def _mean_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """Under `torch.distributed`, every rank must decide alike: the ranks' average of
    `t` (`t` itself otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = t.clone()
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return t


def check_policy_state(policy: ConsolidationPolicy, saved: Optional[dict],
                       who: str) -> Optional[dict]:
    """`saved`, a policy's entry of a saved state, if `policy` can load it (None: a state saved
    before policies were)."""
    if saved is not None and saved["type"] != type(policy).__name__:
        raise ValueError(f"{who} state was saved with consolidation policy {saved['type']}, "
                         f"this one has {type(policy).__name__}; build it with the same "
                         "consolidate= option.")
    return saved


def make_policy(value: Union[None, str, int, ConsolidationPolicy]) -> ConsolidationPolicy:
    """The policy an option value names (see the module's docstring)."""
    if value is None:  # after each ordinary experience; at the boundaries of an online stream
        return AtTaskBoundaries()
    if isinstance(value, ConsolidationPolicy):
        return value
    if value == "experience":
        return AfterEachExperience()
    if value == "boundary":
        return AtTaskBoundaries()
    if isinstance(value, int) and not isinstance(value, bool):
        return EveryKSteps(value)
    raise ValueError(f"consolidate must be None (the default), 'experience', 'boundary', a "
                     f"number of steps k >= 1, a LossPlateau(...) or another ConsolidationPolicy, "
                     f"got {value!r}.")
