r"""What SI is bound to: the model, the optimizer and the scaler, and the per-step lists built
from them.

`Binding.bind()` checks what the loop hands over (a model, an optimizer SI can serve, the
same run's model); `Binding.sync()` matches the model's parameters to SI's groups and state
and builds each group's per-step lists (`avalanche_si.lists`), when something changed and
never per step: an online stream starts hundreds of experiences, and the lists are rebuilt
only when the model's trainable parameters or the optimizer's groups differ from those they
were built from. Parameters renamed by a new wrapper module follow their state; parameters
that lose their names, or become trainable in the middle of a task, are named in a warning.

Nothing here imports a training framework.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable, Optional, Sequence

import torch

from . import amp
from .functional import check_not_meta
from .groups import canonical_name, select, unwrap
from .observe import unwrap_optimizer
from .sharding import check_estimator, check_group, check_model, is_sharded, local
from .options import OptionTypeError, check_eps_for_dtype
from .state import SIState

__all__ = ["Binding"]


class Binding:
    """The model, optimizer and scaler SI serves, and whether the per-step lists are current.

    `built`: the groups' lists hold the bound model's parameters (consolidation can run);
    `state_model`: the model the state belongs to (one run, one model);
    `current`: they need no rebuilding before the next step. `signature` is what they were
    built from. `patterns_checked`: the groups' patterns were checked against a model;
    `strict`: a loaded state must name only parameters of the model it first meets.
    """

    __slots__ = ("model", "optimizer", "scaler", "signature", "built", "current", "state_model",
                 "patterns_checked", "strict", "inner", "wrapper_scaler")

    def __init__(self, *, patterns_checked: bool = False, strict: bool = True) -> None:
        self.model: Optional[torch.nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        #: the torch optimizer that really steps (`optimizer`, or the one a wrapper holds), and
        #: the GradScaler a wrapper holds (Accelerate's)
        self.inner: Optional[torch.optim.Optimizer] = None
        self.wrapper_scaler: Optional[torch.amp.GradScaler] = None
        self.scaler: Optional[torch.amp.GradScaler] = None   # found by an adapter
        self.signature: tuple = ()
        self.built = False
        self.current = False
        #: the plain model SI's state was built for (a weak reference; None: not yet, or the
        #: state arrived by load_state_dict or unpickling and belongs to the next model bound)
        self.state_model: Optional[weakref.ref] = None
        self.patterns_checked = patterns_checked
        self.strict = strict

    def fresh(self) -> "Binding":
        """A new binding to nothing that keeps what was checked and how a load was made (for
        a pickle, or a loaded state)."""
        return Binding(patterns_checked=self.patterns_checked, strict=self.strict)

    def __setstate__(self, state) -> None:
        # pickled by avalanche_si 0.3: (None, {slot: value}) with the first seven slots
        for name, value in (state[1] if isinstance(state, tuple) else state).items():
            setattr(self, name, value)
        for name, default in (("patterns_checked", False), ("strict", True), ("inner", None),
                              ("wrapper_scaler", None)):
            if not hasattr(self, name):
                setattr(self, name, default)

    # ------------------------------------------------------------------ binding

    def bind(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
             scaler: Optional[torch.amp.GradScaler], *, carry_state: bool, who: str,
             consolidations: int) -> None:
        """Serve `model` stepped by `optimizer` (see `SynapticIntelligence.bind()`)."""
        if not isinstance(model, torch.nn.Module):
            raise OptionTypeError(f"bind() needs the torch.nn.Module to regularize, got "
                                  f"{type(model).__name__}.")
        inner, wrapper_scaler = unwrap_optimizer(optimizer)
        if optimizer is not None and not isinstance(inner, torch.optim.Optimizer):
            raise OptionTypeError(f"bind() needs a torch.optim.Optimizer, a wrapper of one "
                                  f"(.optimizer), or None; got {type(optimizer).__name__}.")
        if isinstance(inner, torch.optim.LBFGS):
            raise ValueError("SI does not support torch.optim.LBFGS: it re-evaluates a closure "
                             "several times per step, without the penalty's gradient. Add "
                             "c·Σ Ω(θ − θ*)² to the closure's loss with avalanche_si.functional.")
        if model is not self.model and self.state_model is not None and not carry_state:
            if self.state_model() is not unwrap(model):
                raise RuntimeError(
                    f"{who} holds SI state (Ω, θ*, {consolidations} consolidation(s)) "
                    "for another model, and state never moves to a new model silently. For a "
                    "new run (another seed), call reset() or build a new one; to move the state, "
                    "load_state_dict(state_dict()) first.")
        scaler = amp.check_scaler(scaler)
        if model is not self.model or optimizer is not self.optimizer or scaler is not self.scaler:
            self.model, self.optimizer, self.scaler = model, optimizer, scaler
            self.inner, self.wrapper_scaler = inner, wrapper_scaler
            self.current = False

    def adopt(self, optimizer: torch.optim.Optimizer) -> None:
        """An optimizer SI was not bound to steps its parameters (made without `bind()`): it
        is SI's optimizer from now on."""
        self.optimizer = self.inner = optimizer
        self.current = False

    def require_model(self, call: str, who: str) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError(f"{who}.{call}() before bind(model, optimizer): "
                               "SI does not know which model to regularize.")
        return self.model

    def require_built(self, call: str, noun: str) -> None:
        if not self.built:
            raise RuntimeError(
                f"{call} was called before the {noun} has the model's parameters: it finds "
                "them when training starts, and again after load_state_dict() or unpickling. "
                "Call it after training on what should be consolidated; nothing was changed.")

    def signature_now(self) -> tuple:
        opt, model = self.inner, self.model
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

    @staticmethod
    def model_names(model: torch.nn.Module) -> set[str]:
        return {canonical_name(n) for n, _ in unwrap(model).named_parameters()}

    def check_loaded(self, state: SIState, groups: Sequence[Any], *, excluded: Sequence[str],
                     norms: bool, strict: bool) -> None:
        """Raise now, if SI is bound to a model, where a loaded `state` does not fit it (names
        it lacks, with `strict`; shapes its parameters cannot take); else at the first sync."""
        if self.model is None:
            return
        state.check_loaded_names(self.model_names(self.model), strict=strict)
        for g, name, p in select(self.model, groups, excluded, regularize_norm_layers=norms,
                                 check_patterns=False):
            state.check_shape(g.key, name, local(p))

    # ------------------------------------------------------------------ the lists

    def sync(self, groups: Sequence[Any], state: SIState, estimator: Any, *,
             excluded: Sequence[str], norms: bool, eps_of: Callable[[Any], float],
             who: str, scalers: Sequence[Any] = ()) -> None:
        """Match the model's parameters to groups and state; build the per-step lists.

        New parameters get Ω = 0 and θ* = their current value; a grown one keeps its state for
        the old slice.
        """
        model = self.model
        check_model(model)
        selected = select(model, groups, excluded, regularize_norm_layers=norms,
                          check_patterns=not self.patterns_checked)
        self.patterns_checked = True
        model_names = self.model_names(model)
        state.check_loaded_names(model_names, strict=self.strict)
        self._follow_renamed(state, model_names, {(g.key, n) for g in groups for n in g.names},
                             who)
        for g in groups:
            g.clear_lists()
        if not selected and any(p.requires_grad for p in model.parameters()):
            warnings.warn("SI regularizes no parameter of this model: excluded_parameters and "
                          "the groups leave out every trainable one, so SI is off.", stacklevel=5)
        sharded = [name for _, name, p in selected if is_sharded(p)]
        for _, name, p in selected:
            check_not_meta(p, f"parameter {name!r}")
            if is_sharded(p):
                check_group(name, p)
        check_estimator(estimator, sharded)
        if sharded and any(s is not None for s in scalers):
            raise ValueError("SI does not support a GradScaler with a sharded model (FSDP2) "
                             "yet: use a bf16 mixed precision policy, which needs none.")
        for g, name, p in selected:
            i = state.track(g.key, name, local(p))
            g.names.append(name)
            g.owners.append(p)
            g.params.append(local(p))
            g.sharded = g.sharded or is_sharded(p)
            g.omega.append(state.get(g.key, "omega", i))
            g.prev.append(state.get(g.key, "prev_theta", i))
            g.running.append(state.get(g.key, "running_omega", i))
            if "pre_step_theta" in state.kinds:
                g.pre.append(state.get(g.key, "pre_step_theta", i))
        for g in groups:
            if g.omega:
                check_eps_for_dtype(eps_of(g), g.omega[0].dtype,
                                    "eps" if g.eps is None else f"groups[{g.key!r}].eps")
            g.helper = estimator.prepare(self.inner, g.owners) if g.params else None
        self.signature = self.signature_now()
        self.current = self.built = True
        self.state_model = weakref.ref(unwrap(model))

    @staticmethod
    def _follow_renamed(state: SIState, model_names: set[str], tracked: set, who: str) -> None:
        """Parameters SI tracked that the model no longer has under their name (it was wrapped
        in a new module, say): a name that is now the end of exactly one new name follows it
        (`0.weight` → `net.0.weight`); the others lose their importance, with a warning."""
        lost = [(key, n) for key, n in sorted(tracked, key=str) if n not in model_names]
        if not lost:
            return
        known = {n for index in state.index.values() for n in index}
        fresh = [m for m in model_names if m not in known]
        gone = []
        for key, n in lost:
            match = [m for m in fresh if m.endswith("." + n)]
            if len(match) == 1:
                index = state.index[key]
                index[match[0]] = index.pop(n)
                fresh.remove(match[0])
            else:
                gone.append(n)
        if gone:
            warnings.warn(f"{who}: {len(gone)} regularized parameter(s) are no longer in the "
                          f"model under their names ({', '.join(map(repr, gone[:5]))}"
                          f"{', ...' if len(gone) > 5 else ''}): they lose their importance and "
                          "the penalty no longer holds them. Keep parameter names stable between "
                          "tasks (see the groups guide).", stacklevel=6)

    def warn_if_unfrozen(self, groups: Sequence[Any], *, excluded: Sequence[str], norms: bool,
                         who: str) -> None:
        """A parameter made trainable during the task had no state: say so (it gets state,
        with θ* = its value now, from the next task)."""
        tracked = {(g.key, n) for g in groups for n in g.names}
        late = [n for g, n, _ in select(self.model, groups, excluded,
                                        regularize_norm_layers=norms, check_patterns=False)
                if (g.key, n) not in tracked]
        if late:
            warnings.warn(f"{who}: parameter(s) {', '.join(map(repr, late))} became "
                          "trainable during this experience; SI regularizes them from the next "
                          "experience on (their importance for this one is 0). Unfreeze "
                          "parameters between experiences to have it measured.", stacklevel=4)
            self.current = False
