r"""Synaptic Intelligence as an Avalanche plugin.

The plugin only translates Avalanche's callbacks into calls of the list kernels of
:mod:`avalanche_si.functional`; the maths lives there. Per training step it makes two passes
over memory (after the backward pass: the penalty's gradient and the copy of the weights
before the step; after the step: the running importance), as one-pass C kernels on
contiguous float32 CPU tensors and as fused ``torch._foreach_*`` operations elsewhere,
over lists it builds once per experience: no name matching, no Python arithmetic loop
over parameters, no host copies, no host synchronisation.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor
from avalanche.core import SupervisedPlugin

from .functional import (
    CLAMP_MODES,
    DEFAULT_EPS,
    accumulate_from_delta,
    accumulate_from_pre,
    consolidate,
    penalty_step,
    si_buffer_names,
)
from .optim_step import StepPredictor, check_optimizer_supported

__all__ = ["SIPlugin", "ParamGroup", "IMPORTANCE_MODES", "CLAMP_MODES"]

IMPORTANCE_MODES = ("total", "task", "delta_params")
_STATE_FORMAT = "avalanche_si.SIPlugin/1"
_KINDS = ("omega", "prev_theta", "running_omega", "pre_step_theta")

Matcher = Union[str, Sequence[str], Callable[[str, torch.nn.Parameter], bool]]


@dataclass(frozen=True)
class ParamGroup:
    r"""A set of parameters that carries its own SI.

    Args:
        params: which parameters belong to the group: a name pattern or a list of
            them (``fnmatch`` globs such as ``"features.*"``; a plain name also
            matches every parameter below it, so ``"classifier"`` covers
            ``"classifier.weight"``), or a callable ``(name, parameter) -> bool``.
        si_lambda: the strength :math:`c` of this group's penalty; ``None`` takes
            the plugin's ``si_lambda``.
        eps: the damping :math:`\xi` of this group's consolidation; ``None`` takes
            the plugin's ``eps``.
    """

    params: Matcher
    si_lambda: Optional[float] = None
    eps: Optional[float] = None


def _check_strength(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0:
        raise ValueError(f"{what} (the SI strength c) must be a finite number >= 0, got {value!r}.")
    return float(value)


def _check_eps(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{what} (the damping xi) must be a finite number > 0, got {value!r}; "
                         "1e-3 is the default, 0.1 the value of van de Ven et al. 2019.")
    return float(value)


def _as_patterns(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise ValueError(f"{what} must be a name pattern, a list of them or a callable "
                         f"(name, parameter) -> bool, got {value!r}.") from None
    if not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{what} must hold non-empty strings (name patterns), got {value!r}.")
    return patterns


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p)
               for p in patterns)


def _every_parameter(name: str, param: torch.nn.Parameter) -> bool:
    return True


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a (Distributed)DataParallel wrapper: names without ``module.``."""
    wrappers = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


