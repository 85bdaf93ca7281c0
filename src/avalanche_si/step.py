r"""The per-step work around the optimizer step, for any importance estimator.

Per group and optimizer step, with g the gradients, θ the weights, θ* their value at the last
consolidation and c the group's strength:

- `Stepper.before()`, after the (last) backward pass: unscale with a GradScaler; hand g to
  the estimator (`avalanche_si.estimators`) before anything is added to it; add the penalty's
  gradient `2cΩ ⊙ (θ − θ*)` and keep θ_pre ← θ in one pass (`functional.penalty_step`, the
  fused C kernel on CPU float32) or one CUDA-graph replay (`graphs`). An estimator that
  measures with the task gradient (`task_gradient`) gets it kept apart: eagerly the optimizer
  steps on other tensors (the last step's, reused), under a graph g is copied into SI's own.
- `Stepper.after()`, after the optimizer step: whether an optimizer holding SI's parameters
  stepped at all (`avalanche_si.observe`; gradient accumulation if not: the step is carried to
  the next backward pass, for estimators that allow it), then the estimator folds the step
  into ω.

No step synchronises with the device: whether a GradScaler skipped the step stays a 0-d tensor
(`found_inf`), folded into the arithmetic. Nothing here imports a training framework.
"""

from __future__ import annotations

import operator
import warnings
from itertools import repeat
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from . import amp
from . import graphs as _graphs
from .functional import deferred_penalty_value, penalty_step
from .observe import Watch
from .options import OptionTypeError

__all__ = ["Stepper", "independent_gradients"]

_REQUIRES_GRAD = operator.attrgetter("requires_grad")

def _spare_for(g, grads: list[Tensor]) -> Optional[list[Tensor]]:
    """The group's spare tensors if they can take this step's gradients, else None (they are
    dropped). They are the gradients of the last step's parameters (`g.spare_idx`), so they
    fit those of a step over the same ones; they must share no memory with a gradient: DDP,
    for one, hands out gradients that are views of one bucket, the same memory every step."""
    spare, g.spare = g.spare, None
    if spare is None or g.spare_idx != g.step_idx or len(spare) != len(grads):
        return None
    if any(t._base is not None for t in spare) or any(t._base is not None for t in grads):
        used = {t.untyped_storage().data_ptr() for t in grads}
        if any(t.untyped_storage().data_ptr() in used for t in spare):
            return None
    else:  # tensors that are no views share memory only by being the same tensor
        used = {id(t) for t in grads}
        if any(id(t) in used for t in spare):
            return None
    return spare


class _StepWork:
    """What `before()` does to one group's tensors, eagerly or under a CUDA graph's
    capture: with the penalty on, `g' = g + 2cΩ(θ - θ*)` (into `.grad`, or into the spare
    tensors for a task-gradient estimator) and `θ_pre ← θ`; with it off, the copies alone;
    first, with `zero`, the gradients' non-finite entries are zeroed (a scaler's step; see
    `amp.unscale_()`). Returns the penalty's value function (None with the penalty off)."""

    __slots__ = ("c", "penalize", "zero", "keep")

    def __init__(self, c: float, penalize: bool, zero: bool, keep: bool = False):
        self.c, self.penalize, self.zero, self.keep = c, penalize, zero, keep

    def __call__(self, grads, omega, params, prev, pre, spare) -> Optional[Callable[[], Tensor]]:
        if self.zero:
            amp.zero_nonfinite_(grads)
        if self.keep:  # graphed task gradient: copied into SI's own tensors, the penalty
            torch._foreach_copy_(spare, grads)  # added in .grad (the same bits as writing g'
            spare = None                        # into spare tensors)
        if self.penalize:
            return penalty_step(grads, omega, params, prev, strength=self.c, pre=pre,
                                in_place=spare is None, out=spare)[1]
        if pre is not None:
            torch._foreach_copy_(pre, params)  # no_grad: no detach needed
        if spare is not None:  # as above, so that ω never sees what is done to .grad later
            torch._foreach_copy_(spare, grads)
        return None


