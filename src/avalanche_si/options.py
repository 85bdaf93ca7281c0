r"""The plugin's options: what each accepts, checked the same way at construction and when
assigned later.

Numbers may be Python numbers, numpy scalars or one-element tensors. The strength
c may also change with the experience, as Avalanche's own plugin allows: a list
(one value per experience, the last one repeated) or a callable of the experience index.

Nothing here imports a training framework, nor torch until a check needs it, so that the
experiments' `--help` reads the modes below without loading either.
"""

from __future__ import annotations

import difflib
import functools
import math
import numbers
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

if TYPE_CHECKING:
    import torch

__all__ = ["Strength", "as_number", "check_strength", "check_eps", "check_state_dtype",
           "strength_at", "IMPORTANCE_MODES", "CLAMP_MODES", "OptionTypeError", "LIVE_OPTIONS",
           "FIXED_OPTIONS", "refuse_attribute", "positional"]

IMPORTANCE_MODES = ("total", "task", "delta_params", "siu", "sib", "sos", "onaf")
"""The values of the `importance` option: which gradient and step measure ω (the last four:
Benzing 2022's variants of SI; `avalanche_si.estimators` has one object for each)."""
CLAMP_MODES = ("task", "total", "none")
"""The values of the `clamp` option: where the consolidation's max(0, ·) goes."""

#: a strength: a number, one number per experience, or a function of the experience index
Strength = Union[float, Sequence[float], Callable[[int], float]]


class OptionTypeError(TypeError, ValueError):
    """An option or argument of the wrong type. A `TypeError`; also a `ValueError`, which
    avalanche_si 0.2 raised for these, so code written against it keeps catching them."""


_EPS_HINT = "1e-3 is the default, 0.1 the value of van de Ven et al. 2019 and Zenke et al. 2017"


def as_number(value: Any) -> Optional[float]:
    """`value` as a float if it is a real number (Python, numpy, or a one-element
    tensor), else None. Booleans are not numbers here."""
    import torch

    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            return None
        return float(value.detach().reshape(()).item())
    if isinstance(value, numbers.Real):
        return float(value)
    try:  # numpy's bool_ and other exotic scalars: refused; 0-d arrays: accepted
        import numpy as np
        if isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind in "fiu":
            return float(value)
    except ImportError:  # pragma: no cover - numpy comes with torch
        pass
    return None


def _strength_number(value: Any, what: str) -> float:
    x = as_number(value)
    if x is None:
        raise OptionTypeError(f"{what} (the SI strength c) must be a number >= 0, got "
                              f"{type(value).__name__} {value!r}.")
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{what} (the SI strength c) must be a finite number >= 0, got "
                         f"{value!r}.")
    return x


def check_strength(value: Any, what: str) -> Strength:
    """A valid strength: a number >= 0, a non-empty list of them (one per experience), or a
    callable `(experience_index) -> number` (checked when called)."""
    import torch

    if callable(value) and not isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{what} is an empty list; give one strength per experience "
                             "(the last one is used for later experiences), or a number.")
        return tuple(_strength_number(v, f"{what}[{k}]") for k, v in enumerate(value))
    return _strength_number(value, what)


def strength_at(value: Strength, experience: int, what: str) -> float:
    """The strength for the `experience`-th experience trained (0-based, Avalanche's
    `strategy.clock.train_exp_counter`): a list's entry, its last one beyond its end (as
    Avalanche's plugin does), or the callable's value, checked."""
    if isinstance(value, tuple):
        return value[min(experience, len(value) - 1)]
    if callable(value):
        return _strength_number(value(experience), f"{what}({experience})")
    return value


def check_eps(value: Any, what: str) -> float:
    """A valid damping ξ: a finite number > 0 (the one check of ξ, for every API)."""
    x = as_number(value)
    if x is None:
        raise OptionTypeError(f"{what} (the damping xi) must be a number > 0, got "
                              f"{type(value).__name__} {value!r}; {_EPS_HINT}.")
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"{what} (the damping xi) must be a finite number > 0, got {value!r}; "
                         f"{_EPS_HINT}.")
    return x


def check_eps_for_dtype(eps: float, dtype: "torch.dtype", what: str) -> None:
    """ξ must survive in the state's dtype, or Ω = ω / (Δ² + ξ) divides by 0 where Δ = 0."""
    import torch

    tiny, top = torch.finfo(dtype).tiny, torch.finfo(dtype).max
    if eps > top:
        raise ValueError(f"{what} = {eps:g} overflows {dtype} (largest {top:g}): (θ − θ*)² + ξ "
                         f"would be infinite and every importance 0; lower it ({_EPS_HINT}).")
    if eps < tiny:
        raise ValueError(f"{what} = {eps:g} is below the smallest normal {dtype} number "
                         f"({tiny:g}), so (θ − θ*)² + ξ would be 0 for a weight that did not "
                         f"move and its importance infinite; raise it ({_EPS_HINT}).")


def check_state_dtype(value: Any) -> Optional["torch.dtype"]:
    import torch

    if value is None or value in (torch.float32, torch.float64):
        return value
    if not isinstance(value, torch.dtype):
        raise OptionTypeError(f"state_dtype must be None, torch.float32 or torch.float64, got "
                              f"{type(value).__name__} {value!r}.")
    raise ValueError(f"state_dtype must be None (float32 for 16-bit weights, else the weights' "
                     f"dtype), torch.float32 or torch.float64, got {value!r}.")


def check_choice(value: Any, choices: Sequence[str], what: str) -> str:
    if not isinstance(value, str):
        raise OptionTypeError(f"{what} must be one of {tuple(choices)}, got "
                              f"{type(value).__name__} {value!r}.")
    if value not in choices:
        raise ValueError(f"{what} must be one of {tuple(choices)}, got {value!r}.")
    return value


def check_flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise OptionTypeError(f"{what} must be True or False, got {value!r}.")
    return value


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


def positional(*names: str):
    """A constructor taking `names` positionally and every option by keyword only: too many
    positional arguments is a `TypeError` that says so and shows the call to write, instead of
    Python's count of arguments."""
    def decorate(init):
        @functools.wraps(init)
        def checked(self, *args, **kwargs):
            if len(args) > len(names):
                cls = type(self).__name__
                given = ", ".join(names) or "no argument"
                example = "".join(f"{n}, " for n in names)
                raise TypeError(f"{cls}() takes {given} by position; its options are "
                                f"keyword-only, as in {cls}({example}eps=0.1, "
                                "importance='task').")
            return init(self, *args, **kwargs)
        return checked
    return decorate
