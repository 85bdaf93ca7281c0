r"""SI's state: buffers named like the functional API's, keyed by parameter name.

For parameter `i` of group `_name`: Ω (`si_omega_name_weights_i`),
`θ*` (`si_prev_theta...`), ω (`si_running_omega...`) and
`θ_pre_step` (`si_pre_step_theta...`, not kept with
`importance="delta_params"`). `i` numbers a group's parameters in the order they were
first seen, so a new head never shifts another parameter's state.

- **dtype**: the state's dtype is `state_dtype`, else float32 for 16-bit weights (so that
  ω and Ω do not accumulate in 8 or 11 mantissa bits), else the
  weights' dtype. Memory: 4 numbers of that dtype per regularized weight (3 with
  `delta_params`); for bfloat16/float16 weights 16 bytes each, 8x the weights.
- **growth**: Avalanche's dynamic heads grow their output dimension, so a parameter's first
  dimension may grow (the old slice keeps its state, new rows start with
  `Ω = 0`, `θ* = θ`); any other change of shape is an error that
  names the parameter and both shapes.
- **saving**: `SIState.state_dict()` / `SIState.load_state_dict()`, checked: finite
  values, `Ω ≥ 0` where the clamp promises it, and (`strict`) every saved name
  a parameter of the model it is used with.

Nothing here imports Avalanche.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor

from .functional import (NonFiniteImportanceError, commit_consolidation, consolidated_omega,
                         si_buffer_names)
from .groups import canonical_name
from .sharding import local

__all__ = ["SIState", "STATE_FORMAT", "KINDS", "state_dtype_for"]

STATE_FORMAT = "avalanche_si.SIPlugin/1"
KINDS = ("omega", "prev_theta", "running_omega", "pre_step_theta")
_SAVED = KINDS[:3]  # θ_pre_step is scratch within one step: never saved
_LOW = (torch.float16, torch.bfloat16)


def state_dtype_for(param: Tensor, state_dtype: Optional[torch.dtype]) -> torch.dtype:
    if state_dtype is not None:
        return state_dtype
    return torch.float32 if param.dtype in _LOW else param.dtype


def can_grow(old: torch.Size, new: torch.Size) -> bool:
    """Whether `old` may become `new`: same rank, first dimension not smaller, the
    others equal (a classifier gaining output units)."""
    return len(old) == len(new) and (len(new) == 0 or (new[0] >= old[0] and old[1:] == new[1:]))


def _check_fits(name: str, old: torch.Size, new: torch.Size) -> None:
    if old != new and not can_grow(old, new):
        raise ValueError(
            f"SI state of parameter {name!r} has shape {tuple(old)} but the model's parameter "
            f"has shape {tuple(new)}: only the first dimension may grow (a classifier gaining "
            "outputs, as Avalanche's dynamic heads do). Load the state into the architecture it "
            "was saved from, or start a new SIPlugin for this one.")


def _fitted(old: Tensor, p: Tensor, dtype: torch.dtype, *, from_param: bool) -> Tensor:
    """`old` on `p`'s device in `dtype`, grown to `p`'s shape (checked by `_check_fits`): the
    new rows are `p`'s values (`from_param`: θ*, a path start) or 0. `old` itself if it fits."""
    if old.shape != p.shape:
        new = p.to(dtype, copy=True) if from_param else torch.zeros_like(p, dtype=dtype)
        new[: old.shape[0]] = old.to(new)
        return new
    if old.device != p.device or old.dtype != dtype:
        return old.to(device=p.device, dtype=dtype)
    return old


def _saved_tensor(t, what: str, name: str, shape: Optional[torch.Size]) -> Tensor:
    """`t` (its local shard, for a DTensor) if it is a finite tensor (of `shape`, unless
    None), else the error of a load."""
    t = local(t) if isinstance(t, Tensor) else t
    if not isinstance(t, Tensor):
        raise ValueError(f"SIPlugin state: {what} of parameter {name!r} is missing or not a "
                         "tensor.")
    if shape is not None and t.shape != shape:
        raise ValueError(f"SIPlugin state: {what} of parameter {name!r} has shape "
                         f"{tuple(t.shape)}, expected {tuple(shape)}.")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"SIPlugin state: {what} of parameter {name!r} holds non-finite "
                         "values; it was saved from a run that diverged.")
    return t


