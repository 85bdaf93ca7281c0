r"""The SI engine: Synaptic Intelligence for any PyTorch training loop.

`SynapticIntelligence` owns everything SI needs between a model and its optimizer:
the options and parameter groups, the binding to a model, an optimizer and an optional
`torch.amp.GradScaler`, the per-step work, consolidation (by a policy or on demand), the
penalty and the importances, and a validated `state_dict`. It never imports a training
framework: the Avalanche plugin (`avalanche_si.SIPlugin`), the Lightning callback
(`avalanche_si.lightning.SICallback`) and a hand-written loop all drive the same
four calls:

```python
si = SynapticIntelligence(model, optimizer, si_lambda=1.0, eps=0.1)
for task in tasks:
    si.start_task()
    for x, y in task:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()   # k backward passes under accumulation
        si.before_step()                  # once per optimizer step, before clipping
        optimizer.step()
        si.after_step()
    si.end_task()                         # consolidates (after each task by default)
```

Per optimizer step, with g the gradient, θ the weights and
`θ*` their value at the last consolidation (glossary: the docs' conventions page):

- `before_step()` adds the penalty's gradient
  `2cΩ ⊙ (θ - θ*)` to `.grad` in closed form and keeps the
  weights before the step (one pass over memory);
- `after_step()` adds `-g ⊙ Δθ` to the running
  importance ω (one pass);
- consolidation: `Ω ← Ω + max(0, ω / ((θ - θ*)² + ξ))`, `θ* ← θ`, `ω ← 0`.

The maths is in `avalanche_si.functional`; which parameters, under which names:
`avalanche_si.groups`; the buffers: `avalanche_si.state`; the options:
`avalanche_si.options`; when to consolidate: `avalanche_si.consolidation`;
mixed precision: `avalanche_si.amp`.
"""

from __future__ import annotations

import difflib
import operator
import warnings
import weakref
from itertools import repeat
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from . import amp
from . import graphs as _graphs
from .consolidation import ConsolidationPolicy, make_policy
from .functional import (
    DEFAULT_EPS,
    NonFiniteImportanceError,
    accumulate_from_pre,
    accumulate_squares,
    commit_consolidation,
    consolidated_omega,
    deferred_penalty_value,
    penalty_step,
)
from .groups import Matcher, ParamGroup, as_patterns, canonical_name, matches, select, unwrap
from .optim_step import StepPredictor, check_optimizer_supported
from .options import (
    CLAMP_MODES,
    IMPORTANCE_MODES,
    OptionTypeError,
    Strength,
    check_choice,
    check_eps,
    check_eps_for_dtype,
    check_flag,
    check_state_dtype,
    check_strength,
    strength_at,
)
from .state import KINDS, SIState

__all__ = ["SynapticIntelligence", "GroupOptions", "ParamGroup", "IMPORTANCE_MODES",
           "CLAMP_MODES"]


def _every_parameter(name: str, param: torch.nn.Parameter) -> bool:
    return True


#: optimizer steps taken, per optimizer, counted by a global step hook (registered once, at the
#: first bind): SI checks that the optimizer stepped between before_step() and after_step()
_STEPS: "weakref.WeakKeyDictionary[torch.optim.Optimizer, int]" = weakref.WeakKeyDictionary()
_counting = False


def _count_step(optimizer, args, kwargs) -> None:
    _STEPS[optimizer] = _STEPS.get(optimizer, 0) + 1


def _count_steps() -> None:
    global _counting
    if not _counting:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(_count_step)
        _counting = True


def _spare_for(g: "_Group", grads: list[Tensor]) -> Optional[list[Tensor]]:
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
    """What `before_step()` does to one group's tensors, eagerly or under a CUDA graph's
    capture: with the penalty on, `g' = g + 2cΩ(θ - θ*)` (into `.grad`, or into the spare
    tensors with `"task"`) and `θ_pre ← θ`; with it off, the copies alone; first, with
    `zero`, the gradients' non-finite entries are zeroed (a scaler's step; see
    `amp.unscale_()`). Returns the penalty's value function (None with the penalty off)."""

    __slots__ = ("c", "penalize", "zero", "keep")

    def __init__(self, c: float, penalize: bool, zero: bool, keep: bool = False):
        self.c, self.penalize, self.zero, self.keep = c, penalize, zero, keep

    def __call__(self, grads, omega, params, prev, pre, spare) -> Optional[Callable[[], Tensor]]:
        if self.zero:
            amp.zero_nonfinite_(grads)
        if self.keep:  # graphed "task": the task gradient copied into SI's own tensors, the
            torch._foreach_copy_(spare, grads)  # penalty added in .grad (the same bits as
            spare = None                        # writing g' into spare tensors)
        if self.penalize:
            return penalty_step(grads, omega, params, prev, strength=self.c, pre=pre,
                                in_place=spare is None, out=spare)[1]
        if pre is not None:
            torch._foreach_copy_(pre, params)  # no_grad: no detach needed
        if spare is not None:  # as above, so that ω never sees what is done to .grad later
            torch._foreach_copy_(spare, grads)
        return None


class _Group:
    """One group's configuration and its per-step lists."""

    graphs: Optional[_graphs.StepGraphs] = None  # groups pickled by earlier versions lack them
    step_key: Optional[_graphs.Addresses] = None
    task_grads: Optional[list[Tensor]] = None
    step_kept = False

    def __init__(self, key: Optional[str], matcher, si_lambda: Optional[Strength],
                 eps: Optional[float]):
        self.key = key                    # None: the default group (buffer names without _name)
        self.matcher = matcher
        self.si_lambda = si_lambda        # None: the engine's
        self.eps = eps                    # None: the engine's
        self.c = 0.0                      # the strength in use (resolved per consolidation)
        self.clear_lists()

    def clear_lists(self) -> None:
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        self.omega: list[Tensor] = []
        self.prev: list[Tensor] = []
        self.running: list[Tensor] = []
        self.pre: list[Tensor] = []
        self.predictor: Optional[StepPredictor] = None
        self.step_grads: list[Tensor] = []
        self.step_idx: Optional[list[int]] = None
        self.step_swap = False            # "sib": ω += (g_u − g)·Δθ, pre and θ swapped
        self.indep: Optional[list[Tensor]] = None  # "siu"/"sib": the independent gradient
        self.pending_delta: Optional[list[Tensor]] = None  # "delta_params": g·Δθ of the step
        # "task": the tensors the next step's gradient for the optimizer is written into (the
        # task gradient tensors of the last step, free once ω has them), so that no step
        # allocates them
        self.spare: Optional[list[Tensor]] = None
        self.spare_idx: Optional[list[int]] = None  # the step_idx of the step they served
        self.value: Optional[Callable[[], Tensor]] = None  # the last step's penalty value...
        self.penalty: Optional[Tensor] = None              # ... computed when first read
        # cuda_graphs: the group's captured step work (dropped with the lists it was captured
        # on), and the addresses of the step in flight (None: not graphed)
        self.graphs: Optional[_graphs.StepGraphs] = None
        self.step_key: Optional[_graphs.Addresses] = None
        # graphed "task": SI's own tensors (one per parameter, allocated at the first step and
        # kept with the graphs) that each step's task gradient is copied into, so that .grad
        # keeps its tensors (the optimizer's gradient is g' in place, as with "total")
        self.task_grads: Optional[list[Tensor]] = None
        self.step_kept = False            # the step in flight used them

    def tensors(self) -> list[Tensor]:
        """Every tensor of the per-step lists: what the group's graphs were captured on."""
        return [*self.params, *self.omega, *self.prev, *self.running, *self.pre]

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