class _Group:
    """One group's configuration, its parameter index and its per-experience lists."""

    def __init__(self, key: Optional[str], matcher, si_lambda: float, eps: float):
        self.key = key                    # None: the default group (buffer names without _name)
        self.matcher = matcher
        self.si_lambda = si_lambda
        self.eps = eps
        self.index: dict[str, int] = {}   # parameter name -> i, in order of first appearance
        self.consolidated = False
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
        return _matches(name, self.matcher)

    @property
    def label(self) -> str:
        return "default" if self.key is None else repr(self.key)


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
    part of ``strategy.loss``).
    A plugin that rewrites gradients in its own ``after_backward`` sees the penalty's
    gradient if it comes after this plugin in the strategy's list, not if it comes before.

    Memory: :math:`\Omega`, :math:`\theta^*`, :math:`\omega` and the weights before the
    step, ``4n`` numbers for ``n`` regularized weights (``3n`` with
    ``importance="delta_params"``), on each parameter's device and dtype. The state lives
    in the plugin, not in the model: ``model.state_dict()`` is unchanged.

    Args:
        si_lambda: the strength :math:`c` of the penalty (>= 0; 0 switches the penalty
            off and leaves training bit-identical to training without the plugin).
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
            - ``"task"``: the gradient without the SI penalty times the step taken
              (Zenke et al.'s code);
            - ``"delta_params"``: the gradient without the SI penalty times the step the
              optimizer would take from that gradient alone, predicted from its state
              (SGD, Adam, AdamW, RMSprop; 3n memory).
        clamp: where the consolidation's :math:`\max(0, \cdot)` goes, to match each
            existing implementation:

            - ``"task"`` (default, the design this package follows): on each experience's
              contribution, :math:`\Omega \leftarrow \Omega + \max(0, \omega / (\Delta^2 + \xi))`;
            - ``"total"`` (Zenke et al.'s code): on the running total,
              :math:`\Omega \leftarrow \max(0, \Omega + \omega / (\Delta^2 + \xi))`;
            - ``"none"`` (van de Ven's code): no clamp; :math:`\Omega` may become
              negative, and the penalty then pushes those weights *away* from
              :math:`\theta^*`.

    Raises:
        ValueError: on a bad option, here; on an unsupported optimizer for
            ``"delta_params"`` or a parameter in two groups, when training starts.

    Example:
        >>> from avalanche.training import Naive
        >>> from avalanche_si import SIPlugin
        >>> si = SIPlugin(si_lambda=1.0, eps=0.1)
        >>> strategy = Naive(model=model, optimizer=optimizer, plugins=[si])  # doctest: +SKIP
        >>> for experience in benchmark.train_stream:                          # doctest: +SKIP
        ...     strategy.train(experience)
    """

    clamp = "task"  # class default: a plugin pickled before the option existed still loads

    def __init__(self, si_lambda: float = 1.0, *, eps: float = DEFAULT_EPS,
                 excluded_parameters: Union[str, Sequence[str], None] = None,
                 groups: Optional[Mapping[str, Union[ParamGroup, Matcher]]] = None,
                 importance: str = "total", clamp: str = "task"):
        super().__init__()
        self.si_lambda = _check_strength(si_lambda, "si_lambda")
        self.eps = _check_eps(eps, "eps")
        if importance not in IMPORTANCE_MODES:
            raise ValueError(f"importance must be one of {IMPORTANCE_MODES}, got {importance!r}.")
        self.importance = importance
        if clamp not in CLAMP_MODES:
            raise ValueError(f"clamp must be one of {CLAMP_MODES}, got {clamp!r}.")
        self.clamp = clamp
        self.excluded_parameters = _as_patterns(excluded_parameters or (), "excluded_parameters")
        self._groups = self._make_groups(groups)
        self._store = torch.nn.Module()  # the state, as buffers named like the functional API
        self._dirty = True
        self._model: Optional[torch.nn.Module] = None
        self._param_ids: tuple[int, ...] = ()

    def _make_groups(self, groups) -> list[_Group]:
        if groups is None:
            return [_Group(None, _every_parameter, self.si_lambda, self.eps)]
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
                _as_patterns(spec.params, f"groups[{key!r}].params")
            made.append(_Group(
                key, matcher,
                self.si_lambda if spec.si_lambda is None else
                _check_strength(spec.si_lambda, f"groups[{key!r}].si_lambda"),
                self.eps if spec.eps is None else _check_eps(spec.eps, f"groups[{key!r}].eps")))
        return made

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
        g = self._group(group)
        return {name: self._buffer(g, "omega", i) for name, i in g.index.items()}

    def _group(self, key: Optional[str]) -> _Group:
        for g in self._groups:
            if g.key == key:
                return g
        raise KeyError(f"no SI group {key!r}; the groups are {self.group_names}.")

    def _buffer_name(self, g: _Group, kind: str, i: int) -> str:
        return si_buffer_names(i, g.key)[_KINDS.index(kind)]

    def _buffer(self, g: _Group, kind: str, i: int) -> Tensor:
        return self._store._buffers[self._buffer_name(g, kind, i)]

    def _set(self, g: _Group, kind: str, i: int, value: Tensor) -> None:
        self._store._buffers[self._buffer_name(g, kind, i)] = value

    def _kinds(self) -> tuple[str, ...]:
        return _KINDS[:3] if self.importance == "delta_params" else _KINDS

    # ------------------------------------------------------------- building the lists

    def _sync(self, strategy) -> None:
        """Match the model's parameters to groups and state; build the per-step lists.

        Runs once per experience (and after an evaluation changed the model), never
        per step. New parameters get Ω = 0 and θ* = their current value; a grown one keeps
        its state for the old slice.
        """
        model = _unwrap(strategy.model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad
                 and not _matches(n, self.excluded_parameters)]
        owner: dict[str, _Group] = {}
        for name, p in named:
            hits = [g for g in self._groups if g.covers(name, p)]
            if len(hits) > 1:
                raise ValueError(f"parameter {name!r} is in SI groups "
                                 f"{[g.key for g in hits]}; a parameter may be in one group "
                                 "only: narrow the groups' patterns.")
            if hits:
                owner[name] = hits[0]
        for g in self._groups:
            g.clear_lists()
        for name, p in named:
            g = owner.get(name)
            if g is None:
                continue
            if name not in g.index:
                g.index[name] = len(g.index)
                self._new_state(g, g.index[name], p)
            else:
                self._adapt_state(g, name, p)
            i = g.index[name]
            g.names.append(name)
            g.params.append(p)
            g.omega.append(self._buffer(g, "omega", i))
            g.prev.append(self._buffer(g, "prev_theta", i))
            g.running.append(self._buffer(g, "running_omega", i))
            if self.importance != "delta_params":
                g.pre.append(self._buffer(g, "pre_step_theta", i))
        if self.importance == "delta_params":
            for g in self._groups:
                g.predictor = StepPredictor(strategy.optimizer, g.params) if g.params else None
        self._model = strategy.model
        self._param_ids = tuple(id(p) for p in strategy.model.parameters())
        self._dirty = False

    def _new_state(self, g: _Group, i: int, p: Tensor) -> None:
        p = p.detach()
        self._set(g, "omega", i, torch.zeros_like(p))
        self._set(g, "prev_theta", i, p.clone())
        self._set(g, "running_omega", i, torch.zeros_like(p))
        if self.importance != "delta_params":
            self._set(g, "pre_step_theta", i, torch.empty_like(p))

    def _adapt_state(self, g: _Group, name: str, p: Tensor) -> None:
        """Keep a known parameter's state: cast to its device/dtype, or grow with it."""
        i = g.index[name]
        p = p.detach()
        for kind in self._kinds():
            key = self._buffer_name(g, kind, i)
            old = self._store._buffers.get(key)
            if old is None:  # e.g. a state loaded from delta_params mode into another mode
                self._store._buffers[key] = torch.empty_like(p) if kind == "pre_step_theta" \
                    else torch.zeros_like(p)
                continue
            if old.shape != p.shape:
                if old.dim() != p.dim() or any(o > n for o, n in zip(old.shape, p.shape)):
                    raise ValueError(
                        f"SI state of parameter {name!r} has shape {tuple(old.shape)} but the "
                        f"model's has shape {tuple(p.shape)}; a parameter may only grow (as "
                        "Avalanche's dynamic classifiers do). Load the state into the model it "
                        "was saved from.")
                new = p.clone() if kind == "prev_theta" else torch.zeros_like(p)
                new[tuple(slice(0, s) for s in old.shape)] = old.to(p)
                self._store._buffers[key] = new
            elif old.device != p.device or old.dtype != p.dtype:
                self._store._buffers[key] = old.to(device=p.device, dtype=p.dtype)

    def _ensure_synced(self, strategy) -> None:
        if self._dirty or strategy.model is not self._model:
            self._sync(strategy)

    # -------------------------------------------------------------------- the hooks

    def before_training_exp(self, strategy, **kwargs) -> None:
        if self.importance == "delta_params":
            check_optimizer_supported(strategy.optimizer)
        self._sync(strategy)

    def after_eval(self, strategy, **kwargs) -> None:
        # Evaluation may adapt the model (new heads, grown classifiers): rebuild the
        # lists before the next training step if the parameter objects changed.
        if tuple(id(p) for p in strategy.model.parameters()) != self._param_ids:
            self._dirty = True

    @torch.no_grad()
    def after_backward(self, strategy, **kwargs) -> None:
        self._ensure_synced(strategy)
        for g in self._groups:
            if g.params:
                self._after_backward_group(g)

    def _after_backward_group(self, g: _Group) -> None:
        grads = [p.grad for p in g.params]
        idx = None
        if any(gr is None for gr in grads):
            # Parameters without a gradient this step (another task's head) are skipped:
            # the optimizer does not move them, so neither their importance nor their
            # penalty changes, and giving them a zero gradient would let a stateful
            # optimizer move them on old momentum.
            idx = [k for k, gr in enumerate(grads) if gr is not None]
            grads = [grads[k] for k in idx]
        g.step_idx, g.step_grads, g.value, g.penalty = idx, grads, None, None
        if not grads:
            return
        params = g.pick(g.params)
        # The weights before the step are recorded here, in the pass that reads them for
        # the penalty anyway (the optimizer step is what follows; a plugin that moves the
        # weights between the backward pass and the step has its move counted as part of it).
        pre = None if self.importance == "delta_params" else g.pick(g.pre)
        if self.importance == "delta_params":  # measured before the penalty joins the gradient
            accumulate_from_delta(g.pick(g.running), grads, g.predictor.predict(grads, mask=idx))
        if g.consolidated and g.si_lambda != 0.0:
            # "task": the optimizer gets new gradient tensors with the penalty added; the
            # task gradients stay in g.step_grads for ω.
            total, g.value = penalty_step(grads, g.pick(g.omega), params, g.pick(g.prev),
                                          strength=g.si_lambda, pre=pre,
                                          in_place=self.importance != "task")
            if self.importance == "task":
                for p, t in zip(params, total):
                    p.grad = t
        elif pre is not None:
            torch._foreach_copy_(pre, params)  # no_grad: no detach needed

    @torch.no_grad()
    def after_update(self, strategy, **kwargs) -> None:
        if self.importance == "delta_params":
            return
        for g in self._groups:
            if not g.step_grads:
                continue
            # ω += g·(θ_pre − θ); with "task" g is the task gradient
            accumulate_from_pre(g.pick(g.running), g.step_grads, g.pick(g.pre), g.pick(g.params))
            g.step_grads = []

    def after_training_exp(self, strategy, **kwargs) -> None:
        self._ensure_synced(strategy)
        for g in self._groups:
            consolidate(g.omega, g.prev, g.running, g.params, eps=g.eps, clamp=self.clamp,
                        names=[f"{n!r} (SI group {g.label})" for n in g.names])
            g.consolidated = g.consolidated or bool(g.params)
            g.step_grads, g.value, g.penalty = [], None, None

    # ------------------------------------------------------------- saving and loading

    def state_dict(self) -> dict[str, Any]:
        """The plugin's state: every group's buffers and parameter index (tensors cloned)."""
        return {
            "format": _STATE_FORMAT,
            "importance": self.importance,
            "groups": {g.key: {"index": dict(g.index), "consolidated": g.consolidated}
                       for g in self._groups},
            "buffers": {k: v.detach().clone() for k, v in self._store._buffers.items()
                        if v is not None},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict`, checking it against this plugin's groups.

        Tensors are copied; they move to the live parameters' device and dtype (now if
        the plugin has seen the model, else when training starts).

        Raises:
            ValueError: not a state of this plugin, other groups, or missing or
                inconsistent buffers.
        """
        if not isinstance(state_dict, Mapping) or state_dict.get("format") != _STATE_FORMAT:
            raise ValueError("not an SIPlugin state: expected a dict from SIPlugin.state_dict() "
                             f"with format {_STATE_FORMAT!r}.")
        groups, buffers = state_dict.get("groups"), state_dict.get("buffers")
        if not isinstance(groups, Mapping) or not isinstance(buffers, Mapping):
            raise ValueError("SIPlugin state is missing its 'groups' or 'buffers' entry.")
        if set(groups) != set(self.group_names):
            raise ValueError(f"SIPlugin state has groups {sorted(groups, key=str)} but this plugin "
                             f"has {sorted(self.group_names, key=str)}; build the plugin with "
                             "the same groups= as the one that saved it.")
        new_buffers: dict[str, Tensor] = {}
        new_index: dict[Optional[str], dict[str, int]] = {}
        for g in self._groups:
            entry = groups[g.key]
            index = dict(entry.get("index", {}))
            if sorted(index.values()) != list(range(len(index))):
                raise ValueError(f"SIPlugin state: group {g.label} has a broken parameter index "
                                 f"{index}.")
            for name, i in index.items():
                shape = None
                for kind in _KINDS[:3]:
                    key = self._buffer_name(g, kind, i)
                    t = buffers.get(key)
                    if not isinstance(t, Tensor):
                        raise ValueError(f"SIPlugin state: buffer {key!r} of parameter {name!r} "
                                         "is missing.")
                    if shape is not None and t.shape != shape:
                        raise ValueError(f"SIPlugin state: buffer {key!r} has shape "
                                         f"{tuple(t.shape)}, expected {tuple(shape)}.")
                    shape = t.shape
                    new_buffers[key] = t.detach().clone()
                if self.importance != "delta_params":
                    key = self._buffer_name(g, "pre_step_theta", i)
                    new_buffers[key] = torch.empty_like(new_buffers[self._buffer_name(g, "omega", i)])
            new_index[g.key] = index
        self._store._buffers.clear()
        self._store._buffers.update(new_buffers)
        for g in self._groups:
            g.index = new_index[g.key]
            g.consolidated = bool(groups[g.key].get("consolidated", False))
            g.clear_lists()
        self._dirty = True
        if self._model is not None:
            model = _unwrap(self._model)
            live = dict(model.named_parameters())
            for g in self._groups:
                for name in g.index:
                    if name in live:
                        self._adapt_state(g, name, live[name])

    def __getstate__(self) -> dict[str, Any]:
        # Pickled with the strategy (Avalanche checkpoints): the per-experience lists
        # and the optimizer view are rebuilt on the next step, not saved.
        state = self.__dict__.copy()
        state["_groups"] = [_Group.__new__(_Group) for _ in self._groups]
        for new, old in zip(state["_groups"], self._groups):
            new.__dict__.update(old.__dict__)
            new.clear_lists()
        state["_dirty"] = True
        state["_model"] = None
        return state
