r"""One SI group at run time: its options and the per-step lists the step code works on.

The lists (the group's parameters and, position for position, their Ω, θ*, ω and θ before
the step, views of the buffers in `avalanche_si.state`) are built by the binding
(`avalanche_si.binding`) when the model or the optimizer changes, at most once per task in
practice, and read by the step code (`avalanche_si.step`) at every step without any name
matching. Nothing here imports a training framework.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from . import graphs as _graphs
from .groups import matches
from .sharding import global_like

__all__ = ["GroupLists"]


class GroupLists:
    """One group's configuration and its per-step lists."""

    graphs: Optional[_graphs.StepGraphs] = None  # groups pickled by earlier versions lack them
    step_key: Optional[_graphs.Addresses] = None
    task_grads: Optional[list[Tensor]] = None
    step_kept = False

    def __init__(self, key: Optional[str], matcher, si_lambda, eps: Optional[float]):
        self.key = key                    # None: the default group (buffer names without _name)
        self.matcher = matcher
        self.si_lambda = si_lambda        # None: the engine's
        self.eps = eps                    # None: the engine's
        self.c = 0.0                      # the strength in use (resolved per consolidation)
        self.clear_lists()

    def clear_lists(self) -> None:
        self.names: list[str] = []
        #: the model's parameters, and what SI's arithmetic reads as θ: the same objects, or on
        #: a sharded model (FSDP2) each parameter's local shard (`avalanche_si.sharding`)
        self.owners: list[torch.nn.Parameter] = []
        self.params: list[Tensor] = []
        self.sharded = False
        self.omega: list[Tensor] = []
        self.prev: list[Tensor] = []
        self.running: list[Tensor] = []
        self.pre: list[Tensor] = []
        self.helper: Any = None           # the estimator's (a StepPredictor for delta_params)
        self.step_idx: Optional[list[int]] = None  # the parameters with a gradient this step
        #: what the estimator's before_step() returned for the step in flight (None: none)
        self.measure: Any = None
        self.indep: Optional[list[Tensor]] = None  # g_u, for estimators that need it
        # "task": the tensors the next step's gradient for the optimizer is written into (the
        # task gradient tensors of the last step, free once ω has them), so that no step
        # allocates them
        self.spare: Optional[list[Tensor]] = None
        self.spare_idx: Optional[list[int]] = None  # the step_idx of the step they served
        self.value: Optional[Callable[[], Tensor]] = None  # the last step's penalty value...
        self.penalty: Optional[Tensor] = None              # ... computed when first read
        # cuda_graphs: the group's captured step work (dropped with the lists it was captured
        # on), and the addresses of the step in flight (None: not graphed)
        self.graphs = None
        self.step_key = None
        # graphed "task": SI's own tensors (one per parameter, allocated at the first step and
        # kept with the graphs) that each step's task gradient is copied into, so that .grad
        # keeps its tensors (the optimizer's gradient is g' in place, as with "total")
        self.task_grads = None
        self.step_kept = False            # the step in flight used them

    def emptied(self) -> "GroupLists":
        """A copy with the configuration and no lists (what a pickle keeps)."""
        new = GroupLists.__new__(GroupLists)
        new.__dict__.update(self.__dict__)
        new.clear_lists()
        return new

    def penalty_value(self) -> Optional[Tensor]:
        """The group's penalty at the last step, computed on first read (training does not
        pay for it), or None when the step added none."""
        if self.value is not None and self.penalty is None:
            self.penalty = self.value()
        return self.penalty if self.value is not None else None

    def tensors(self) -> list[Tensor]:
        """Every tensor of the per-step lists: what the group's graphs were captured on."""
        return [*self.params, *self.omega, *self.prev, *self.running, *self.pre]

    def globalize(self, name: str, t: Tensor) -> Tensor:
        """`t`, state kept for parameter `name` (its local shard on a sharded model), as a
        tensor laid out like the parameter (a DTensor there; `t` itself otherwise)."""
        if self.sharded and name in self.names:
            return global_like(t, self.owners[self.names.index(name)])
        return t

    def grads(self) -> list:
        """The gradients of the parameters that take part in this step, as SI's arithmetic
        reads them (local shards on a sharded model)."""
        grads = [p.grad for p in self.pick(self.owners)]
        return [gr._local_tensor for gr in grads] if self.sharded else grads

    def pick(self, values: list) -> list:
        """The entries of a per-parameter list for the parameters that take part in this step."""
        return values if self.step_idx is None else [values[k] for k in self.step_idx]

    def covers(self, name: str, param: torch.nn.Parameter) -> bool:
        if callable(self.matcher):
            return bool(self.matcher(name, param))
        return matches(name, self.matcher)

    @property
    def label(self) -> str:
        return "default" if self.key is None else repr(self.key)

    def __setstate__(self, state: dict) -> None:
        # groups pickled by avalanche_si 0.2 and 0.3 (their lists are empty): today's fields
        self.__dict__.update({k: v for k, v in state.items() if k not in _OLD_LISTS})
        self.clear_lists()


#: per-step fields of the groups of avalanche_si 0.2 and 0.3 that today's do not have
_OLD_LISTS = ("predictor", "step_grads", "step_swap", "pending_delta")