class _Binding:
    """The model, optimizer and scaler SI serves, and whether the per-step lists are current.

    `built`: the groups' lists hold the bound model's parameters (consolidation can run);
    `state_model`: the model the state belongs to (one run, one model);
    `current`: they need no rebuilding before the next step. `signature` is what they were
    built from: an online stream starts hundreds of experiences, and the lists are rebuilt
    only when it changes.
    """

    __slots__ = ("model", "optimizer", "scaler", "signature", "built", "current", "state_model")

    def __init__(self) -> None:
        self.model: Optional[torch.nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scaler: Optional[torch.amp.GradScaler] = None   # found by an adapter
        self.signature: tuple = ()
        self.built = False
        self.current = False
        #: the plain model SI's state was built for (a weak reference; None: not yet, or the
        #: state arrived by load_state_dict or unpickling and belongs to the next model bound)
        self.state_model: Optional[weakref.ref] = None

    def target(self, model, optimizer, scaler) -> None:
        if model is not self.model or optimizer is not self.optimizer or scaler is not self.scaler:
            self.model, self.optimizer, self.scaler = model, optimizer, scaler
            self.current = False

    def signature_now(self) -> tuple:
        opt, model = self.optimizer, self.model
        return (id(model), id(opt),
                tuple(id(g) for g in getattr(opt, "param_groups", ())),
                tuple((id(p), p.requires_grad) for p in model.parameters()))

    def changed(self) -> bool:
        """The model's trainable parameters or the optimizer's groups differ from the lists'."""
        return self.signature != self.signature_now()

    def parameters_replaced(self) -> bool:
        """The model holds other parameter objects than the lists' (a head grew)."""
        built = self.signature[3] if self.signature else ()
        return tuple(id(p) for p in self.model.parameters()) != tuple(i for i, _ in built)


class GroupOptions:
    """The live options of one SI group (`SynapticIntelligence.group()`).

    Assigning `si_lambda` or `eps` is checked like the constructor's and takes effect at the
    next step (strength) or consolidation (damping); `None` follows the engine's value.
    """

    __slots__ = ("_engine", "_group")

    def __init__(self, engine: "SynapticIntelligence", group: _Group):
        self._engine, self._group = engine, group

    @property
    def key(self) -> Optional[str]:
        """The group's name (None for the default group)."""
        return self._group.key

    @property
    def names(self) -> list[str]:
        """The parameters the group regularizes now."""
        return list(self._group.names)

    @property
    def si_lambda(self) -> Optional[Strength]:
        """The group's strength c, or None to follow the engine's."""
        return self._group.si_lambda

    @si_lambda.setter
    def si_lambda(self, value) -> None:
        self._group.si_lambda = None if value is None else \
            check_strength(value, f"groups[{self.key!r}].si_lambda")
        self._engine._resolve_strengths()

    @property
    def eps(self) -> Optional[float]:
        """The group's damping ξ, or None to follow the engine's."""
        return self._group.eps

    @eps.setter
    def eps(self, value) -> None:
        self._group.eps = None if value is None else check_eps(value, f"groups[{self.key!r}].eps")

    def __setattr__(self, name, value):
        if name.startswith("_") or name in ("si_lambda", "eps"):
            object.__setattr__(self, name, value)
        else:
            raise AttributeError(f"an SI group's options are si_lambda and eps, not {name!r}.")

    def __repr__(self) -> str:
        return f"GroupOptions(key={self.key!r}, si_lambda={self.si_lambda!r}, eps={self.eps!r})"


#: options that may change during training, and those fixed at construction (and why)
LIVE_OPTIONS = ("si_lambda", "eps", "clamp", "scaler")
FIXED_OPTIONS = {
    "consolidate": "its state is part of SI's",
    "importance": "the state it keeps depends on it",
    "excluded_parameters": "which parameters have state depends on it",
    "groups": "the state is named by group",
    "regularize_norm_layers": "which parameters have state depends on it",
    "state_dtype": "the state is stored in it",
}


def refuse_attribute(owner: type, name: str) -> None:
    """Raise the `AttributeError` for assigning `name` on an SI object (engine or adapter):
    fixed options, read-only properties and typos, each with its fix."""
    cls = owner.__name__
    if name in FIXED_OPTIONS:
        raise AttributeError(
            f"{cls}.{name} cannot change after construction ({FIXED_OPTIONS[name]}); build a "
            f"new {cls}(..., {name}=...) and load this one's state_dict() into it.")
    if isinstance(getattr(owner, name, None), property):
        raise AttributeError(f"{cls}.{name} is read-only: SI keeps it.")
    close = difflib.get_close_matches(name, LIVE_OPTIONS + tuple(FIXED_OPTIONS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise AttributeError(f"{cls} has no option {name!r}{hint} Options that may change during "
                         f"training: {', '.join(LIVE_OPTIONS)}.")


class SynapticIntelligence:
    r"""Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017) for any PyTorch training loop.

    For every regularized weight `θ_k`:

    - after each optimizer step: `ω_k ← ω_k - g_k Δθ_k`;
    - at each consolidation (after each task by default):
      `Ω_k ← Ω_k + max(0, ω_k / ((θ_k - θ*_k)² + ξ))`, `θ*_k ← θ_k`, `ω_k ← 0` (`θ*` of the
      first task is the weights when SI first sees them);
    - after the first consolidation the loss gets `c Σ_k Ω_k (θ_k - θ*_k)²` (no ½).

    The penalty's gradient `2cΩ ⊙ (θ - θ*)` is added in closed form
    by `before_step()`, so no graph is built for it; its value at the last step is
    `penalty` (computed when read, for logging; it is not part of your loss).

    Memory: Ω, `θ*`, ω and the weights before the step,
    `4n` numbers for `n` regularized weights (`3n` with `importance="delta_params"` or
    `"sos"`; `"task"` keeps `n` more: the optimizer steps on a second gradient tensor, the
    penalty's added, while ω keeps the task's; the last step's task gradient tensors are
    reused for it rather than allocated at every step), on each parameter's device, in the
    weights' dtype (float32 for 16-bit weights; see `state_dtype`). The state lives here,
    not in the model: `model.state_dict()` is unchanged.

    Args:
        model: the model to regularize (or later, with `bind()`). Wrappers of
            `torch.compile` and `DistributedDataParallel` are seen through: state is keyed
            by the plain model's parameter names.
        optimizer: the optimizer that steps it (needed by `importance="delta_params"`).
        si_lambda: the strength c of the penalty (>= 0; 0 switches the penalty off and
            leaves training bit-identical to training without SI). A list gives one strength
            per task (the last repeats), a callable `(index) -> c` computes it; the index
            counts the consolidations so far.
        eps: the damping `ξ > 0` of the consolidation (default 1e-3).
        excluded_parameters: name patterns (see `ParamGroup`) of
            parameters never regularized.
        groups: parameter groups, `{name: ParamGroup(...)}` (a bare pattern list or callable
            stands for `ParamGroup(params=...)`), each with its own strength and damping, its
            state named `si_omega_<name>_weights_<i>` and so on. A parameter may belong to one
            group only; parameters in no group are not regularized. Default: one group holding
            every trainable parameter, named `si_omega_weights_<i>`.
        importance: which gradient and step measure the importance ω:

            - `"total"`: the gradient the optimizer used (task loss, SI penalty and anything
              else added to `.grad`) times the step taken;
            - `"task"`: the gradient without the SI penalty, as `before_step()` finds it,
              times the step taken (Zenke et al.'s code);
            - `"delta_params"`: the same gradient times the step the optimizer would take
              from it alone, predicted from its state (SGD, Adam, AdamW, RMSprop; 3n memory).
            - Benzing (2022)'s variants, each with the task loss's gradient:
              `"siu"`: the gradient `g_u` of an independent mini-batch times the step taken
              (`record_independent_gradient()` each step); `"sib"`: `(g_u - g)` times the
              step, the bias part of SI alone; `"sos"`: no path integral: the running
              average `v ← 0.999 v + 0.001 g²`, and Ω += `√v` at consolidation (`eps` not
              used; 3n memory).
        clamp: where the consolidation's `max(0, ·)` goes:

            - `"task"` (default): on each consolidation's contribution;
            - `"total"` (Zenke et al.'s code): on the running total Ω;
            - `"none"` (van de Ven's code): no clamp; Ω may become negative.
        regularize_norm_layers: also regularize the parameters of normalization layers
            (`BatchNorm`, `InstanceNorm`: torch's `_NormBase`). Default False, as
            Avalanche's `SynapticIntelligencePlugin`.
        state_dtype: the dtype of the state; None (default) keeps it in float32 for
            float16/bfloat16 weights and in the weights' dtype otherwise; `torch.float32` or
            `torch.float64` force one.
        consolidate: when to consolidate (`avalanche_si.consolidation`): None (default) at
            each `end_task()`, or at the real task boundaries of an online stream that shows
            them; `"experience"` at every `end_task()`; `"boundary"` at task boundaries
            only; an `int` k every k optimizer steps; or a
            `LossPlateau`. `consolidate_now()`
            consolidates at any moment.
        scaler: the `torch.amp.GradScaler` that scales the loss, for mixed precision.
            `before_step()` unscales the gradients (PyTorch's documented pattern for
            gradient clipping, so `scaler.step` does not unscale again), so the penalty acts
            at the right scale, ω uses unscaled gradients and steps the scaler
            skips add nothing.
        cuda_graphs: on a GPU, capture each step hook's work as a CUDA graph and replay it
            (`avalanche_si.graphs`): one launch per hook and group instead of a few per
            group and ~36 tensors, bit-identical results, n more numbers kept (the
            temporaries). For `importance="total"` and `"task"`; the other modes, CPU
            tensors and gradients that move every step stay on the eager path. Default
            False (new; not yet measured on a GPU).

    `si_lambda`, `eps`, `clamp` and `scaler` may be assigned during training (checked
    like here; the strength applies from the next step, the damping and clamp at the next
    consolidation); so may each group's (`group()`). The other options are fixed:
    assigning them, or an unknown name, raises `AttributeError`.

    Raises:
        ValueError: a bad option value, here; when training starts, an unsupported optimizer
            for `"delta_params"`, a parameter in two groups, a group that matches no
            parameter, or a state that does not fit the model.
        TypeError: an option or argument of the wrong type.

    Example:
        ```python
        si = SynapticIntelligence(model, optimizer, si_lambda=1.0, eps=0.1)
        for task in tasks:
            si.start_task()
            for x, y in task:
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                si.before_step()
                optimizer.step()
                si.after_step()
            si.end_task()
        ```
    """

    def __init__(self, model: Optional[torch.nn.Module] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None, *,
                 si_lambda: Strength = 1.0, eps: float = DEFAULT_EPS,
                 excluded_parameters: Union[str, Sequence[str], None] = None,
                 groups: Optional[Mapping[str, Union[ParamGroup, Matcher]]] = None,
                 importance: str = "total", clamp: str = "task",
                 regularize_norm_layers: bool = False,
                 state_dtype: Optional[torch.dtype] = None,
                 consolidate: Union[None, str, int, ConsolidationPolicy] = None,
                 scaler: Optional[torch.amp.GradScaler] = None,
                 cuda_graphs: bool = False):
        self._si_lambda = check_strength(si_lambda, "si_lambda")
        self._eps = check_eps(eps, "eps")
        self._importance = check_choice(importance, IMPORTANCE_MODES, "importance")
        self._clamp = check_choice(clamp, CLAMP_MODES, "clamp")
        self._excluded = as_patterns(excluded_parameters or (), "excluded_parameters")
        self._norms = check_flag(regularize_norm_layers, "regularize_norm_layers")
        self._state_dtype = check_state_dtype(state_dtype)
        self._cuda_graphs = check_flag(cuda_graphs, "cuda_graphs")
        self._scaler_option = amp.check_scaler(scaler)
        self._policy = make_policy(consolidate)
        self._fresh_policy = self._policy.state_dict()  # what reset() restores
        self._groups = self._make_groups(groups)
        # without θ_pre: delta_params predicts the step, sos measures no step
        kinds = KINDS[:3] if importance in ("delta_params", "sos") else KINDS
        self._state = SIState([g.key for g in self._groups], kinds, self._state_dtype)
        self._consolidations = 0       # the index that lists of strengths are read at
        self._resolve_strengths()
        self._patterns_checked = False
        self._strict = True
        self._binding = _Binding()
        if model is not None:
            self.bind(model, optimizer)
        elif optimizer is not None:
            raise TypeError("SynapticIntelligence got an optimizer but no model; pass both, or "
                            "bind(model, optimizer) later.")

    def _make_groups(self, groups) -> list[_Group]:
        if groups is None:
            return [_Group(None, _every_parameter, None, None)]
        if not isinstance(groups, Mapping) or not groups:
            raise ValueError("groups must be a non-empty mapping {name: ParamGroup(params=...)}, "
                             f"got {groups!r}; leave it out for one group of all parameters.")
        made = []
        for key, spec in groups.items():
            if not isinstance(key, str) or not key or "." in key or not key.isprintable():
                raise ValueError(f"group name {key!r} must be a non-empty string without '.' "
                                 "(it becomes part of buffer names such as si_omega_<name>_weights_0).")
            if not isinstance(spec, ParamGroup):
                spec = ParamGroup(params=spec)
            matcher = spec.params if callable(spec.params) else \
                as_patterns(spec.params, f"groups[{key!r}].params")
            made.append(_Group(
                key, matcher,
                None if spec.si_lambda is None else
                check_strength(spec.si_lambda, f"groups[{key!r}].si_lambda"),
                None if spec.eps is None else check_eps(spec.eps, f"groups[{key!r}].eps")))
        return made

    # ------------------------------------------------------------------ options

    @property
    def si_lambda(self) -> Strength:
        """The strength c: a number, a list of them (one per task; kept as a tuple) or a
        callable."""
        return self._si_lambda

    @si_lambda.setter
    def si_lambda(self, value) -> None:
        self._si_lambda = check_strength(value, "si_lambda")
        self._resolve_strengths()

    @property
    def eps(self) -> float:
        """The damping ξ (used at the next consolidation)."""
        return self._eps

    @eps.setter
    def eps(self, value) -> None:
        self._eps = check_eps(value, "eps")

    @property
    def clamp(self) -> str:
        """Where the consolidation clamps at 0: `"task"`, `"total"` or `"none"`. Switching
        from `"none"` to a clamp also clamps the Ω held so far at 0."""
        return self._clamp

    @clamp.setter
    def clamp(self, value) -> None:
        value = check_choice(value, CLAMP_MODES, "clamp")
        if value != "none" and self._clamp == "none":
            # Ω held under clamp="none" may be negative, which the new clamp never stores:
            # clamp it now, so that Ω (and the state_dict) always fit the clamp in use
            with torch.no_grad():
                for key, index in self._state.index.items():
                    for i in index.values():
                        self._state.get(key, "omega", i).clamp_(min=0.0)
        self._clamp = value

    @property
    def scaler(self) -> Optional[torch.amp.GradScaler]:
        """The GradScaler passed in (None: the one an adapter finds, if any)."""
        return self._scaler_option

    @scaler.setter
    def scaler(self, value) -> None:
        self._scaler_option = amp.check_scaler(value)
        self._binding.current = False

    @property
    def importance(self) -> str:
        """Which gradient and step measure ω."""
        return self._importance

    @property
    def consolidate(self) -> ConsolidationPolicy:
        """When SI consolidates (a policy); `consolidate_now()` consolidates at once."""
        return self._policy

    @property
    def consolidations(self) -> int:
        """How many times SI has consolidated so far (the index a list of strengths is read
        at); on a task-free stream, check that the policy keeps firing."""
        return self._consolidations

    @property
    def excluded_parameters(self) -> tuple[str, ...]:
        """The name patterns never regularized."""
        return self._excluded

    @property
    def regularize_norm_layers(self) -> bool:
        """Whether normalization layers' parameters are regularized."""
        return self._norms

    @property
    def state_dtype(self) -> Optional[torch.dtype]:
        """The dtype option of the state (None: float32 for 16-bit weights, else theirs)."""
        return self._state_dtype

    @property
    def cuda_graphs(self) -> bool:
        """Whether the per-step work is replayed as CUDA graphs where it can be."""
        return self._cuda_graphs

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or name in LIVE_OPTIONS:
            super().__setattr__(name, value)
        else:
            refuse_attribute(type(self), name)

    def group(self, key: Optional[str] = None) -> GroupOptions:
        """The live options of group `key` (None: the default group)."""
        return GroupOptions(self, self._group(key))

    def _resolve_strengths(self) -> None:
        for g in self._groups:
            value = self._si_lambda if g.si_lambda is None else g.si_lambda
            what = "si_lambda" if g.si_lambda is None else f"groups[{g.key!r}].si_lambda"
            g.c = strength_at(value, self._consolidations, what)

    def _eps_of(self, g: _Group) -> float:
        return self._eps if g.eps is None else g.eps

    # ------------------------------------------------------------------ public state

    @property
    def penalty(self) -> Optional[Tensor]:
        """The SI penalty `Σ_g c_g Σ Ω (θ - θ*)²` at the last
        step (0-d tensor on the parameters' device), or None before the first consolidation,
        right after one, or when every strength is 0. Computed on first read, so a loop that
        never reads it does not pay for it."""
        values = []
        for g in self._groups:
            if g.value is not None:
                if g.penalty is None:  # computed on demand: training does not pay for it
                    g.penalty = g.value()
                values.append(g.penalty)
        return torch.stack(values).sum() if values else None

    @property
    def group_names(self) -> list[Optional[str]]:
        """The groups' names (`None` for the default group)."""
        return [g.key for g in self._groups]

    def importances(self, group: Optional[str] = None) -> dict[str, Tensor]:
        r"""The consolidated importances Ω of one group, by parameter name.

        The tensors are the live state: read, do not modify them.
        """
        key = self._group(group).key
        return {name: self._state.get(key, "omega", i)
                for name, i in self._state.index[key].items()}

    def _group(self, key: Optional[str]) -> _Group:
        for g in self._groups:
            if g.key == key:
                return g
        raise KeyError(f"no SI group {key!r}; the groups are {self.group_names}.")

    # ------------------------------------------------------------------ binding

    @property
    def model(self) -> Optional[torch.nn.Module]:
        """The model SI is bound to (None before `bind()`)."""
        return self._binding.model

    @property
    def optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The optimizer SI is bound to."""
        return self._binding.optimizer

    def bind(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, *,
             scaler: Optional[torch.amp.GradScaler] = None,
             carry_state: bool = False) -> "SynapticIntelligence":
        """Serve `model` stepped by `optimizer` (a compiled or distributed wrapper of the same
        model keeps its state: names are the plain model's).

        Cheap when nothing changed: call it whenever the loop may have replaced the model or the
        optimizer. The per-step lists are rebuilt at the next step when either object changed.

        One SI object serves one run: once it holds state for a model, binding another model
        object raises, unless `carry_state` (the same run goes on with a new model object,
        as Avalanche's GDumb builds one per experience; state follows the parameter names).

        Args:
            scaler: a `GradScaler` found by an adapter, used unless the `scaler` option is
                set.
            carry_state: keep the state for a new model object of the same run.

        Returns:
            `self`, for `si = SynapticIntelligence(...).bind(model, optimizer)`.

        Raises:
            RuntimeError: SI holds state for another model (call `reset()` for a new run).
            ValueError: `torch.optim.LBFGS` (a closure optimizer).
        """
        if not isinstance(model, torch.nn.Module):
            raise OptionTypeError(f"bind() needs the torch.nn.Module to regularize, got "
                                  f"{type(model).__name__}.")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise OptionTypeError(f"bind() needs a torch.optim.Optimizer (or None), got "
                                  f"{type(optimizer).__name__}.")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError("SI does not support torch.optim.LBFGS: it re-evaluates a closure "
                             "several times per step, without the penalty's gradient. Add "
                             "c·Σ Ω(θ − θ*)² to the closure's loss with avalanche_si.functional.")
        b = self._binding
        if model is not b.model and b.state_model is not None and not carry_state:
            if b.state_model() is not unwrap(model):
                raise RuntimeError(
                    f"{self._who} holds SI state (Ω, θ*, {self._consolidations} consolidation(s)) "
                    "for another model, and state never moves to a new model silently. For a "
                    "new run (another seed), call reset() or build a new one; to move the state, "
                    "load_state_dict(state_dict()) first.")
        b.target(model, optimizer, amp.check_scaler(scaler))
        _count_steps()
        return self

    def reset(self) -> None:
        """Forget everything learnt: Ω, θ*, ω, the consolidation count and the policy's state;
        the options stay. For a new run (another seed) with the same SI object; the next
        `bind()` may then name any model."""
        self._state = SIState([g.key for g in self._groups], self._state.kinds, self._state_dtype)
        self._consolidations = 0
        self._steps_since = self._task_steps = 0
        self._accumulating = self._in_step = False
        if self._fresh_policy is None:
            raise RuntimeError("this SI object was unpickled from avalanche_si 0.2 and cannot "
                               "restore its policy's initial state; build a new one.")
        self._policy.load_state_dict(self._fresh_policy)
        self._patterns_checked, self._strict = False, True
        for g in self._groups:
            g.clear_lists()
        self._resolve_strengths()
        self._binding = _Binding()

    def invalidate(self) -> None:
        """The model's parameters changed (a head grew, modules were replaced, parameters were
        unfrozen): rebuild the per-step lists before the next step. `start_task()` notices
        such changes itself; call this when they happen in the middle of a task."""
        self._binding.current = False

    def parameters_replaced(self) -> bool:
        """Whether the bound model now holds other parameter objects than SI's lists (an
        evaluation that adapted the model, say); marks the lists for rebuilding if so."""
        b = self._binding
        if b.model is not None and b.built and b.parameters_replaced():
            b.current = False
            return True
        return False

    def _require_model(self, call: str) -> torch.nn.Module:
        if self._binding.model is None:
            raise RuntimeError(f"{type(self).__name__}.{call}() before bind(model, optimizer): "
                               "SI does not know which model to regularize.")
        return self._binding.model

    def _sync(self) -> None:
        """Match the model's parameters to groups and state; build the per-step lists.

        Runs when the binding changed (once per task at most, in practice), never per step.
        New parameters get Ω = 0 and θ* = their current value; a grown one keeps its state for
        the old slice.
        """
        b = self._binding
        model = b.model
        selected = select(model, self._groups, self._excluded,
                          regularize_norm_layers=self._norms,
                          check_patterns=not self._patterns_checked)
        self._patterns_checked = True
        model_names = self._model_names(model)
        self._state.check_loaded_names(model_names, strict=self._strict)
        self._follow_renamed(model_names, {(g.key, n) for g in self._groups for n in g.names})
        # graphs captured on tensors that the new lists hold again stay valid (an Avalanche
        # strategy makes new optimizer groups at every experience, on the same parameters)
        kept_graphs = [(g.graphs, g.tensors(), g.task_grads) for g in self._groups]
        for g in self._groups:
            g.clear_lists()
        if not selected and any(p.requires_grad for p in model.parameters()):
            warnings.warn("SI regularizes no parameter of this model: excluded_parameters and "
                          "the groups leave out every trainable one, so SI is off.", stacklevel=4)
        for g, name, p in selected:
            i = self._state.track(g.key, name, p)
            g.names.append(name)
            g.params.append(p)
            g.omega.append(self._state.get(g.key, "omega", i))
            g.prev.append(self._state.get(g.key, "prev_theta", i))
            g.running.append(self._state.get(g.key, "running_omega", i))
            if "pre_step_theta" in self._state.kinds:
                g.pre.append(self._state.get(g.key, "pre_step_theta", i))
        for g in self._groups:
            if g.omega:
                check_eps_for_dtype(self._eps_of(g), g.omega[0].dtype,
                                    "eps" if g.eps is None else f"groups[{g.key!r}].eps")
            if self._importance == "delta_params":
                g.predictor = StepPredictor(self._need_optimizer(), g.params) if g.params else None
        for g, (graphs, tensors, task_grads) in zip(self._groups, kept_graphs):
            if not (self._cuda_graphs and self._importance in ("total", "task") and
                    _graphs.supported(g.params)):
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
        b.signature = b.signature_now()
        b.current = b.built = True
        b.state_model = weakref.ref(unwrap(model))

    def _hold_for_accumulation(self) -> None:
        """The optimizer did not step after this backward pass: gradients accumulate over
        several backward passes (a template or loop that steps every k mini-batches). The
        pending step waits for the real one, whose gradient is the sum: with `"total"` the
        penalty's gradient is already in `.grad` (it is not added again); with `"task"` the
        task gradient goes back into `.grad`, where the next backward pass adds to it."""
        if self._importance not in ("total", "task"):
            for g in self._groups:
                g.step_grads, g.pending_delta = [], None
            raise RuntimeError(
                f"{self._who}: the optimizer did not step after this backward pass (gradient "
                f"accumulation?), and importance={self._importance!r} measures each step from "
                "the whole gradient: use importance='total' or 'task', or call before_step() "
                "once per optimizer step, after the last backward pass.")
        self._accumulating = True
        if self._importance == "task":
            for g in self._groups:
                params = g.pick(g.params)
                if g.step_kept:  # graphed: .grad kept its tensors; the penalty leaves them
                    if g.step_grads:
                        torch._foreach_copy_([p.grad for p in params], g.step_grads)
                    continue
                if g.step_grads:  # the step's, now free
                    g.spare, g.spare_idx = [p.grad for p in params], g.step_idx
                for p, gr in zip(params, g.step_grads):
                    p.grad = gr

    def _check_predicted_lrs(self) -> None:
        pairs, self._predicted_lrs = self._predicted_lrs, None
        for group, lr in pairs:
            now = group["lr"]
            if now is not lr and not (isinstance(now, float) and now == lr):
                raise RuntimeError(
                    f"importance='delta_params' predicted this step with lr={lr!r}, but the "
                    f"optimizer stepped with lr={now!r}: something changed it between "
                    "before_step() and the step. Change the learning rate after the step "
                    "(a scheduler steps after optimizer.step()), or use importance='task'.")

    def _follow_renamed(self, model_names: set[str], tracked: set) -> None:
        """Parameters SI tracked that the model no longer has under their name (it was wrapped
        in a new module, say): a name that is now the end of exactly one new name follows it
        (`0.weight` → `net.0.weight`); the others lose their importance, with a warning."""
        lost = [(key, n) for key, n in sorted(tracked, key=str) if n not in model_names]
        if not lost:
            return
        known = {n for index in self._state.index.values() for n in index}
        fresh = [m for m in model_names if m not in known]
        gone = []
        for key, n in lost:
            match = [m for m in fresh if m.endswith("." + n)]
            if len(match) == 1:
                index = self._state.index[key]
                index[match[0]] = index.pop(n)
                fresh.remove(match[0])
            else:
                gone.append(n)
        if gone:
            warnings.warn(f"{self._who}: {len(gone)} regularized parameter(s) are no longer in the "
                          f"model under their names ({', '.join(map(repr, gone[:5]))}"
                          f"{', ...' if len(gone) > 5 else ''}): they lose their importance and "
                          "the penalty no longer holds them. Keep parameter names stable between "
                          "tasks (see the groups guide).", stacklevel=5)

    def _need_optimizer(self) -> torch.optim.Optimizer:
        opt = self._binding.optimizer
        if opt is None:
            raise ValueError("importance='delta_params' predicts the optimizer's steps: bind "
                             "SI to the optimizer too, bind(model, optimizer).")
        check_optimizer_supported(opt)
        return opt

    @staticmethod
    def _model_names(model: torch.nn.Module) -> set[str]:
        return {canonical_name(n) for n, _ in unwrap(model).named_parameters()}

    def _scaler_in_use(self) -> Optional[torch.amp.GradScaler]:
        return self._scaler_option or self._binding.scaler

    # ------------------------------------------------------------------ the loop's calls

    def start_task(self, experience: Any = None) -> None:
        """Call as a task (or an experience of a stream) starts: SI re-reads the model if its
        parameters changed (a new head, unfrozen layers), and a policy that consolidates at
        task boundaries may consolidate here (`experience`: an Avalanche experience, read by
        duck typing; None in a plain loop)."""
        if self._start_task(experience):
            self.consolidate_now()  # a task boundary seen as the next task starts

    # Each call of the loop in two parts: the work, and whether the policy consolidates now.
    # An adapter consolidates through its own consolidate_now(), so that a subclass of it
    # that overrides the method sees every consolidation.

    def _start_task(self, experience: Any) -> bool:
        self._require_model("start_task")
        if self._importance == "delta_params":
            self._need_optimizer()
        b = self._binding
        if not b.current or b.changed():
            self._sync()
        self._task_steps, self._accumulating, self._in_step = 0, False, False
        return self._policy.at_experience_start(experience)

    @torch.no_grad()
    def before_step(self) -> None:
        """Call once per optimizer step, after the (last) backward pass and before gradient
        clipping and `optimizer.step()` (or `scaler.step`): unscales the gradients when a
        scaler is in use, adds the penalty's gradient and keeps the weights before the step.
        Under gradient accumulation, call it after the last of the k backward passes, or after
        each with `after_step()` after each: SI sees that the optimizer did not step and
        carries the step over (`"total"` and `"task"`; `"delta_params"` refuses)."""
        b = self._binding
        if self._in_step:
            self._in_step = False
            raise RuntimeError(
                f"{self._who}: before_step() was called twice without after_step() in between "
                f"({self._between_steps}), so the step in between would be counted wrongly. Call "
                "after_step() after every optimizer step (and after every before_step()).")
        if not b.current:
            self._require_model("before_step")
            self._sync()
        found_inf = None
        self._predicted_lrs = None
        scaler = self._scaler_in_use()
        # to see after the step whether the optimizer stepped (gradient accumulation if not):
        # its step count, or with a scaler (which may skip the step) the scaler's record
        self._steps_before = self._unscaled_by = None
        if scaler is not None:  # a graphed group zeroes non-finite entries in its replay
            found_inf = amp.unscale_(scaler, b.optimizer,
                                     [p for g in self._groups if g.graphs is None
                                      for p in g.params])
            if found_inf is not None:
                self._unscaled_by, self._found_inf = scaler, found_inf
        if b.optimizer is not None and self._unscaled_by is None:
            self._steps_before = _STEPS.get(b.optimizer, 0)
        if self._importance in ("siu", "sib") and \
                any(g.params and g.indep is None for g in self._groups):
            raise RuntimeError(
                f"importance={self._importance!r} measures each step with the gradient of an "
                "independent mini-batch: call record_independent_gradient(loss) before "
                "before_step(), once per optimizer step.")
        for g in self._groups:
            if g.params:
                self._before_step_group(g, found_inf)
            g.indep = None  # used: the next step needs its own
        self._in_step = True

    def _before_step_group(self, g: _Group, found_inf: Optional[Tensor]) -> None:
        grads = [p.grad for p in g.params]
        idx = None
        if any(map(operator.is_, grads, repeat(None))):
            # Parameters without a gradient this step (another task's head) are skipped:
            # the optimizer does not move them, so neither their importance nor their
            # penalty changes, and giving them a zero gradient would let a stateful
            # optimizer move them on old momentum.
            idx = [k for k, gr in enumerate(grads) if gr is not None]
            grads = [grads[k] for k in idx]
        zero = found_inf is not None and g.graphs is not None  # unscale_() left it to us
        if self._accumulating and self._importance == "total" and idx == g.step_idx and \
                len(grads) == len(g.step_grads) and \
                all(a is b for a, b in zip(grads, g.step_grads)):
            if zero:
                amp.zero_nonfinite_(grads)
            return  # accumulating into the same .grad: the penalty is in it, θ has not moved
        g.step_idx, g.step_grads, g.value, g.penalty = idx, [], None, None
        g.step_swap, g.step_key, g.step_kept = False, None, False
        if not grads:
            return
        params = g.pick(g.params)
        measure = grads  # what ω multiplies the step with
        # The weights before the step are recorded here, in the pass that reads them for
        # the penalty anyway (the optimizer step is what follows; whatever moves the
        # weights between this call and the step has its move counted as part of it).
        pre = g.pick(g.pre) if g.pre else None
        if self._importance == "delta_params":  # measured before the penalty joins the gradient
            delta = g.predictor.predict(grads, mask=idx)
            # what it predicted with, checked after the step (a scheduler or plugin that changes
            # the learning rate in between makes the prediction wrong)
            self._predicted_lrs = (self._predicted_lrs or []) + [
                (slot.group, slot.group["lr"]) for slot in g.predictor.slots]
            if found_inf is not None:  # a step the scaler skips moves nothing
                torch._foreach_mul_(delta, 1.0 - found_inf)
            # g·Δθ, taken from ω after the step, so that a consolidation between here and the
            # step leaves it to the next period (held until then: n numbers during the step)
            torch._foreach_mul_(delta, grads)
            g.pending_delta = delta
        elif self._importance == "sos":  # v ← β v + (1 − β) g², g without the penalty
            accumulate_squares(g.pick(g.running), grads,
                               weight=None if found_inf is None else 1.0 - found_inf)
        elif self._importance in ("siu", "sib"):
            measure = g.pick(g.indep)
            if self._importance == "sib":  # g_u − g, before the penalty joins g
                torch._foreach_sub_(measure, grads)
                g.step_swap = True  # ω += (g_u − g)·(θ − θ_pre)
        graphed = g.graphs is not None and pre is not None
        # "task": the task gradient is kept for ω apart from the optimizer's g'. Eagerly the
        # optimizer gets other gradient tensors (the spare ones, reused from step to step)
        # with the penalty added, and the task gradients stay in g.step_grads; graphed, the
        # task gradient is copied into SI's own tensors and .grad gets the penalty in place
        # (no per-tensor swap of .grad on the host, and no addresses that change per step)
        spare = None
        g.step_kept = keep = graphed and self._importance == "task"
        if keep:
            if g.task_grads is None:
                g.task_grads = [torch.empty_like(p) for p in g.params]
            spare = measure = g.pick(g.task_grads)
        elif self._importance == "task":
            spare = _spare_for(g, grads)
            if spare is None:
                spare = [torch.empty_like(gr) for gr in grads]
        penalize = self._state.consolidated[g.key] and g.c != 0.0
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
            g.step_key = None
            g.value = work(*lists)
        if spare is not None and not keep:
            for p, t in zip(params, spare):
                p.grad = t
        if pre is not None:
            g.step_grads = measure

    @torch.no_grad()
    def after_step(self, loss: Optional[Tensor] = None) -> None:
        """Call once per optimizer step, right after it (after `scaler.update()` with AMP):
        adds the step to the running importance ω, and lets a step-counting or
        loss-watching policy consolidate. `loss`: the training loss of the step (needed by
        `LossPlateau` only; SI's penalty not included)."""
        if self._after_step(loss):
            self.consolidate_now()

    @torch.no_grad()
    def _after_step(self, loss: Optional[Tensor]) -> bool:
        self._in_step = False
        self._task_steps += 1  # the loop's calls, optimizer step or not
        if self._steps_before is not None:
            before, self._steps_before = self._steps_before, None
            if _STEPS.get(self._binding.optimizer, 0) == before:
                self._hold_for_accumulation()
                return False
        elif self._unscaled_by is not None:
            scaler, self._unscaled_by = self._unscaled_by, None
            if not amp.stepped(scaler, self._binding.optimizer):
                self._hold_for_accumulation()
                # the next backward pass adds scaled gradients: scale these back
                amp.rescale_(scaler, self._binding.optimizer, self._found_inf,
                             [p for g in self._groups for p in g.params])
                self._found_inf = None
                return False
        self._accumulating = False
        if self._predicted_lrs is not None:
            self._check_predicted_lrs()
        self._steps_since += 1
        for g in self._groups:
            if g.pending_delta is not None:  # ω −= g·Δθ, Δθ as predicted
                torch._foreach_sub_(g.pick(g.running), g.pending_delta)
                g.pending_delta = None
            if g.step_grads:
                # ω += g·(θ_pre − θ); with "task" g is the task gradient, with "siu" the
                # independent one; "sib": (g_u − g)·(θ − θ_pre), the same call, swapped
                pre, now = g.pick(g.pre), g.pick(g.params)
                lists = (g.pick(g.running), g.step_grads,
                         *((now, pre) if g.step_swap else (pre, now)))
                if g.step_key is not None:
                    g.graphs.run(("after", g.step_key), accumulate_from_pre, *lists)
                else:
                    accumulate_from_pre(*lists)
                if self._importance == "task" and not g.step_kept:  # free now: the next
                    g.spare, g.spare_idx = g.step_grads, g.step_idx  # step writes into them
                g.step_grads = []
        return self._policy.at_step(loss)

    def record_independent_gradient(self, loss: Tensor) -> None:
        """For `importance="siu"` and `"sib"`: the gradient of `loss`, the task loss on a
        mini-batch drawn independently of the step's one (the same size, from the same task),
        at the weights before the step. Call it once per optimizer step, before
        `before_step()`. Computed with `torch.autograd.grad`, so `.grad` is left as it is;
        pass the loss unscaled (no GradScaler). Under DDP each rank's gradient is averaged
        over the ranks, as the step's is."""
        if self._importance not in ("siu", "sib"):
            raise ValueError(f"record_independent_gradient() is for importance='siu' or "
                             f"'sib'; this SI measures with importance={self._importance!r}.")
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise OptionTypeError(f"record_independent_gradient() takes the loss (a 0-d "
                                  f"tensor with a graph), got {type(loss).__name__}"
                                  f"{tuple(loss.shape) if isinstance(loss, Tensor) else ''}.")
        b = self._binding
        if not b.current:
            self._require_model("record_independent_gradient")
            self._sync()
        params = [p for g in self._groups for p in g.params]
        grads = torch.autograd.grad(loss, params, allow_unused=True) if params else ()
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
        for g in self._groups:
            g.indep, k = grads[k:k + len(g.params)], k + len(g.params)

    def end_task(self, experience: Any = None) -> None:
        """Call as a task (or an experience) ends: SI consolidates if its policy says so (by
        default after every task; at the last sub-experience of a task on an online stream)."""
        if self._end_task(experience):
            self.consolidate_now()

    def _end_task(self, experience: Any) -> bool:
        self._require_model("end_task")
        b = self._binding
        if not b.current:
            self._sync()
        if b.changed():
            self._warn_if_unfrozen()
        return self._policy.at_experience_end(experience)

    def consolidate_now(self) -> None:
        r"""Consolidate now, every group at once: `Ω += max(0, ω / ((θ - θ*)² + ξ))`,
        `θ* ← θ`, `ω ← 0`. The `consolidate` policy calls it (after each task by default);
        call it yourself to consolidate at a point of your choosing: between `before_step()`
        and the step, the step counts towards the next period; with no step since the last
        consolidation it does nothing (the count, and so a list of strengths, does not move).

        Raises:
            NonFiniteImportanceError: a new Ω would not be finite. Nothing is stored: every
                group keeps its Ω and θ*, and the running ω of the task is reset, so the task
                can be trained again once the weights are restored.
            RuntimeError: SI holds no parameters to consolidate: it has not trained yet, or not
                since `load_state_dict()` or unpickling. Nothing changes.
        """
        pending = any(g.step_grads for g in self._groups)
        if self._steps_since == 0 and not pending and self._binding.built:
            return  # nothing trained since the last consolidation: Ω, θ*, the count stay
        if not self._binding.built:
            raise RuntimeError(
                f"{self._who}.consolidate_now() was called before the {self._noun} has the model's "
                "parameters: it finds them when training starts, and again after "
                "load_state_dict() or unpickling. Call it after training on what should be "
                "consolidated; nothing was changed.")
        try:
            new = [consolidated_omega(g.omega, g.prev, g.running, g.params, eps=self._eps_of(g),
                                      clamp=self._clamp, sos=self._importance == "sos",
                                      names=[f"{n!r} (SI group {g.label})" for n in g.names],
                                      start=self._state.starts(g.key, g.names, g.prev))
                   for g in self._groups]
        except NonFiniteImportanceError as exc:
            for key in self._state.index:
                self._state.reset_running(key)
            # the task starts again from weights the user restores: a new, empty path
            self._state.clear_path_starts()
            self._steps_since = 0
            for g in self._groups:
                g.step_grads, g.value, g.penalty = [], None, None
            raise NonFiniteImportanceError(
                f"{exc} Nothing was stored: Ω and θ* of earlier tasks are kept and this "
                "task's running importance ω is reset. Restore the weights from before "
                "this task and train it again.") from None
        for g, omega in zip(self._groups, new):
            commit_consolidation(g.omega, g.prev, g.running, g.params, omega)
            self._state.consolidated[g.key] = self._state.consolidated[g.key] or bool(g.params)
            # a step between before_step() and after_step() stays pending: it belongs to the
            # next period, whose θ* is the weights before it
            g.value, g.penalty = None, None
        self._state.clear_path_starts()
        self._steps_since = 0
        self._consolidations += 1
        self._policy.consolidated()
        self._resolve_strengths()

    @torch.no_grad()
    def restart_path(self) -> None:
        r"""The weights were moved since the last consolidation, outside training
        (re-initialised at a task's start, as Benzing's code does): measure this period's
        path from where they are now. The next consolidation then divides ω by
        `(θ − θ_start)² + ξ`, θ_start being the weights at this call, instead of
        `(θ − θ*)² + ξ`; θ*, the penalty's anchor, stays where the last period ended. Keeps
        n numbers until that consolidation (saved with `state_dict()`). With
        `importance="sos"` nothing is kept: SOS does not divide by the path length.

        Raises:
            RuntimeError: SI is not bound to a model, or the period has begun (an optimizer
                step, or a backward pass waiting for one, since the last consolidation): its ω
                belongs to a path from θ*. Call it between the consolidation and the first
                step; nothing was changed.
        """
        self._require_model("restart_path")
        if self._in_step or self._accumulating or self._steps_since or \
                any(g.step_grads for g in self._groups):
            raise RuntimeError(
                f"{self._who}.restart_path() after this period's training began: ω already "
                "holds steps of a path that started at θ*. Call it after the consolidation "
                "and before the first step (at a task's start); nothing was changed.")
        b = self._binding
        if not b.current or b.changed():
            self._sync()
        if self._importance == "sos":
            return
        for g in self._groups:
            index = self._state.index[g.key]
            for name, p in zip(g.names, g.params):
                self._state.mark_path_start(g.key, index[name], p)

    #: how messages name this object and its adapter ("SIPlugin", "the plugin" when an
    #: Avalanche plugin drives it)
    _noun = "engine"
    _cuda_graphs = False  # engines pickled before the option existed
    _owner: Optional[str] = None

    @property
    def _who(self) -> str:
        return self._owner or type(self).__name__
    #: optimizer steps since the last consolidation, and since the task started
    _steps_since = 0
    _task_steps = 0
    #: the policy's state at construction (None in an engine unpickled from 0.2)
    _fresh_policy: Optional[dict] = None
    #: learning rates delta_params predicted the pending step with, per optimizer group
    _predicted_lrs: Optional[list] = None
    #: the optimizer's step count at before_step() (None: not checked, a scaler may skip)
    _steps_before: Optional[int] = None
    #: the scaler before_step() unscaled with, and what it found (inf/NaN: 1), to see whether
    #: it stepped
    _unscaled_by: Optional[torch.amp.GradScaler] = None
    _found_inf: Optional[Tensor] = None
    #: before_step() ran and after_step() has not yet
    _in_step = False
    #: what the loop does between the two calls, for the message when after_step() is missing
    _between_steps = "the loop skipped after_step() or called before_step() twice"
    #: gradients accumulate: the optimizer did not step after the last backward pass
    _accumulating = False

    def _warn_if_unfrozen(self) -> None:
        """A parameter made trainable during the task had no state: say so (it gets state,
        with θ* = its value now, from the next task)."""
        tracked = {(g.key, n) for g in self._groups for n in g.names}
        late = [n for g, n, _ in select(self._binding.model, self._groups, self._excluded,
                                        regularize_norm_layers=self._norms, check_patterns=False)
                if (g.key, n) not in tracked]
        if late:
            warnings.warn(f"{self._who}: parameter(s) {', '.join(map(repr, late))} became "
                          "trainable during this experience; SI regularizes them from the next "
                          "experience on (their importance for this one is 0). Unfreeze "
                          "parameters between experiences to have it measured.", stacklevel=4)
            self._binding.current = False

    # ------------------------------------------------------------------ saving and loading

    def state_dict(self) -> dict[str, Any]:
        """SI's state: every group's buffers and parameter index (tensors cloned), the number of
        consolidations and the consolidation policy's state."""
        return dict(self._state.state_dict(), importance=self._importance,
                    consolidations=self._consolidations, steps_since=self._steps_since,
                    policy={"type": type(self._policy).__name__,
                            "state": self._policy.state_dict()})

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Load a `state_dict()`, checked against these groups and, if SI is bound to a
        model (else when training starts), the model.

        Tensors are copied; they move to the live parameters' device and the state's dtype.
        Nothing changes when an error is raised.

        Args:
            strict: every parameter the state names must be a parameter of the model (as
                `torch.nn.Module.load_state_dict`). With False, state for parameters the
                model lacks is kept unused (it applies if such a parameter appears later).

        Raises:
            ValueError: not an SI state, other groups, missing, inconsistent or non-finite
                buffers, negative Ω under a clamp that forbids it, names the model lacks
                (`strict`), or shapes that do not fit the model's.
        """
        new = SIState(self._state.index, self._state.kinds, self._state_dtype)
        new.load_state_dict(state_dict, clamp=self._clamp, labels=lambda k: self._group(k).label)
        policy = state_dict.get("policy")
        if policy is not None and policy["type"] != type(self._policy).__name__:
            raise ValueError(f"{self._who} state was saved with consolidation policy "
                             f"{policy['type']}, this one has {type(self._policy).__name__}; "
                             "build it with the same consolidate= option.")
        model = self._binding.model
        if model is not None:
            new.check_loaded_names(self._model_names(model), strict=strict)
            for g, name, p in select(model, self._groups, self._excluded,
                                     regularize_norm_layers=self._norms, check_patterns=False):
                new.check_shape(g.key, name, p)
        if policy is not None:
            self._policy.load_state_dict(policy["state"])
        self._state = new
        self._strict = strict
        # states saved before 0.2 lack the count: 1 if anything was consolidated, else 0
        self._consolidations = int(state_dict.get(
            "consolidations", int(any(new.consolidated.values()))))
        self._resolve_strengths()
        for g in self._groups:
            g.clear_lists()
        self._binding.current = self._binding.built = False
        self._binding.state_model = None  # the loaded state belongs to the next model bound
        self._accumulating = False
        # states saved before 0.3 lack it: count them as trained since their last consolidation
        self._steps_since = int(state_dict.get("steps_since", 1))

    def __getstate__(self) -> dict[str, Any]:
        # Pickled (an Avalanche checkpoint pickles the strategy with its plugins): the per-step
        # lists, the model, the optimizer and a found scaler are bound again on the next step.
        state = self.__dict__.copy()
        state["_groups"] = [_Group.__new__(_Group) for _ in self._groups]
        for new, old in zip(state["_groups"], self._groups):
            new.__dict__.update(old.__dict__)
            new.clear_lists()
        state["_binding"] = _Binding()
        state.pop("_unscaled_by", None)  # a step in flight is not part of the state
        state.pop("_found_inf", None)
        state.pop("_in_step", None)
        return state

    def __repr__(self) -> str:
        groups = "" if self.group_names == [None] else f", groups={self.group_names}"
        return (f"{type(self).__name__}(si_lambda={self._si_lambda!r}, eps={self._eps!r}, "
                f"importance={self._importance!r}, clamp={self._clamp!r}, "
                f"consolidate={self._policy!r}{groups})")


#: the engine fields a pickle of SIPlugin 0.2 kept on the plugin itself
_V02_BINDING_FIELDS = ("_dirty", "_signature", "_model", "_param_ids", "_scaler", "_bound")


def engine_from_fields(fields: dict[str, Any]) -> SynapticIntelligence:
    """An engine from the attributes an SIPlugin of version 0.2 kept on itself (its pickles),
    its state kept whole; the binding starts afresh, as after any unpickling."""
    engine = SynapticIntelligence.__new__(SynapticIntelligence)
    kept = {k: v for k, v in fields.items() if k not in _V02_BINDING_FIELDS}
    kept["_binding"] = _Binding()
    kept["_steps_since"] = 1  # unknown: count it as trained since its last consolidation
    engine.__dict__.update(kept)
    return engine