class Stepper:
    """The step in flight and the counts of steps, for one engine and its estimator.

    `in_step`: `before()` ran and `after()` has not; `accumulating`: the optimizer did not
    step after the last backward pass; `steps_since`: optimizer steps since the last
    consolidation; `task_steps`: the loop's `after()` calls since the task started.
    """

    def __init__(self, estimator: Any, cuda_graphs: bool):
        self.estimator = estimator
        self.cuda_graphs = cuda_graphs
        self.steps_since = 0
        self.watch = Watch()  # which optimizer steps SI's parameters (avalanche_si.observe)
        self.start_task()

    def start_task(self) -> None:
        self.task_steps = 0
        self.in_step = self.accumulating = False
        self.watch.restart()
        #: the scaler before() unscaled with, and what it found (inf/NaN: 1); the ids of the
        #: optimizers whose gradients were unscaled for the step
        self.unscaled_by: Optional[torch.amp.GradScaler] = None
        self.found_inf: Optional[Tensor] = None
        self.unscaled_ids: set = set()

    def __getstate__(self) -> dict[str, Any]:
        # a step in flight is not part of the state
        return dict(self.__dict__, in_step=False, unscaled_by=None, found_inf=None)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("watch", Watch())
        self.__dict__.pop("steps_before", None)

    @staticmethod
    def pending(groups: Sequence[Any]) -> bool:
        """A step whose weights before it SI holds waits for `after()` (or, accumulating, for
        the real optimizer step): its path starts in the period it will be measured in."""
        return any(g.measure is not None and g.pre for g in groups)

    def check_period_not_begun(self, groups: Sequence[Any], call: str) -> None:
        """Refuse `call` once this period's training began (an optimizer step, or a backward
        pass waiting for one, since the last consolidation)."""
        if self.in_step or self.accumulating or self.steps_since or self.pending(groups):
            raise RuntimeError(
                f"{call} after this period's training began: ω already holds steps of a path "
                "that started at θ*. Call it after the consolidation and before the first step "
                "(at a task's start); nothing was changed.")

    def enter(self, who: str, between: str) -> None:
        """`before()` is about to run: refuse a second one without `after()` in between."""
        if self.in_step:
            self.in_step = False
            self.watch.close()  # the refused step is dropped; the loop may go on
            raise RuntimeError(
                f"{who}: before_step() was called twice without after_step() in between "
                f"({between}), so the step in between would be counted wrongly. Call "
                "after_step() after every optimizer step (and after every before_step()).")

    # ------------------------------------------------------------------ before the step

    def check_no_step_outside(self, call: str) -> None:
        """Refuse an optimizer step of SI's parameters taken since the last `after_step()` (in
        this task): SI measured none of it."""
        if self.watch.stepped_after_close():
            self.watch.restart()
            self.accumulating = False
            raise RuntimeError(
                f"{call}: an optimizer stepped SI's parameters after the last after_step(), "
                "outside before_step() and after_step(), so SI measured nothing of that step ("
                "after_step() called before optimizer.step(), or a step of its own, such as "
                "a last step for gradients left over). Call before_step() and after_step() "
                "around every optimizer step of a task.")

    def check_task_end(self, who: str) -> None:
        """At `end_task()`: refuse a step outside SI's calls; warn of gradients accumulated
        for a step that has not happened (they join the next task's first step)."""
        self.check_no_step_outside("end_task()")
        if self.accumulating:
            warnings.warn(
                f"{who}: the task ends while gradients accumulate for an optimizer step that "
                "has not happened (a last micro-batch not stepped): unless you zero them, they "
                "join the next task's first step. Step or zero the gradients before "
                "end_task().", stacklevel=4)

    def before(self, groups: Sequence[Any], binding: Any,
               scaler: Optional[torch.amp.GradScaler], consolidated: dict) -> None:
        est = self.estimator
        self.check_no_step_outside("before_step()")
        found_inf = None
        # to see after the step whether the optimizer stepped (gradient accumulation if not):
        # the optimizer steps observed, or with a scaler (which may skip the step) its record
        self.unscaled_by = None
        if scaler is not None:  # a graphed group zeroes non-finite entries in its replay
            if binding.inner is None:
                raise ValueError("SI was given a GradScaler but no optimizer: it unscales the "
                                 "optimizer's gradients, so bind(model, optimizer) too.")
            # the optimizers whose gradients are unscaled for this step: SI's, and those the
            # loop unscaled itself (`scaler.unscale_(other)` before before_step())
            self.unscaled_ids = amp.unscaled_optimizers(scaler) | {id(binding.inner)}
            found_inf = amp.unscale_(scaler, binding.inner,
                                     [p for g in groups if g.graphs is None for p in g.params])
            if found_inf is not None:
                self.unscaled_by, self.found_inf = scaler, found_inf
        if est.independent_gradient and any(g.params and g.indep is None for g in groups):
            raise RuntimeError(
                f"importance={est.name!r} measures each step with the gradient of an "
                "independent mini-batch: call record_independent_gradient(loss) before "
                "before_step(), once per optimizer step.")
        entries = []
        for g in groups:
            if g.params:
                params, handed = self._before_group(g, found_inf, consolidated[g.key])
                if params:  # what the step is to use, checked when an optimizer steps
                    entries.append((params, handed, handed[0]._version, params[0]._version,
                                    params[0].data_ptr()))
            g.indep = None  # used: the next step needs its own
        if not entries and any(g.params for g in groups) and binding.model is not None and \
                not any(p.grad is not None for p in binding.model.parameters()):
            raise RuntimeError(
                "before_step() found no gradient at all: call it after loss.backward() (and "
                "before the optimizer step), once per optimizer step.")
        self.in_step = True
        self.watch.open(entries)

    def _before_group(self, g, found_inf: Optional[Tensor], consolidated: bool) -> tuple:
        """One group's step work; returns its parameters in the step (none: no gradient) and
        the gradient tensors the optimizer is to step them with."""
        est = self.estimator
        owners = g.owners
        grads = [p.grad for p in owners]
        idx = None
        if any(map(operator.is_, grads, repeat(None))) or \
                not all(map(_REQUIRES_GRAD, owners)):
            # Parameters without a gradient this step (another task's head), or frozen since
            # the lists were built, are skipped: the optimizer does not move them, so neither
            # their importance nor their penalty changes, and giving them a gradient would let
            # a stateful optimizer move them on old momentum.
            idx = [k for k, (gr, p) in enumerate(zip(grads, owners))
                   if gr is not None and p.requires_grad]
            grads = [grads[k] for k in idx]
        zero = found_inf is not None and g.graphs is not None  # unscale_() left it to us
        g.step_idx, g.measure, g.value, g.penalty = idx, None, None, None
        g.step_key, g.step_kept = None, False
        if not grads:
            return [], []
        handed = grads  # what the optimizer is to step with, as the model holds it
        if g.sharded:  # SI's arithmetic on the local shards, in place
            grads = [gr._local_tensor for gr in grads]
        params = g.pick(g.params)
        # The weights before the step are recorded here, in the pass that reads them for
        # the penalty anyway (the optimizer step is what follows; anything else that changes
        # the weights before it is refused when the optimizer steps: avalanche_si.observe).
        pre = g.pick(g.pre) if g.pre else None
        measure = est.before_step(grads, g, found_inf)  # before the penalty joins g
        graphed = g.graphs is not None and pre is not None
        # A task-gradient estimator's g is kept for ω apart from the optimizer's g'. Eagerly
        # the optimizer gets other gradient tensors (the spare ones, reused from step to step)
        # with the penalty added, and g stays where the estimator holds it; graphed, g is
        # copied into SI's own tensors and .grad gets the penalty in place (no per-tensor swap
        # of .grad on the host, and no addresses that change per step)
        spare = None
        # (a sharded model's .grad cannot be swapped for other tensors: as under a graph, the
        # task gradient is copied into SI's own and .grad gets the penalty in place)
        g.step_kept = keep = (graphed or g.sharded) and est.task_gradient
        if keep:
            if g.task_grads is None:
                g.task_grads = [torch.empty_like(p) for p in g.params]
            spare = measure = g.pick(g.task_grads)
        elif est.task_gradient:
            spare = _spare_for(g, grads)
            if spare is None:
                spare = [torch.empty_like(gr) for gr in grads]
        penalize = consolidated and g.c != 0.0
        omega, prev = g.pick(g.omega), g.pick(g.prev)
        lists = (grads, omega, params, prev, pre, spare)
        work = _StepWork(g.c, penalize, zero, keep)
        if graphed:
            # what a graph bakes in and may change between steps (SI's own tensors change
            # only with the lists, which drops the graphs); the weights' addresses also say
            # which parameters take part
            g.step_key = g.graphs.addresses(params, grads)
            g.graphs.run((penalize, g.c, zero, g.step_key), work, *lists)
            g.value = deferred_penalty_value(omega, pre, prev, strength=g.c) \
                if penalize else None
        else:
            g.value = work(*lists)
        if spare is not None and not keep:
            for p, t in zip(params, spare):
                p.grad = t
            handed = spare
        g.measure = measure
        return g.pick(owners), handed

    # ------------------------------------------------------------------ after the step

    def after(self, groups: Sequence[Any], binding: Any,
              scaler: Optional[torch.amp.GradScaler], who: str) -> bool:
        """The loop's `after_step()`: True when an optimizer stepped SI's parameters and the
        step was measured, False when none did (gradient accumulation: the step is carried
        over).

        Raises:
            RuntimeError: a GradScaler SI was not given stepped them, or (with a scaler, or
                an estimator that predicts the step) another optimizer than SI's did.
        """
        if not self.in_step:
            raise RuntimeError(
                f"{who}: after_step() without before_step() before it: SI did not prepare this "
                "step (no penalty, no weights before it), so it cannot measure it. Call "
                "before_step() after the backward pass of every step.")
        self.in_step = False
        self.task_steps += 1  # the loop's calls, optimizer step or not
        watch = self.watch
        watch.close()
        seen = watch.stepped()
        for optimizer, stepping_scaler in seen:
            self._check_scaler(optimizer, stepping_scaler, scaler, who)
        if seen and all(optimizer is not binding.inner for optimizer, _ in seen):
            self._follow(seen[0][0], binding, who)  # another optimizer than SI's stepped
        if self.unscaled_by is not None:  # the scaler's record: stepped, skipped, or neither
            unscaled, self.unscaled_by = self.unscaled_by, None
            if not amp.stepped(unscaled, binding.inner):
                self._hold_for_accumulation(groups, who)
                # the next backward pass adds scaled gradients: scale these back
                amp.rescale_(unscaled, binding.inner, self.found_inf,
                             [p for g in groups for p in g.params])
                self.found_inf = None
                return False
        elif not seen and (binding.inner is not None or watch.seen_any):
            self._hold_for_accumulation(groups, who)
            return False
        # (no optimizer given and none seen: a hand-written update, each call a step)
        self.accumulating = False
        est = self.estimator
        for g in groups:
            if g.measure is not None:
                est.check_step(g, g.measure)
        self.steps_since += 1
        for g in groups:
            measure = g.measure
            if measure is None:
                continue
            if g.step_key is not None:  # graphed: a path integral's one pass, replayed
                g.graphs.run(("after", g.step_key), est.accumulate, g.pick(g.running), measure,
                             g.pick(g.pre), g.pick(g.params))
            else:
                est.after_step(g, measure)
            if est.task_gradient and not g.step_kept:  # free now: the next step writes
                g.spare, g.spare_idx = measure, g.step_idx  # the optimizer's g' into them
            g.measure = None
        return True

    def _check_scaler(self, optimizer, stepping_scaler, scaler, who: str) -> None:
        """An optimizer holding SI's parameters stepped: refuse a step whose gradients SI found
        scaled."""
        if stepping_scaler is not None and stepping_scaler is not scaler:
            raise RuntimeError(
                f"{who}: a GradScaler stepped the optimizer, but SI was not given it: the "
                "gradients SI saw were scaled by the loss scale, so its penalty acted that "
                "many times too weakly and ω measured that many times too much. Pass the "
                "scaler to SI (scaler=... or bind(model, optimizer, scaler=...)).")
        if stepping_scaler is not None and id(optimizer) not in self.unscaled_ids:
            raise RuntimeError(
                f"{who}: the GradScaler stepped {type(optimizer).__name__}, whose gradients "
                "were still scaled when before_step() used them: SI unscales those of the "
                "optimizer it is bound to only. With several optimizers, call "
                "scaler.unscale_(optimizer) for each of the others before before_step().")

    def _follow(self, optimizer, binding, who: str) -> None:
        """Only an optimizer SI is not bound to stepped its parameters (made without
        `bind()`): follow it, unless this step was prepared for the bound one."""
        if self.unscaled_by is not None or self.estimator.predicted_step:
            raise RuntimeError(
                f"{who}: {type(optimizer).__name__} stepped SI's parameters, but SI is bound "
                f"to another optimizer ({type(binding.inner).__name__}), whose "
                + ("gradients it unscaled" if self.unscaled_by is not None else
                   "step it predicted") + " for this step. Call bind(model, optimizer) "
                "whenever you make a new optimizer.")
        binding.adopt(optimizer)

    def _hold_for_accumulation(self, groups: Sequence[Any], who: str) -> None:
        """The optimizer did not step after this backward pass: gradients accumulate over
        several backward passes (a template or loop that steps every k mini-batches). The
        pending step waits for the real one, whose gradient is the sum: where the penalty's
        gradient was added to `.grad` it is not added again; a task gradient kept apart goes
        back into `.grad`, where the next backward pass adds to it."""
        est = self.estimator
        if not est.accumulates:
            for g in groups:
                g.measure = None
            raise RuntimeError(
                f"{who}: the optimizer did not step after this backward pass (gradient "
                f"accumulation?), and importance={est.name!r} measures each step from "
                "the whole gradient: use importance='total' or 'task', or call before_step() "
                "once per optimizer step, after the last backward pass.")
        if not self.watch.gradients_untouched():
            for g in groups:
                g.measure = None
            raise RuntimeError(
                f"{who}: the optimizer did not step, and the gradients were changed after "
                "before_step() added SI's penalty to them (zero_grad() to drop a mini-batch, "
                "or clipping between accumulated ones): SI cannot tell what is left of its "
                "penalty in them. Drop or clip gradients before before_step(), or only on "
                "the mini-batches that step.")
        self.accumulating = True
        for g in groups:
            if g.measure is None:
                continue
            params = g.pick(g.params)
            if not est.task_gradient:  # the penalty comes out of .grad: the next backward
                if g.value is not None:  # pass adds to the task gradient, and the real step
                    d = torch._foreach_sub(params, g.pick(g.prev))  # adds the penalty once
                    torch._foreach_addcmul_(g.grads(), g.pick(g.omega), d, value=-2.0 * g.c)
            elif g.step_kept:  # graphed: .grad kept its tensors; the penalty leaves them
                torch._foreach_copy_(g.grads(), g.measure)
            else:  # the step's g' tensors are free; .grad holds the task gradient again
                g.spare, g.spare_idx = [p.grad for p in params], g.step_idx
                for p, gr in zip(params, g.measure):
                    p.grad = gr
            g.measure = None

    # ------------------------------------------------------------------ CUDA graphs

    @staticmethod
    def graphs_of(groups: Sequence[Any]) -> list:
        """What each group's graphs were captured on, before its lists are rebuilt."""
        return [(g.graphs, g.tensors(), g.task_grads) for g in groups]

    def keep_graphs(self, groups: Sequence[Any], kept: list) -> None:
        """After the lists were rebuilt: graphs captured on tensors that the new lists hold
        again stay valid (an Avalanche strategy makes new optimizer groups at every
        experience, on the same parameters); the others are dropped."""
        if not (self.cuda_graphs and self.estimator.graphable):
            return
        for g, (graphs, tensors, task_grads) in zip(groups, kept):
            if not _graphs.supported(g.params):
                continue
            now = g.tensors()
            same = graphs is not None and len(tensors) == len(now) and \
                all(a is b for a, b in zip(tensors, now))
            if same and task_grads is not None and all(  # a weight's data may have been swapped
                    t.shape == p.shape and t.dtype == p.dtype and t.device == p.device
                    for t, p in zip(task_grads, g.params)):
                g.task_grads = task_grads  # the graphs were captured on them too
            elif task_grads is not None:
                same = False
            g.graphs = graphs if same else _graphs.StepGraphs(g.params[0].device)


