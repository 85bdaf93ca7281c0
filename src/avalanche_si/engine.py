r"""The SI engine: Synaptic Intelligence for any PyTorch training loop.

`SynapticIntelligence` is the public face of SI between a model and its optimizer: the options
and parameter groups, the loop's four calls, consolidation (by a policy or on demand), the
penalty and the importances, and a validated `state_dict`. It composes rooms of its own and
never imports a training framework: the Avalanche plugin (`avalanche_si.SIPlugin`), the
Lightning callback (`avalanche_si.lightning.SICallback`) and a hand-written loop all drive the
same four calls:

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

The rooms: how importance is measured, `avalanche_si.estimators` (one object per estimator);
what SI is bound to and the per-step lists, `avalanche_si.binding` and `avalanche_si.lists`;
the work around each optimizer step (accumulation, mixed precision, CUDA graphs),
`avalanche_si.step`; the maths, `avalanche_si.functional`; the buffers, `avalanche_si.state`;
which parameters, `avalanche_si.groups`; the options, `avalanche_si.options`; when to
consolidate, `avalanche_si.consolidation`.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from . import amp
from .binding import Binding
from .consolidation import ConsolidationPolicy, check_policy_state, make_policy
from .estimators import Estimator, check_estimator_state, estimator_record, make_estimator
from .functional import DEFAULT_EPS, NonFiniteImportanceError
from .groups import Matcher, ParamGroup, as_patterns
from .legacy import upgraded_engine_state
from .lists import GroupLists
from .options import (
    CLAMP_MODES,
    IMPORTANCE_MODES,
    LIVE_OPTIONS,
    Strength,
    check_choice,
    check_eps,
    check_flag,
    check_state_dtype,
    check_strength,
    positional,
    refuse_attribute,
    strength_at,
)
from .state import KINDS, SIState
from .observe import install as observe_steps
from .step import Stepper, independent_gradients

__all__ = ["SynapticIntelligence", "GroupOptions", "ParamGroup", "IMPORTANCE_MODES",
           "CLAMP_MODES"]

# what pickles of avalanche_si 0.2 and 0.3 name (`avalanche_si.engine._Group`, `._Binding`)
_Group = GroupLists
_Binding = Binding


#: the safety net's warning: a consolidation after which the weights had moved but no Ω grew
UNMEASURED = (
    "{who}: the weights moved since the last consolidation, but no importance Ω grew: SI "
    "measured none of this period's steps, or only steps that increased the loss. Likely "
    "causes: after_step() called before the optimizer step, an update SI cannot see (a "
    "hand-written one between other calls, an optimizer that is no torch.optim.Optimizer), "
    "or an optimizer that maximizes. See the conventions page, 'What SI observes'.")


def _every_parameter(name: str, param: torch.nn.Parameter) -> bool:
    return True


def _make_groups(groups) -> list[GroupLists]:
    if groups is None:
        return [GroupLists(None, _every_parameter, None, None)]
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
        made.append(GroupLists(
            key, matcher,
            None if spec.si_lambda is None else
            check_strength(spec.si_lambda, f"groups[{key!r}].si_lambda"),
            None if spec.eps is None else check_eps(spec.eps, f"groups[{key!r}].eps")))
    return made


def _kinds(estimator: Estimator) -> tuple[str, ...]:
    """The buffers kept per parameter: θ_pre only for estimators that measure the step taken."""
    return KINDS if estimator.weights_before_step else KINDS[:3]


class GroupOptions:
    """The live options of one SI group (`SynapticIntelligence.group()`).

    Assigning `si_lambda` or `eps` is checked like the constructor's and takes effect at the
    next step (strength) or consolidation (damping); `None` follows the engine's value.
    """

    __slots__ = ("_engine", "_group")

    def __init__(self, engine: "SynapticIntelligence", group: GroupLists):
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

            Or an estimator object (`avalanche_si.estimators`: `SOS(decay=0.99)`, or your
            own `Estimator`); each string names one (`ESTIMATORS`).
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


    @positional("model", "optimizer")
    def __init__(self, model: Optional[torch.nn.Module] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None, *,
                 si_lambda: Strength = 1.0, eps: float = DEFAULT_EPS,
                 excluded_parameters: Union[str, Sequence[str], None] = None,
                 groups: Optional[Mapping[str, Union[ParamGroup, Matcher]]] = None,
                 importance: Union[str, Estimator] = "total", clamp: str = "task",
                 regularize_norm_layers: bool = False,
                 state_dtype: Optional[torch.dtype] = None,
                 consolidate: Union[None, str, int, ConsolidationPolicy] = None,
                 scaler: Optional[torch.amp.GradScaler] = None,
                 cuda_graphs: bool = False):
        self._si_lambda = check_strength(si_lambda, "si_lambda")
        self._eps = check_eps(eps, "eps")
        self._estimator = make_estimator(importance)
        self._clamp = check_choice(clamp, CLAMP_MODES, "clamp")
        self._excluded = as_patterns(excluded_parameters or (), "excluded_parameters")
        self._norms = check_flag(regularize_norm_layers, "regularize_norm_layers")
        self._state_dtype = check_state_dtype(state_dtype)
        self._cuda_graphs = check_flag(cuda_graphs, "cuda_graphs")
        self._scaler_option = amp.check_scaler(scaler)
        self._policy = make_policy(consolidate)
        self._fresh_policy = self._policy.state_dict()  # what reset() restores
        self._groups = _make_groups(groups)
        self._state = SIState([g.key for g in self._groups], _kinds(self._estimator),
                              self._state_dtype)
        self._consolidations = 0       # the index that lists of strengths are read at
        self._resolve_strengths()
        self._binding = Binding()
        self._stepper = Stepper(self._estimator, self._cuda_graphs)
        if model is not None:
            self.bind(model, optimizer)
        elif optimizer is not None:
            raise TypeError("SynapticIntelligence got an optimizer but no model; pass both, or "
                            "bind(model, optimizer) later.")

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
            self._state.clamp_omega()
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
        """Which gradient and step measure ω: the estimator's name (`"total"`, `"sos"`, ...)."""
        return self._estimator.name or type(self._estimator).__name__

    @property
    def estimator(self) -> Estimator:
        """The importance estimator (`avalanche_si.estimators`) that `importance` names."""
        return self._estimator

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

    def _eps_of(self, g: GroupLists) -> float:
        return self._eps if g.eps is None else g.eps

    # ------------------------------------------------------------------ public state

    @property
    def penalty(self) -> Optional[Tensor]:
        """The SI penalty `Σ_g c_g Σ Ω (θ - θ*)²` at the last
        step (0-d tensor on the parameters' device), or None before the first consolidation,
        right after one, or when every strength is 0. Computed on first read, so a loop that
        never reads it does not pay for it."""
        values = [v for v in (g.penalty_value() for g in self._groups) if v is not None]
        return torch.stack(values).sum() if values else None

    @property
    def group_names(self) -> list[Optional[str]]:
        """The groups' names (`None` for the default group)."""
        return [g.key for g in self._groups]

    def importances(self, group: Optional[str] = None) -> dict[str, Tensor]:
        r"""The consolidated importances Ω of one group, by parameter name.

        The tensors are the live state: read, do not modify them.
        """
        g = self._group(group)
        return {name: g.globalize(name, self._state.get(g.key, "omega", i))
                for name, i in self._state.index[g.key].items()}

    def _group(self, key: Optional[str]) -> GroupLists:
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
        self._binding.bind(model, optimizer, scaler, carry_state=carry_state, who=self._who,
                           consolidations=self._consolidations)
        observe_steps()
        return self

    def reset(self) -> None:
        """Forget everything learnt: Ω, θ*, ω, the consolidation count and the policy's state;
        the options stay. For a new run (another seed) with the same SI object; the next
        `bind()` may then name any model."""
        if self._fresh_policy is None:
            raise RuntimeError("this SI object was unpickled from avalanche_si 0.2 and cannot "
                               "restore its policy's initial state; build a new one.")
        self._state = SIState([g.key for g in self._groups], self._state.kinds, self._state_dtype)
        self._consolidations = 0
        self._stepper = Stepper(self._estimator, self._cuda_graphs)
        self._policy.load_state_dict(self._fresh_policy)
        for g in self._groups:
            g.clear_lists()
        self._resolve_strengths()
        self._binding = Binding()

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

    def _sync(self) -> None:
        """Rebuild the per-step lists (the binding's work), keeping the CUDA graphs captured on
        tensors the new lists hold again."""
        kept = self._stepper.graphs_of(self._groups)
        self._binding.sync(self._groups, self._state, self._estimator, excluded=self._excluded,
                           norms=self._norms, eps_of=self._eps_of, who=self._who,
                           scalers=(self._scaler_in_use(),))
        self._stepper.keep_graphs(self._groups, kept)
        self._stepper.watch.track(p for g in self._groups for p in g.owners)

    def _read_model(self) -> None:
        """Build the lists if SI is bound to a model it has not read (after a load)."""
        if self._binding.model is not None and not self._binding.built:
            self._sync()

    def _scaler_in_use(self) -> Optional[torch.amp.GradScaler]:
        b = self._binding
        return self._scaler_option or b.scaler or b.wrapper_scaler

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
        self._binding.require_model("start_task", type(self).__name__)
        if self._estimator.predicted_step:  # it needs the optimizer: say so at once
            self._estimator.prepare(self._binding.inner, ())
        b = self._binding
        if not b.current or b.changed():
            self._sync()
        self._stepper.start_task()
        return self._policy.at_experience_start(experience)

    @torch.no_grad()
    def before_step(self) -> None:
        """Call once per optimizer step, after the (last) backward pass and before gradient
        clipping and `optimizer.step()` (or `scaler.step`): unscales the gradients when a
        scaler is in use, adds the penalty's gradient and keeps the weights before the step.
        Under gradient accumulation, call it after the last of the k backward passes, or after
        each with `after_step()` after each: SI sees that the optimizer did not step and
        carries the step over (`"total"` and `"task"`; the other estimators refuse)."""
        self._stepper.enter(self._who, self._between_steps)
        if not self._binding.current:
            self._binding.require_model("before_step", type(self).__name__)
            self._sync()
        self._stepper.before(self._groups, self._binding, self._scaler_in_use(),
                             self._state.consolidated)

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
        if not self._stepper.after(self._groups, self._binding, self._scaler_in_use(),
                                   self._who):
            return False
        return self._policy.at_step(loss)

    def record_independent_gradient(self, loss: Tensor) -> None:
        """For estimators that measure with an independent mini-batch (`importance="siu"`,
        `"sib"`): the gradient of `loss`, the task loss on a mini-batch drawn independently of
        the step's one (the same size, from the same task), at the weights before the step.
        Call it once per optimizer step, before `before_step()`. Computed with
        `torch.autograd.grad`, so `.grad` is left as it is; pass the loss unscaled (no
        GradScaler). Under DDP each rank's gradient is averaged over the ranks, as the step's
        is."""
        if not self._estimator.independent_gradient:
            raise ValueError(f"record_independent_gradient() is for importance='siu' or "
                             f"'sib' (estimators that need an independent gradient); this SI "
                             f"measures with importance={self.importance!r}.")
        if not self._binding.current:
            self._binding.require_model("record_independent_gradient", type(self).__name__)
            self._sync()
        independent_gradients(self._groups, loss)

    def end_task(self, experience: Any = None) -> None:
        """Call as a task (or an experience) ends: SI consolidates if its policy says so (by
        default after every task; at the last sub-experience of a task on an online stream)."""
        if self._end_task(experience):
            self.consolidate_now()

    def _end_task(self, experience: Any) -> bool:
        b = self._binding
        b.require_model("end_task", type(self).__name__)
        self._stepper.check_task_end(self._who)
        if not b.current:
            self._sync()
        if b.changed():
            b.warn_if_unfrozen(self._groups, excluded=self._excluded, norms=self._norms,
                               who=self._who)
        return self._policy.at_experience_end(experience)

    def consolidate_now(self) -> None:
        r"""Consolidate now, every group at once: `Ω += max(0, ω / ((θ - θ*)² + ξ))`,
        `θ* ← θ`, `ω ← 0` (with the estimator's contribution in place of
        `ω / ((θ - θ*)² + ξ)`). The `consolidate` policy calls it (after each task by default);
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
        groups, stepper = self._groups, self._stepper
        if stepper.steps_since == 0 and not stepper.pending(groups) and self._binding.built:
            return  # nothing trained since the last consolidation: Ω, θ*, the count stay
        self._binding.require_built(f"{self._who}.consolidate_now()", self._noun)
        try:
            unmeasured = self._state.consolidate(groups, contribution=self._estimator.contribution,
                                                 clamp=self._clamp, eps_of=self._eps_of)
        except NonFiniteImportanceError:
            for g in groups:  # the step in flight is dropped with the task's ω
                g.measure = None
            raise
        finally:
            stepper.steps_since = 0
            for g in groups:
                # a step between before_step() and after_step() stays pending: it belongs to
                # the next period, whose θ* is the weights before it
                g.value, g.penalty = None, None
        if unmeasured:
            warnings.warn(UNMEASURED.format(who=self._who), stacklevel=2)
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
        n numbers until that consolidation (saved with `state_dict()`). With an estimator
        that does not divide by the path length (`importance="sos"`) nothing is kept.

        Raises:
            RuntimeError: SI is not bound to a model, or the period has begun (an optimizer
                step, or a backward pass waiting for one, since the last consolidation): its ω
                belongs to a path from θ*. Call it between the consolidation and the first
                step; nothing was changed.
        """
        b = self._binding
        b.require_model("restart_path", type(self).__name__)
        self._stepper.check_period_not_begun(self._groups, f"{self._who}.restart_path()")
        if not b.current or b.changed():
            self._sync()
        if self._estimator.path_length:  # else the consolidation does not read a start
            self._state.mark_path_starts(self._groups)

    #: how messages name this object and its adapter ("SIPlugin", "the plugin" when an
    #: Avalanche plugin drives it), and what the loop does between the two step calls, for the
    #: message when after_step() is missing
    _noun = "engine"
    _owner: Optional[str] = None
    _between_steps = "the loop skipped after_step() or called before_step() twice"

    @property
    def _who(self) -> str:
        return self._owner or type(self).__name__

    @property
    def _steps_since(self) -> int:
        """Optimizer steps since the last consolidation."""
        return self._stepper.steps_since

    def _skip_step(self) -> None:
        """For an adapter: the optimizer step about to come moves nothing SI regularizes (no
        gradient): no need to measure it."""
        self._stepper.watch.skip()

    def _step_taken(self) -> bool:
        """For an adapter: `before_step()` ran and an optimizer has stepped SI's parameters
        since, `after_step()` still to come."""
        return self._stepper.watch.taken()

    # ------------------------------------------------------------------ saving and loading

    def state_dict(self) -> dict[str, Any]:
        """SI's state: every group's buffers and parameter index (tensors cloned), the number of
        consolidations and the consolidation policy's state. On a sharded model the buffers are
        DTensors laid out like their parameters, for `torch.distributed.checkpoint`; SI bound
        to a model it has not yet read reads it first, so that the state has every buffer
        (what `torch.distributed.checkpoint.load` loads into)."""
        self._read_model()
        return dict(self._state.state_dict(lambda key, name, t: self._group(key).globalize(
                        name, t)), importance=self.importance,
                    estimator=estimator_record(self._estimator),
                    consolidations=self._consolidations, steps_since=self._stepper.steps_since,
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
                (`strict`), shapes that do not fit the model's, or a period in progress
                measured by another estimator (its running measure is that estimator's).
        """
        new = SIState(self._state.index, self._state.kinds, self._state_dtype)
        new.load_state_dict(state_dict, clamp=self._clamp, labels=lambda k: self._group(k).label)
        check_estimator_state(self._estimator, state_dict, self._who)
        policy = check_policy_state(self._policy, state_dict.get("policy"), self._who)
        b = self._binding
        b.check_loaded(new, self._groups, excluded=self._excluded, norms=self._norms,
                       strict=strict)
        if policy is not None:
            self._policy.load_state_dict(policy["state"])
        self._state = new
        # states saved before 0.2 lack the count: 1 if anything was consolidated, else 0
        self._consolidations = int(state_dict.get(
            "consolidations", int(any(new.consolidated.values()))))
        self._resolve_strengths()
        for g in self._groups:
            g.clear_lists()
        b.current = b.built = False
        b.strict = strict
        b.state_model = None  # the loaded state belongs to the next model bound
        self._stepper.accumulating = False
        # states saved before 0.3 lack it: count them as trained since their last consolidation
        self._stepper.steps_since = int(state_dict.get("steps_since", 1))

    def __getstate__(self) -> dict[str, Any]:
        # Pickled (an Avalanche checkpoint pickles the strategy with its plugins): the per-step
        # lists, the model, the optimizer and a found scaler are bound again on the next step.
        return dict(self.__dict__, _groups=[g.emptied() for g in self._groups],
                    _binding=self._binding.fresh())

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(upgraded_engine_state(state))  # also what 0.2 and 0.3 pickled

    def __repr__(self) -> str:
        groups = "" if self.group_names == [None] else f", groups={self.group_names}"
        est = self._estimator  # a string where it names the estimator with its defaults
        named = est.name in IMPORTANCE_MODES and est == make_estimator(est.name)
        importance = repr(est.name) if named else repr(est)
        return (f"{type(self).__name__}(si_lambda={self._si_lambda!r}, eps={self._eps!r}, "
                f"importance={importance}, clamp={self._clamp!r}, "
                f"consolidate={self._policy!r}{groups})")


#: the engine fields a pickle of SIPlugin 0.2 kept on the plugin itself
_V02_BINDING_FIELDS = ("_dirty", "_signature", "_model", "_param_ids", "_scaler", "_bound")


def engine_from_fields(fields: dict[str, Any]) -> SynapticIntelligence:
    """An engine from the attributes an SIPlugin of version 0.2 kept on itself (its pickles),
    its state kept whole; the binding starts afresh, as after any unpickling."""
    engine = SynapticIntelligence.__new__(SynapticIntelligence)
    kept = {k: v for k, v in fields.items() if k not in _V02_BINDING_FIELDS}
    kept["_steps_since"] = 1  # unknown: count it as trained since its last consolidation
    engine.__setstate__(kept)
    return engine
