r"""Synaptic Intelligence as an Avalanche plugin: the hooks.

The plugin translates Avalanche's callbacks into calls of the list kernels of
:mod:`avalanche_si.functional`; the maths lives there. Which parameters and names:
:mod:`avalanche_si.groups`; the state, its growth and its checks: :mod:`avalanche_si.state`;
the options: :mod:`avalanche_si.options`; mixed precision: :mod:`avalanche_si.amp`.

Per training step it makes two passes over memory (after the backward pass: the penalty's
gradient and the copy of the weights before the step; after the step: the running
importance), as one-pass C kernels on contiguous float32 CPU tensors and as fused
``torch._foreach_*`` operations elsewhere, over lists it builds once per experience: no name
matching, no Python arithmetic loop over parameters, no host copies, no host
synchronisation.
"""

from __future__ import annotations

import difflib
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor
from avalanche.core import SupervisedPlugin

from . import amp
from .consolidation import ConsolidationPolicy, make_policy
from .functional import (
    CLAMP_MODES,
    DEFAULT_EPS,
    NonFiniteImportanceError,
    accumulate_from_delta,
    accumulate_from_pre,
    commit_consolidation,
    consolidated_omega,
    penalty_step,
)
from .groups import Matcher, ParamGroup, as_patterns, canonical_name, matches, select, unwrap
from .optim_step import StepPredictor, check_optimizer_supported
from .options import (
    IMPORTANCE_MODES,
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

__all__ = ["SIPlugin", "ParamGroup", "GroupOptions", "IMPORTANCE_MODES", "CLAMP_MODES"]


def _every_parameter(name: str, param: torch.nn.Parameter) -> bool:
    return True


class _Group:
    """One group's configuration and its per-experience lists."""

    def __init__(self, key: Optional[str], matcher, si_lambda: Optional[Strength],
                 eps: Optional[float]):
        self.key = key                    # None: the default group (buffer names without _name)
        self.matcher = matcher
        self.si_lambda = si_lambda        # None: the plugin's
        self.eps = eps                    # None: the plugin's
        self.c = 0.0                      # the strength in use (resolved per experience)
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
        self.value: Optional[Callable[[], Tensor]] = None  # the last step's penalty value...
        self.penalty: Optional[Tensor] = None              # ... computed when first read

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


class GroupOptions:
    """The live options of one SI group (:meth:`SIPlugin.group`): assigning ``si_lambda`` or
    ``eps`` is checked like the constructor's and takes effect at the next step
    (strength) or consolidation (damping); ``None`` follows the plugin's value."""

    __slots__ = ("_plugin", "_group")

    def __init__(self, plugin: "SIPlugin", group: _Group):
        self._plugin, self._group = plugin, group

    @property
    def key(self) -> Optional[str]:
        return self._group.key

    @property
    def names(self) -> list[str]:
        """The parameters the group regularizes in the current experience."""
        return list(self._group.names)

    @property
    def si_lambda(self) -> Optional[Strength]:
        return self._group.si_lambda

    @si_lambda.setter
    def si_lambda(self, value) -> None:
        self._group.si_lambda = None if value is None else \
            check_strength(value, f"groups[{self.key!r}].si_lambda")
        self._plugin._resolve_strengths()

    @property
    def eps(self) -> Optional[float]:
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
_LIVE = ("si_lambda", "eps", "clamp", "scaler")
_FIXED = {
    "consolidate": "its state is part of the plugin's",
    "importance": "the state it keeps depends on it",
    "excluded_parameters": "which parameters have state depends on it",
    "groups": "the state is named by group",
    "regularize_norm_layers": "which parameters have state depends on it",
    "state_dtype": "the state is stored in it",
}


class SIPlugin(SupervisedPlugin, supports_distributed=True):
    r"""Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017) for any Avalanche strategy.

    For every regularized weight :math:`\theta_k`:

    - after each optimizer step: :math:`\omega_k \leftarrow \omega_k - g_k \Delta\theta_k`;
    - after each experience: :math:`\Omega_k \leftarrow \Omega_k + \max(0, \omega_k /
      ((\theta_k - \theta^*_k)^2 + \xi))`, :math:`\theta^*_k \leftarrow \theta_k`,
      :math:`\omega_k \leftarrow 0` (:math:`\theta^*` of the first experience is the
      weights when it starts);
    - from the second experience on the loss gets
      :math:`c \sum_k \Omega_k (\theta_k - \theta^*_k)^2` (no :math:`\tfrac12`).

    The penalty's gradient :math:`2c\,\Omega \odot (\theta - \theta^*)` is added in closed
    form after the backward pass (``after_backward``), so no graph is built for it; its
    value at the last step is :attr:`penalty` (computed when read, for logging; it is not
    part of ``strategy.loss``). A plugin that rewrites gradients in its own
    ``after_backward`` sees the penalty's gradient if it comes after this plugin in the
    strategy's list, not if it comes before.

    Memory: :math:`\Omega`, :math:`\theta^*`, :math:`\omega` and the weights before the
    step, ``4n`` numbers for ``n`` regularized weights (``3n`` with
    ``importance="delta_params"``), on each parameter's device, in the weights' dtype
    (float32 for 16-bit weights; see ``state_dtype``). The state lives in the plugin, not
    in the model: ``model.state_dict()`` is unchanged.

    Args:
        si_lambda: the strength :math:`c` of the penalty (>= 0; 0 switches the penalty
            off and leaves training bit-identical to training without the plugin). A list
            gives one strength per experience (the last repeats), a callable
            ``(experience_index) -> c`` computes it, as Avalanche's plugin allows; the index
            counts the consolidations so far (on an ordinary stream: the experiences
            trained; on an online stream: the tasks, not the mini-experiences).
        eps: the damping :math:`\xi > 0` of the consolidation (default 1e-3).
        excluded_parameters: name patterns (see :class:`ParamGroup`) of parameters never
            regularized.
        groups: parameter groups, ``{name: ParamGroup(...)}`` (a bare pattern list or
            callable stands for ``ParamGroup(params=...)``), each with its own strength
            and damping, its state named ``si_omega_<name>_weights_<i>`` and so on. A
            parameter may belong to one group only; parameters in no group are not
            regularized. Default: one group holding every trainable parameter, named
            ``si_omega_weights_<i>``.
        importance: which gradient and step measure the importance :math:`\omega`:

            - ``"total"``: the gradient the optimizer used (task loss, SI penalty and any
              other plugin's terms) times the step taken;
            - ``"task"``: the gradient without the SI penalty, as this plugin's
              ``after_backward`` finds it (after the backward pass and any plugin listed
              before this one, never what a plugin after it does), times the step taken
              (Zenke et al.'s code);
            - ``"delta_params"``: the same gradient times the step the optimizer would take
              from it alone, predicted from its state (SGD, Adam, AdamW, RMSprop; 3n memory).
        clamp: where the consolidation's :math:`\max(0, \cdot)` goes, to match each
            existing implementation:

            - ``"task"`` (default, the design this package follows): on each experience's
              contribution, :math:`\Omega \leftarrow \Omega + \max(0, \omega / (\Delta^2 + \xi))`;
            - ``"total"`` (Zenke et al.'s code): on the running total,
              :math:`\Omega \leftarrow \max(0, \Omega + \omega / (\Delta^2 + \xi))`;
            - ``"none"`` (van de Ven's code): no clamp; :math:`\Omega` may become
              negative, and the penalty then pushes those weights *away* from
              :math:`\theta^*`.
        regularize_norm_layers: also regularize the parameters of normalization layers
            (``BatchNorm``, ``InstanceNorm``: torch's ``_NormBase``). Default False, as
            Avalanche's ``SynapticIntelligencePlugin``; ``LayerNorm``/``GroupNorm`` are
            ordinary layers either way.
        state_dtype: the dtype of the state; None (default) keeps it in float32 for
            float16/bfloat16 weights (so that ω and Ω accumulate accurately) and in the
            weights' dtype otherwise; ``torch.float32`` or ``torch.float64`` force one.
        consolidate: when to consolidate (:mod:`avalanche_si.consolidation`): None (default)
            after each experience, or at the real task boundaries of an online stream that
            shows them (an error on one that hides them); ``"experience"`` after every
            experience, online ones included; ``"boundary"`` at task boundaries only; an
            ``int`` k every k optimizer steps (van de Ven's task-free SI); or a
            :class:`~avalanche_si.consolidation.LossPlateau` (Aljundi et al. 2019).
        scaler: the ``torch.amp.GradScaler`` that scales the loss, for mixed-precision
            training. None (default) uses the strategy's own if it has one as an
            attribute. The plugin unscales the gradients in ``after_backward`` (as PyTorch
            documents for gradient clipping: plugins after it see unscaled gradients and
            must not unscale again), so the penalty acts at the right scale, ω uses
            unscaled gradients and steps the scaler skips add nothing to ω.

    ``si_lambda``, ``eps``, ``clamp`` and ``scaler`` may be assigned during training
    (checked like here; the strength applies from the next step, the damping and clamp at
    the next consolidation); so may each group's (:meth:`group`). The other options are
    fixed: assigning them, or an unknown name, raises ``AttributeError``.

    Raises:
        ValueError: on a bad option, here; when training starts, on an unsupported
            optimizer for ``"delta_params"``, a parameter in two groups, a group that
            matches no parameter, or a state that does not fit the model.

    Example:
        >>> from avalanche.training import Naive
        >>> from avalanche_si import SIPlugin
        >>> si = SIPlugin(si_lambda=1.0, eps=0.1)
        >>> strategy = Naive(model=model, optimizer=optimizer, plugins=[si])  # doctest: +SKIP
        >>> for experience in benchmark.train_stream:                          # doctest: +SKIP
        ...     strategy.train(experience)
    """

    def __init__(self, si_lambda: Strength = 1.0, *, eps: float = DEFAULT_EPS,
                 excluded_parameters: Union[str, Sequence[str], None] = None,
                 groups: Optional[Mapping[str, Union[ParamGroup, Matcher]]] = None,
                 importance: str = "total", clamp: str = "task",
                 regularize_norm_layers: bool = False,
                 state_dtype: Optional[torch.dtype] = None,
                 consolidate: Union[None, str, int, ConsolidationPolicy] = None,
                 scaler: Optional[torch.amp.GradScaler] = None):
        super().__init__()
        self._si_lambda = check_strength(si_lambda, "si_lambda")
        self._eps = check_eps(eps, "eps")
        self._importance = check_choice(importance, IMPORTANCE_MODES, "importance")
        self._clamp = check_choice(clamp, CLAMP_MODES, "clamp")
        self._excluded = as_patterns(excluded_parameters or (), "excluded_parameters")
        self._norms = check_flag(regularize_norm_layers, "regularize_norm_layers")
        self._state_dtype = check_state_dtype(state_dtype)
        self._scaler_option = amp.check_scaler(scaler)
        self._policy = make_policy(consolidate)
        self._groups = self._make_groups(groups)
        kinds = KINDS[:3] if importance == "delta_params" else KINDS
        self._state = SIState([g.key for g in self._groups], kinds, self._state_dtype)
        self._consolidations = 0       # the index that lists of strengths are read at
        self._resolve_strengths()
        self._dirty = True
        self._signature: tuple = ()    # the model, optimizer and trainable flags last synced
        self._patterns_checked = False
        self._strict = True
        self._model: Optional[torch.nn.Module] = None
        self._param_ids: tuple[int, ...] = ()
        self._scaler: Optional[torch.amp.GradScaler] = None
        self._bound = False            # the per-group lists hold this model's parameters

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
        """The strength :math:`c`: a number, a tuple (one per experience) or a callable."""
        return self._si_lambda

    @si_lambda.setter
    def si_lambda(self, value) -> None:
        self._si_lambda = check_strength(value, "si_lambda")
        self._resolve_strengths()

    @property
    def eps(self) -> float:
        """The damping :math:`\\xi` (used at the next consolidation)."""
        return self._eps

    @eps.setter
    def eps(self, value) -> None:
        self._eps = check_eps(value, "eps")

    @property
    def clamp(self) -> str:
        return self._clamp

    @clamp.setter
    def clamp(self, value) -> None:
        self._clamp = check_choice(value, CLAMP_MODES, "clamp")

    @property
    def scaler(self) -> Optional[torch.amp.GradScaler]:
        """The GradScaler passed in (None: the strategy's own, found when training starts)."""
        return self._scaler_option

    @scaler.setter
    def scaler(self, value) -> None:
        self._scaler_option = amp.check_scaler(value)
        self._dirty = True

    importance = property(lambda self: self._importance, doc="Which gradient and step measure ω.")
    consolidate = property(lambda self: self._policy, doc="When SI consolidates (a policy).")
    consolidations = property(lambda self: self._consolidations, doc=(
        "How many times SI has consolidated so far (the index a list of strengths is read "
        "at); on a task-free stream, check that the policy keeps firing."))
    excluded_parameters = property(lambda self: self._excluded)
    regularize_norm_layers = property(lambda self: self._norms)
    state_dtype = property(lambda self: self._state_dtype)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or name in _LIVE:
            super().__setattr__(name, value)
        elif name in _FIXED:
            raise AttributeError(
                f"SIPlugin.{name} cannot change after construction ({_FIXED[name]}); build a "
                f"new SIPlugin(..., {name}=...) and load this one's state_dict() into it.")
        elif isinstance(getattr(type(self), name, None), property):
            raise AttributeError(f"SIPlugin.{name} is read-only: SI keeps it.")
        else:
            close = difflib.get_close_matches(name, _LIVE + tuple(_FIXED), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise AttributeError(f"SIPlugin has no option {name!r}{hint} Options that may "
                                 f"change during training: {', '.join(_LIVE)}.")

    def group(self, key: Optional[str] = None) -> GroupOptions:
        """The live options of group ``key`` (None: the default group)."""
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
        """The SI penalty :math:`\\sum_g c_g \\sum \\Omega (\\theta - \\theta^*)^2` at the last
        step (0-d tensor on the parameters' device), or None before the first consolidation,
        right after one, or when every strength is 0. Computed on first read, so a loop that
        never reads it does not pay for it: from per-tensor sums the fused CPU kernel keeps (in
        float64), or on the ``_foreach`` path in a few passes over the weights."""
        values = []
        for g in self._groups:
            if g.value is not None:
                if g.penalty is None:  # computed on demand: training does not pay for it
                    g.penalty = g.value()
                values.append(g.penalty)
        return torch.stack(values).sum() if values else None

    @property
    def group_names(self) -> list[Optional[str]]:
        """The groups' names (``None`` for the default group)."""
        return [g.key for g in self._groups]

    def importances(self, group: Optional[str] = None) -> dict[str, Tensor]:
        r"""The consolidated importances :math:`\Omega` of one group, by parameter name.

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

    # ------------------------------------------------------------- building the lists

    def _sync(self, strategy) -> None:
        """Match the model's parameters to groups and state; build the per-step lists.

        Runs once per experience (and after an evaluation changed the model), never
        per step. New parameters get Ω = 0 and θ* = their current value; a grown one keeps
        its state for the old slice.
        """
        model = strategy.model
        selected = select(model, self._groups, self._excluded,
                          regularize_norm_layers=self._norms,
                          check_patterns=not self._patterns_checked)
        self._patterns_checked = True
        self._state.check_loaded_names(self._model_names(model), strict=self._strict)
        for g in self._groups:
            g.clear_lists()
        for g, name, p in selected:
            i = self._state.track(g.key, name, p)
            g.names.append(name)
            g.params.append(p)
            g.omega.append(self._state.get(g.key, "omega", i))
            g.prev.append(self._state.get(g.key, "prev_theta", i))
            g.running.append(self._state.get(g.key, "running_omega", i))
            if self._importance != "delta_params":
                g.pre.append(self._state.get(g.key, "pre_step_theta", i))
        for g in self._groups:
            if g.omega:
                check_eps_for_dtype(self._eps_of(g), g.omega[0].dtype,
                                    "eps" if g.eps is None else f"groups[{g.key!r}].eps")
            if self._importance == "delta_params":
                g.predictor = StepPredictor(strategy.optimizer, g.params) if g.params else None
        self._scaler = self._scaler_option or amp.find_scaler(strategy)
        self._model = model
        self._param_ids = tuple(id(p) for p in model.parameters())
        self._signature = self._signature_of(strategy)
        self._dirty = False
        self._bound = True

    @staticmethod
    def _signature_of(strategy) -> tuple:
        """What the lists depend on: an online stream starts hundreds of experiences, and
        the lists are rebuilt only when this changes."""
        opt = getattr(strategy, "optimizer", None)
        return (id(strategy.model), id(opt),
                tuple(id(g) for g in getattr(opt, "param_groups", ())),
                tuple((id(p), p.requires_grad) for p in strategy.model.parameters()))

    @staticmethod
    def _model_names(model: torch.nn.Module) -> set[str]:
        return {canonical_name(n) for n, _ in unwrap(model).named_parameters()}

    def _ensure_synced(self, strategy) -> None:
        if self._dirty or strategy.model is not self._model:
            self._sync(strategy)

    # -------------------------------------------------------------------- the hooks

    def before_training_exp(self, strategy, **kwargs) -> None:
        if self._importance == "delta_params":
            check_optimizer_supported(strategy.optimizer)
        if self._dirty or self._signature != self._signature_of(strategy):
            self._sync(strategy)
        if self._policy.at_experience_start(getattr(strategy, "experience", None)):
            self.consolidate_now()  # a task boundary seen as the next task starts

    def after_eval(self, strategy, **kwargs) -> None:
        # Evaluation may adapt the model (new heads, grown classifiers): rebuild the
        # lists before the next training step if the parameter objects changed.
        if tuple(id(p) for p in strategy.model.parameters()) != self._param_ids:
            self._dirty = True

    @torch.no_grad()
    def after_backward(self, strategy, **kwargs) -> None:
        self._ensure_synced(strategy)
        found_inf = None
        if self._scaler is not None:
            found_inf = amp.unscale_(self._scaler, strategy.optimizer,
                                     [p for g in self._groups for p in g.params])
        for g in self._groups:
            if g.params:
                self._after_backward_group(g, found_inf)

    def _after_backward_group(self, g: _Group, found_inf: Optional[Tensor]) -> None:
        grads = [p.grad for p in g.params]
        idx = None
        if any(gr is None for gr in grads):
            # Parameters without a gradient this step (another task's head) are skipped:
            # the optimizer does not move them, so neither their importance nor their
            # penalty changes, and giving them a zero gradient would let a stateful
            # optimizer move them on old momentum.
            idx = [k for k, gr in enumerate(grads) if gr is not None]
            grads = [grads[k] for k in idx]
        g.step_idx, g.step_grads, g.value, g.penalty = idx, [], None, None
        if not grads:
            return
        params = g.pick(g.params)
        # The weights before the step are recorded here, in the pass that reads them for
        # the penalty anyway (the optimizer step is what follows; a plugin that moves the
        # weights between the backward pass and the step has its move counted as part of it).
        pre = None if self._importance == "delta_params" else g.pick(g.pre)
        if self._importance == "delta_params":  # measured before the penalty joins the gradient
            delta = g.predictor.predict(grads, mask=idx)
            if found_inf is not None:  # a step the scaler skips moves nothing
                torch._foreach_mul_(delta, 1.0 - found_inf)
            accumulate_from_delta(g.pick(g.running), grads, delta)
        task = self._importance == "task"
        if self._state.consolidated[g.key] and g.c != 0.0:
            # "task": the optimizer gets new gradient tensors with the penalty added; the
            # task gradients stay in g.step_grads for ω.
            total, g.value = penalty_step(grads, g.pick(g.omega), params, g.pick(g.prev),
                                          strength=g.c, pre=pre, in_place=not task)
            if task:
                for p, t in zip(params, total):
                    p.grad = t
        else:
            if pre is not None:
                torch._foreach_copy_(pre, params)  # no_grad: no detach needed
            if task:  # as above, so that ω never sees what a later plugin does to .grad
                for p, gr in zip(params, grads):
                    p.grad = gr.clone()
        if pre is not None:
            g.step_grads = grads

    @torch.no_grad()
    def after_update(self, strategy, **kwargs) -> None:
        for g in self._groups:
            if g.step_grads:
                # ω += g·(θ_pre − θ); with "task" g is the task gradient
                accumulate_from_pre(g.pick(g.running), g.step_grads, g.pick(g.pre),
                                    g.pick(g.params))
                g.step_grads = []
        if self._policy.at_step(getattr(strategy, "loss", None)):
            self.consolidate_now()

    def after_training_exp(self, strategy, **kwargs) -> None:
        self._ensure_synced(strategy)
        if self._signature != self._signature_of(strategy):
            self._warn_if_unfrozen(strategy.model)
        if self._policy.at_experience_end(getattr(strategy, "experience", None)):
            self.consolidate_now()

    def consolidate_now(self) -> None:
        r"""Consolidate now, every group at once: :math:`\Omega \mathrel{+}= \max(0, \omega /
        ((\theta - \theta^*)^2 + \xi))`, :math:`\theta^* \leftarrow \theta`, :math:`\omega
        \leftarrow 0`. The ``consolidate`` policy calls it (after each experience by
        default); call it yourself to consolidate at a point of your choosing.

        Raises:
            NonFiniteImportanceError: a new Ω would not be finite. Nothing is stored: every
                group keeps its Ω and θ*, and the running ω of the experience is reset, so
                the experience can be trained again once the weights are restored.
            RuntimeError: the plugin holds no parameters to consolidate: it has not trained
                yet, or not since :meth:`load_state_dict` or unpickling (it finds the model's
                parameters when training starts). Nothing changes.
        """
        if not self._bound:
            raise RuntimeError(
                "SIPlugin.consolidate_now() was called before the plugin has the model's "
                "parameters: it finds them when training starts, and again after "
                "load_state_dict() or unpickling. Call it after training on what should be "
                "consolidated; nothing was changed.")
        try:
            new = [consolidated_omega(g.omega, g.prev, g.running, g.params, eps=self._eps_of(g),
                                      clamp=self._clamp,
                                      names=[f"{n!r} (SI group {g.label})" for n in g.names])
                   for g in self._groups]
        except NonFiniteImportanceError as exc:
            for key in self._state.index:
                self._state.reset_running(key)
            for g in self._groups:
                g.step_grads, g.value, g.penalty = [], None, None
            raise NonFiniteImportanceError(
                f"{exc} Nothing was stored: Ω and θ* of earlier experiences are kept and this "
                "experience's running importance ω is reset. Restore the weights from before "
                "this experience and train it again.") from None
        for g, omega in zip(self._groups, new):
            commit_consolidation(g.omega, g.prev, g.running, g.params, omega)
            self._state.consolidated[g.key] = self._state.consolidated[g.key] or bool(g.params)
            g.step_grads, g.value, g.penalty = [], None, None
        self._consolidations += 1
        self._policy.consolidated()
        self._resolve_strengths()

    def _warn_if_unfrozen(self, model: torch.nn.Module) -> None:
        """A parameter made trainable during the experience had no state: say so (it gets
        state, with θ* = its value now, from the next experience)."""
        tracked = {(g.key, n) for g in self._groups for n in g.names}
        late = [n for g, n, _ in select(model, self._groups, self._excluded,
                                        regularize_norm_layers=self._norms, check_patterns=False)
                if (g.key, n) not in tracked]
        if late:
            warnings.warn(f"SIPlugin: parameter(s) {', '.join(map(repr, late))} became trainable "
                          "during this experience; SI regularizes them from the next experience "
                          "on (their importance for this one is 0). Unfreeze parameters between "
                          "experiences to have it measured.", stacklevel=3)
            self._dirty = True

    # ------------------------------------------------------------- saving and loading

    def state_dict(self) -> dict[str, Any]:
        """The plugin's state: every group's buffers and parameter index (tensors cloned),
        the number of consolidations and the consolidation policy's state."""
        return dict(self._state.state_dict(), importance=self._importance,
                    consolidations=self._consolidations,
                    policy={"type": type(self._policy).__name__,
                            "state": self._policy.state_dict()})

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Load a :meth:`state_dict`, checked against this plugin's groups and, if it has seen
        one (else when training starts), the model.

        Tensors are copied; they move to the live parameters' device and the state's dtype.
        Nothing changes when an error is raised.

        Args:
            strict: every parameter the state names must be a parameter of the model (as
                ``torch.nn.Module.load_state_dict``). With False, state for parameters the
                model lacks is kept unused (it applies if such a parameter appears later).

        Raises:
            ValueError: not a state of this plugin, other groups, missing, inconsistent or
                non-finite buffers, negative Ω under a clamp that forbids it, names the model
                lacks (``strict``), or shapes that do not fit the model's.
        """
        new = SIState(self._state.index, self._state.kinds, self._state_dtype)
        new.load_state_dict(state_dict, clamp=self._clamp, labels=lambda k: self._group(k).label)
        policy = state_dict.get("policy")
        if policy is not None and policy["type"] != type(self._policy).__name__:
            raise ValueError(f"SIPlugin state was saved with consolidation policy "
                             f"{policy['type']}, this plugin has {type(self._policy).__name__}; "
                             "build it with the same consolidate= option.")
        if self._model is not None:
            new.check_loaded_names(self._model_names(self._model), strict=strict)
            for g, name, p in select(self._model, self._groups, self._excluded,
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
        self._dirty = True
        self._bound = False

    def __getstate__(self) -> dict[str, Any]:
        # Pickled with the strategy (Avalanche checkpoints): the per-experience lists,
        # the optimizer view and the strategy's scaler are found again on the next step.
        state = self.__dict__.copy()
        state["_groups"] = [_Group.__new__(_Group) for _ in self._groups]
        for new, old in zip(state["_groups"], self._groups):
            new.__dict__.update(old.__dict__)
            new.clear_lists()
        state["_dirty"] = True
        state["_bound"] = False
        state["_model"] = None
        state["_scaler"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "_store" in state:  # pickled by avalanche_si 0.1 (an older Avalanche checkpoint)
            state = _from_version_0_1(state)
        self.__dict__.update(state)


def _from_version_0_1(old: dict[str, Any]) -> dict[str, Any]:
    """An SIPlugin pickled by avalanche_si 0.1, in today's layout, its state kept whole.

    0.1 regularized normalization layers too, so the converted plugin does
    (``regularize_norm_layers=True``); each named group kept a copy of its strength and
    damping, so those stay fixed rather than following the plugin's.
    """
    importance = old.get("importance", "total")
    groups = []
    for og in old["_groups"]:
        d = og.__dict__
        default = d["key"] is None
        groups.append(_Group(d["key"], d["matcher"], None if default else d["si_lambda"],
                             None if default else d["eps"]))
    st = SIState([g.key for g in groups],
                 KINDS[:3] if importance == "delta_params" else KINDS, None)
    st.store = old["_store"]
    st.index = {og.__dict__["key"]: dict(og.__dict__["index"]) for og in old["_groups"]}
    st.consolidated = {og.__dict__["key"]: bool(og.__dict__.get("consolidated", False))
                       for og in old["_groups"]}
    new = {k: v for k, v in old.items() if k.startswith("_") and k not in
           ("_store", "_groups", "_dirty", "_model", "_param_ids")}
    new.update(_si_lambda=old["si_lambda"], _eps=old["eps"], _importance=importance,
               _clamp=old.get("clamp", "task"), _excluded=tuple(old["excluded_parameters"]),
               _norms=True, _state_dtype=None, _scaler_option=None, _groups=groups, _state=st,
               _consolidations=int(any(st.consolidated.values())), _dirty=True,
               _patterns_checked=True, _strict=True, _model=None, _param_ids=(), _scaler=None,
               _bound=False,
               _policy=make_policy(None), _signature=())
    for g in groups:
        value = new["_si_lambda"] if g.si_lambda is None else g.si_lambda
        g.c = strength_at(value, new["_consolidations"], "si_lambda")
    return new