class SIState:
    """The buffers of every group and the name index (name → i) of each group.

    Args:
        keys: the groups' keys (`None` for the default group).
        kinds: the buffers kept per parameter (`KINDS`, or its first three).
        state_dtype: see the module's docstring.
    """

    def __init__(self, keys: Iterable[Optional[str]], kinds: tuple[str, ...],
                 state_dtype: Optional[torch.dtype]):
        self.kinds = kinds
        self.state_dtype = state_dtype
        self.store = torch.nn.Module()  # buffers named like the functional API's
        self.index: dict[Optional[str], dict[str, int]] = {k: {} for k in keys}
        self.consolidated: dict[Optional[str], bool] = {k: False for k in self.index}
        #: θ_start of parameter i of each group, kept only after a `restart_path()` and until
        #: the next consolidation: where this period's path began, when that is not θ*
        self.path_start: dict[Optional[str], dict[int, Tensor]] = {k: {} for k in self.index}
        #: names a loaded state holds, to be checked against the first model it meets
        self.unchecked: Optional[dict[Optional[str], set[str]]] = None

    # ------------------------------------------------------------------ buffers

    def name(self, key: Optional[str], kind: str, i: int) -> str:
        return si_buffer_names(i, key)[KINDS.index(kind)]

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        # pickled before restart_path() existed (avalanche_si 0.2)
        self.__dict__.setdefault("path_start", {k: {} for k in self.index})

    @staticmethod
    def path_start_name(key: Optional[str], i: int) -> str:
        return "si_path_start" + si_buffer_names(i, key)[0][len("si_omega"):]

    def mark_path_start(self, key: Optional[str], i: int, param: Tensor) -> None:
        """θ_start ← θ for parameter `i` of group `key` (in the state's dtype)."""
        self.path_start[key][i] = param.detach().to(self.get(key, "prev_theta", i).dtype,
                                                    copy=True)

    def starts(self, key: Optional[str], names: list[str], prev: list[Tensor]) -> Optional[list]:
        """The path starts of `names` (θ* where none was marked), or None if none was."""
        marked = self.path_start[key]
        if not marked:
            return None
        return [marked.get(self.index[key][n], t) for n, t in zip(names, prev)]

    def clear_path_starts(self) -> None:
        for marked in self.path_start.values():
            marked.clear()

    def get(self, key: Optional[str], kind: str, i: int) -> Tensor:
        return self.store._buffers[self.name(key, kind, i)]

    def _set(self, key, kind, i, value: Tensor) -> None:
        self.store._buffers[self.name(key, kind, i)] = value

    def track(self, key: Optional[str], name: str, param: Tensor) -> int:
        """The position of `name` in group `key`, its state created or adapted to
        `param` (device, dtype, grown shape).

        Raises:
            ValueError: the saved state's shape cannot become the parameter's.
        """
        index = self.index[key]
        p = param.detach()
        dtype = state_dtype_for(p, self.state_dtype)
        if name not in index:
            i = index[name] = len(index)
            self._set(key, "omega", i, torch.zeros_like(p, dtype=dtype))
            self._set(key, "prev_theta", i, p.to(dtype, copy=True))
            self._set(key, "running_omega", i, torch.zeros_like(p, dtype=dtype))
            if "pre_step_theta" in self.kinds:
                self._set(key, "pre_step_theta", i, torch.empty_like(p, dtype=dtype))
            return i
        i = index[name]
        for kind in self.kinds:
            old = self.store._buffers.get(self.name(key, kind, i))
            if old is None:  # a state loaded from delta_params mode into another mode
                self._set(key, kind, i, torch.empty_like(p, dtype=dtype))
                continue
            if old.shape != p.shape:
                _check_fits(name, old.shape, p.shape)
            self._set(key, kind, i, _fitted(old, p, dtype, from_param=kind == "prev_theta"))
        start = self.path_start[key].get(i)
        if start is not None:  # grown rows start their path where they are, as θ* does
            self.path_start[key][i] = _fitted(start, p, dtype, from_param=True)
        return i

    def check_shape(self, key: Optional[str], name: str, param: Tensor) -> None:
        """Raise now, as `track()` would later, if `param` cannot take the state."""
        i = self.index[key].get(name)
        if i is not None:
            _check_fits(name, self.get(key, "omega", i).shape, param.shape)

    @torch.no_grad()
    def clamp_omega(self) -> None:
        """Ω ← max(Ω, 0) for every parameter (`clamp` switched from `"none"` to a clamp)."""
        for key, index in self.index.items():
            for i in index.values():
                self.get(key, "omega", i).clamp_(min=0.0)

    @torch.no_grad()
    def mark_path_starts(self, groups: Iterable[Any]) -> None:
        """θ_start ← θ for every parameter of the groups' lists (`restart_path()`)."""
        for g in groups:
            index = self.index[g.key]
            for name, p in zip(g.names, g.params):
                self.mark_path_start(g.key, index[name], p)

    @torch.no_grad()
    def consolidate(self, groups: list[Any], *, contribution: Any, clamp: str,
                    eps_of: Any) -> bool:
        """Every group at once: Ω ← Ω + the clamped `contribution` of the period (an
        estimator's), θ* ← θ, ω ← 0, through the groups' lists (views of these buffers).

        Returns:
            Whether the period looks unmeasured: the weights moved since its start, but no
            importance grew (read with the one host synchronisation the check of Ω makes).

        Raises:
            NonFiniteImportanceError: a new Ω would not be finite. Nothing is stored; every
                group's ω is reset and the path starts are dropped (the task is retrained).
        """
        try:
            new = [consolidated_omega(g.omega, g.prev, g.running, g.params, eps=eps_of(g),
                                      clamp=clamp, contribution=contribution,
                                      names=[f"{n!r} (SI group {g.label})" for n in g.names],
                                      start=self.starts(g.key, g.names, g.prev))
                   for g in groups]
        except NonFiniteImportanceError as exc:
            for key in self.index:
                self.reset_running(key)
            # the task starts again from weights the user restores: a new, empty path
            self.clear_path_starts()
            raise NonFiniteImportanceError(
                f"{exc} Nothing was stored: Ω and θ* of earlier tasks are kept and this "
                "task's running importance ω is reset. Restore the weights from before "
                "this task and train it again.") from None
        unmeasured = self._unmeasured(groups, new)
        for g, omega in zip(groups, new):
            commit_consolidation(g.omega, g.prev, g.running, g.params, omega)
            self.consolidated[g.key] = self.consolidated[g.key] or bool(g.params)
        self.clear_path_starts()
        return unmeasured

    def _unmeasured(self, groups: list[Any], new: list[list[Tensor]]) -> bool:
        """The weights moved since the period's start (θ* or a restart), yet Ω grew nowhere."""
        grew, moved = [], []
        for g, omega in zip(groups, new):
            start = self.starts(g.key, g.names, g.prev) or g.prev
            for old, now, p, s in zip(g.omega, omega, g.params, start):
                grew.append((now - old).max() if now.numel() else now.new_zeros(()))
                moved.append((p.detach() - s).abs().max() if p.numel() else now.new_zeros(()))
        if not grew:
            return False
        device = grew[0].device  # every per-tensor maximum on one device: one host sync
        flags = torch.stack([torch.stack([t.float().to(device) for t in grew]).max() > 0,
                             torch.stack([t.float().to(device) for t in moved]).max() > 0])
        grew_any, moved_any = flags.tolist()
        return moved_any and not grew_any

    def reset_running(self, key: Optional[str]) -> None:
        """ω ← 0 for every parameter of the group (a diverged task's path integral)."""
        for i in self.index[key].values():
            self.get(key, "running_omega", i).zero_()

    # ------------------------------------------------------------- saving, loading

    def state_dict(self, wrap=None) -> dict[str, Any]:
        """The state, tensors cloned; `wrap(key, name, tensor)`, if given, turns each saved
        tensor into what the state dict holds (a DTensor for a sharded parameter's)."""
        wrap = wrap or (lambda key, name, t: t)
        return {
            "format": STATE_FORMAT,
            "groups": {k: {"index": dict(ix), "consolidated": self.consolidated[k]}
                       for k, ix in self.index.items()},
            "buffers": {self.name(k, kind, i): wrap(k, n, self.get(k, kind, i).detach().clone())
                        for k, ix in self.index.items() for n, i in ix.items()
                        for kind in _SAVED},
            # only while a restart_path() waits for its consolidation
            **({"path_start": {self.path_start_name(k, i): wrap(k, self._name_of(k, i),
                                                                 t.detach().clone())
                               for k, marked in self.path_start.items()
                               for i, t in marked.items()}}
               if any(self.path_start.values()) else {}),
        }

    def _name_of(self, key: Optional[str], i: int) -> str:
        return next(n for n, j in self.index[key].items() if j == i)

    def load_state_dict(self, state_dict: Mapping[str, Any], *, clamp: str, labels) -> None:
        """Replace the state by a checked copy of `state_dict` (nothing changes on error).

        `labels` maps a group key to how messages name it.

        Raises:
            ValueError: not a state of this plugin, other groups, missing, inconsistent or
                non-finite buffers, or Ω < 0 under a clamp that forbids it.
        """
        if not isinstance(state_dict, Mapping) or state_dict.get("format") != STATE_FORMAT:
            raise ValueError("not an SIPlugin state: expected a dict from SIPlugin.state_dict() "
                             f"with format {STATE_FORMAT!r}.")
        groups, buffers = state_dict.get("groups"), state_dict.get("buffers")
        if not isinstance(groups, Mapping) or not isinstance(buffers, Mapping):
            raise ValueError("SIPlugin state is missing its 'groups' or 'buffers' entry.")
        if None in self.index and "None" in groups and "None" not in self.index:
            # torch.distributed.checkpoint writes the default group's key None as "None"
            groups = {(None if k == "None" else k): v for k, v in groups.items()
                      if k is not None}
        if set(groups) != set(self.index):
            raise ValueError(f"SIPlugin state has groups {sorted(groups, key=str)} but this plugin "
                             f"has {sorted(self.index, key=str)}; build the plugin with the same "
                             "groups= as the one that saved it.")
        new_buffers: dict[str, Tensor] = {}
        new_index: dict[Optional[str], dict[str, int]] = {}
        for key in self.index:
            label = labels(key)
            raw = dict(groups[key].get("index", {}))
            if sorted(raw.values()) != list(range(len(raw))):
                raise ValueError(f"SIPlugin state: group {label} has a broken parameter index "
                                 f"{raw}.")
            index = {canonical_name(n): i for n, i in raw.items()}  # saved from a compiled model
            if len(index) != len(raw):
                raise ValueError(f"SIPlugin state: group {label} names a parameter twice once "
                                 f"torch.compile's '_orig_mod.' is removed: {sorted(raw)}.")
            for name, i in index.items():
                shape = None
                for kind in _SAVED:
                    bname = self.name(key, kind, i)
                    t = _saved_tensor(buffers.get(bname), f"buffer {bname!r}", name, shape)
                    shape = t.shape
                    if kind == "omega" and clamp != "none" and bool((t < 0).any()):
                        raise ValueError(f"SIPlugin state: importance {bname!r} of parameter "
                                         f"{name!r} has negative entries, which clamp={clamp!r} "
                                         "never produces; it comes from clamp='none': load it "
                                         "into SIPlugin(clamp='none').")
                    new_buffers[bname] = t.detach().clone()
                if "pre_step_theta" in self.kinds:
                    new_buffers[self.name(key, "pre_step_theta", i)] = torch.empty_like(
                        new_buffers[self.name(key, "omega", i)])
            new_index[key] = index
        new_starts = self._loaded_path_starts(state_dict.get("path_start", {}), new_index,
                                              new_buffers)
        self.store._buffers.clear()
        self.store._buffers.update(new_buffers)
        self.index = new_index
        self.path_start = new_starts
        self.consolidated = {k: bool(groups[k].get("consolidated", False)) for k in self.index}
        self.unchecked = {k: set(ix) for k, ix in new_index.items()}

    def _loaded_path_starts(self, saved, index, buffers) -> dict:
        """The checked path starts of a saved state (a `restart_path()` not yet consolidated)."""
        if not isinstance(saved, Mapping):
            raise ValueError("SIPlugin state: its 'path_start' entry is not a dict.")
        starts: dict[Optional[str], dict[int, Tensor]] = {k: {} for k in index}
        unknown = set(saved)
        for key, ix in index.items():
            for name, i in ix.items():
                bname = self.path_start_name(key, i)
                t = saved.get(bname)
                if t is None:
                    continue
                unknown.discard(bname)
                omega = buffers[self.name(key, "omega", i)]
                t = _saved_tensor(t, f"path start {bname!r}", name, omega.shape)
                starts[key][i] = t.detach().to(omega.dtype, copy=True)
        if unknown:
            raise ValueError(f"SIPlugin state: path starts {sorted(unknown)} belong to no "
                             "parameter of the state.")
        return starts

    def check_loaded_names(self, model_names: set[str], *, strict: bool) -> None:
        """After a load: every saved name must be a parameter of the model it first meets
        (with `strict`), and each such parameter must fit its state's shape."""
        if self.unchecked is None:
            return
        unknown = sorted(n for names in self.unchecked.values() for n in names
                         if n not in model_names)
        if unknown and strict:
            shown = ", ".join(map(repr, unknown[:5])) + (" ..." if len(unknown) > 5 else "")
            model = ", ".join(map(repr, sorted(model_names)[:5]))
            raise ValueError(
                f"SIPlugin state names {len(unknown)} parameter(s) the model does not have "
                f"({shown}; the model has {model}, ...): it was saved from another model. Load "
                "it with load_state_dict(state, strict=False) to keep that state unused until "
                "such parameters appear (see the guide 'State, checkpoints, DDP').")
        self.unchecked = None
