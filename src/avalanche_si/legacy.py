r"""What earlier versions pickled, read into today's objects.

Avalanche checkpoints pickle the whole strategy with its plugins, so an `SIPlugin` (and the
engine inside it) written by an earlier avalanche_si must unpickle whole and train on as it
would have:

- 0.1 kept SI's buffers, groups and options on the plugin (`fields_from_v01()`);
- 0.2 kept the engine's fields on the plugin itself (`avalanche_si.engine.engine_from_fields()`);
- 0.2 and 0.3 named the importance estimator by a string and kept the step counts, the
  binding's checks and the step in flight on the engine (`upgraded_engine_state()`).

Nothing here imports a training framework.
"""

from __future__ import annotations

from typing import Any

from .binding import Binding
from .consolidation import make_policy
from .estimators import make_estimator
from .lists import GroupLists
from .options import strength_at
from .state import KINDS, SIState
from .step import Stepper

__all__ = ["upgraded_engine_state", "fields_from_v01"]

#: engine fields of 0.2 and 0.3 that today live elsewhere, or are no state at all
_STALE = ("_task_steps", "_accumulating", "_in_step", "_predicted_lrs", "_steps_before",
          "_unscaled_by", "_found_inf")


def upgraded_engine_state(state: dict[str, Any]) -> dict[str, Any]:
    """An engine's pickled `__dict__`, of any version since 0.2, in today's layout: the
    estimator as an object, the step counts in a `Stepper`, a fresh binding that keeps what was
    checked (the model, optimizer and scaler are bound again at the next step)."""
    state = dict(state)
    if "_estimator" not in state:  # 0.2 and 0.3 kept the estimator's name
        state["_estimator"] = make_estimator(state.pop("_importance", "total"))
    if "_stepper" not in state:    # ... and the step counts on the engine
        stepper = Stepper(state["_estimator"], state.get("_cuda_graphs", False))
        stepper.steps_since = state.pop("_steps_since", 0)
        state["_stepper"] = stepper
    old = state.get("_binding")
    state["_binding"] = Binding(
        patterns_checked=state.pop("_patterns_checked", getattr(old, "patterns_checked", False)),
        strict=state.pop("_strict", getattr(old, "strict", True)))
    for stale in _STALE:
        state.pop(stale, None)
    state.setdefault("_cuda_graphs", False)
    state.setdefault("_fresh_policy", None)  # 0.2's engines cannot reset their policy
    return state


def fields_from_v01(old: dict[str, Any]) -> dict[str, Any]:
    """An SIPlugin pickled by avalanche_si 0.1, as the fields of a 0.2 plugin, its state kept
    whole.

    0.1 regularized normalization layers too, so the converted plugin does
    (`regularize_norm_layers=True`); each named group kept a copy of its strength and
    damping, so those stay fixed rather than following the plugin's.
    """
    importance = old.get("importance", "total")
    groups = []
    for og in old["_groups"]:
        d = og.__dict__
        default = d["key"] is None
        groups.append(GroupLists(d["key"], d["matcher"], None if default else d["si_lambda"],
                                 None if default else d["eps"]))
    st = SIState([g.key for g in groups],
                 KINDS if make_estimator(importance).weights_before_step else KINDS[:3], None)
    st.store = old["_store"]
    st.index = {og.__dict__["key"]: dict(og.__dict__["index"]) for og in old["_groups"]}
    st.consolidated = {og.__dict__["key"]: bool(og.__dict__.get("consolidated", False))
                       for og in old["_groups"]}
    new = {k: v for k, v in old.items() if k.startswith("_") and k not in
           ("_store", "_groups", "_dirty", "_model", "_param_ids")}
    new.update(_si_lambda=old["si_lambda"], _eps=old["eps"], _importance=importance,
               _clamp=old.get("clamp", "task"), _excluded=tuple(old["excluded_parameters"]),
               _norms=True, _state_dtype=None, _scaler_option=None, _groups=groups, _state=st,
               _consolidations=int(any(st.consolidated.values())),
               _patterns_checked=True, _strict=True, _policy=make_policy(None))
    for g in groups:
        value = new["_si_lambda"] if g.si_lambda is None else g.si_lambda
        g.c = strength_at(value, new["_consolidations"], "si_lambda")
    return new
