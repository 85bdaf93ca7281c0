r"""Importance estimators: how SI measures each weight's importance, one object each.

| `importance=` | object | per step | at consolidation |
|---|---|---|---|
| `"total"` | `Total()` | ω −= g' ⊙ Δθ (g' as the optimizer used it) | Ω += max(0, ω / (Δ² + ξ)) |
| `"task"` | `Task()` | ω −= g ⊙ Δθ (g without SI's penalty) | the same |
| `"delta_params"` | `DeltaParams()` | ω −= g ⊙ Δθ̂ (the predicted step) | the same |
| `"siu"` | `SIU()` | ω −= g_u ⊙ Δθ (an independent mini-batch) | the same |
| `"sib"` | `SIB()` | ω += (g_u − g) ⊙ Δθ | the same |
| `"sos"` | `SOS()`, `SOS(alpha=1)` | v ← β v + (1 − β) (g − α g_u)² | Ω += √v |
| `"onaf"` | `OnAF()` | a ← a + \|g\| | Ω += a |

`importance=` takes the string or an object (`SOS(alpha=1.0)`, or an `Estimator` of your
own); `make_estimator()` turns either into an object. Each estimator lives in its own module
and declares what it needs (`avalanche_si.estimators.base`); the step code asks it, never
its name.
"""

from __future__ import annotations

from typing import Any

from ..options import IMPORTANCE_MODES, OptionTypeError
from .base import Estimator
from .delta_params import DeltaParams
from .onaf import OnAF
from .path import PathIntegral
from .sib import SIB
from .si import Task, Total
from .siu import SIU
from .sos import SOS

__all__ = ["Estimator", "PathIntegral", "Total", "Task", "DeltaParams", "SIU", "SIB", "SOS",
           "OnAF", "ESTIMATORS", "make_estimator", "estimator_record", "check_estimator_state"]

#: the estimator each `importance=` string names (`avalanche_si.options.IMPORTANCE_MODES`
#: lists the same names without importing torch)
ESTIMATORS: dict[str, type[Estimator]] = {
    cls.name: cls for cls in (Total, Task, DeltaParams, SIU, SIB, SOS, OnAF)}


def make_estimator(value: Any) -> Estimator:
    """The estimator `importance=` names: an `Estimator` as it is, a name as a new one."""
    if isinstance(value, Estimator):
        return value
    if isinstance(value, str) and value in ESTIMATORS:
        return ESTIMATORS[value]()
    kind = OptionTypeError if not isinstance(value, str) else ValueError
    raise kind(f"importance must be one of {IMPORTANCE_MODES} or an "
               f"avalanche_si.estimators.Estimator, got {type(value).__name__} {value!r}.")


def estimator_record(estimator: Estimator) -> dict:
    """What a saved state says of the estimator that measured it: its class and options."""
    return {"type": type(estimator).__name__, "name": estimator.name,
            "options": dict(estimator.options())}


def check_estimator_state(estimator: Estimator, state: Any, who: str) -> None:
    """Refuse a saved state whose period in progress (steps since its last consolidation)
    another estimator measured: its running measure (ω, SOS's v, OnAF's a) is that
    estimator's, and would be read as this one's. Between tasks the state (Ω, θ*) is the same
    whatever measured it, and loads into any estimator."""
    saved = state.get("estimator") if hasattr(state, "get") else None
    if saved is None:  # saved by 0.3 or earlier: the name alone
        name = state.get("importance") if hasattr(state, "get") else None
        saved = None if name is None else estimator_record(make_estimator(name)) \
            if name in ESTIMATORS else {"type": name, "name": name, "options": {}}
    if saved is None or not int(state.get("steps_since", 1)):
        return
    mine = estimator_record(estimator)
    if (saved.get("type"), saved.get("options")) != (mine["type"], mine["options"]):
        def label(r):
            args = ", ".join(f"{k}={v!r}" for k, v in r.get("options", {}).items())
            return f"{r.get('type')}({args})"
        raise ValueError(
            f"{who} state was saved in the middle of a period measured by {label(saved)}, and "
            f"this one measures with {label(mine)}: the running measure it holds is the other "
            "estimator's. Load it into an SI built with the same importance=, or save it right "
            "after a consolidation (end_task()).")