def independent_gradients(groups: Sequence[Any], loss: Tensor) -> None:
    """Each group's g_u (`group.indep`): the gradient of `loss` with respect to its
    parameters, `.grad` left as it is; under DDP averaged over the ranks, as the step's is;
    non-finite entries (an overflow of the independent pass) zeroed."""
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise OptionTypeError(f"record_independent_gradient() takes the loss (a 0-d tensor "
                              f"with a graph), got {type(loss).__name__}"
                              f"{tuple(loss.shape) if isinstance(loss, Tensor) else ''}.")
    params = [p for g in groups for p in g.params]
    if params and not loss.requires_grad:
        raise ValueError("record_independent_gradient(): the loss has no graph (computed under "
                         "torch.no_grad(), or detached); compute it with gradients enabled.")
    grads = torch.autograd.grad(loss, params, allow_unused=True) if params else ()
    if params and all(gr is None for gr in grads):
        raise ValueError(
            "record_independent_gradient(): the loss reaches none of the parameters SI "
            "regularizes (was it computed by a copy of the model, or under no_grad?). Compute "
            "it with the model SI is bound to.")
    grads = [torch.zeros_like(p) if gr is None else gr.detach()
             for p, gr in zip(params, grads)]
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        world = torch.distributed.get_world_size()
        for gr in grads:
            torch.distributed.all_reduce(gr)
        torch._foreach_div_(grads, float(world))
    for gr in grads:  # an overflow of the independent pass must not reach ω
        torch.nan_to_num_(gr, nan=0.0, posinf=0.0, neginf=0.0)
    k = 0
    for g in groups:
        g.indep, k = grads[k:k + len(g.params)], k + len(g.params)
