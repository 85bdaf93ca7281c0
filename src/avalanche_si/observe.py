r"""What SI observes of the loop around it, instead of trusting what it was told.

SI needs a few facts about each step that the loop may not tell it truthfully: whether an
optimizer stepped its parameters between `before_step()` and `after_step()` (if none did, the
gradients accumulate over another backward pass), which optimizer that was, whether a
`GradScaler` stepped it, and whether the gradient and the weights the optimizer used are the
ones `before_step()` saw. They are read here from the optimizers themselves:

- torch calls two global hooks around every `torch.optim.Optimizer.step()` in the process
  (`register_optimizer_step_pre_hook` / `..._post_hook`). The post-hook counts the steps and
  keeps the last few: the optimizer, and the `GradScaler` that called it if one did (read from
  the calling frames: `GradScaler.step` is the only way a scaler steps an optimizer). A step
  counts for SI when the optimizer that took it holds one of SI's parameters, whatever object
  SI was bound to: a wrapper (Accelerate's `AcceleratedOptimizer`, Lightning's
  `LightningOptimizer`) steps the optimizer it wraps, and that one is seen; so is a new
  optimizer made without `bind()`.
- The pre-hook refuses, before anything moves, a step that would not use what
  `before_step()` prepared: gradient tensors replaced since (`zero_grad()` and another
  backward pass, SAM's second pass; `p.grad = ...`), weights changed since by anything but an
  optimizer step (`p.data = ...` or in place: SAM's `second_step`), or a closure given to the
  step that changes the gradients when called (their version counters).

Each check is a few host operations per step and reads no tensor's values: no host
synchronisation. Nothing here imports a training framework.
"""

from __future__ import annotations

import collections
import operator
import sys
import weakref
from typing import Any, Iterable, Optional

import torch
from torch.amp.grad_scaler import GradScaler

__all__ = ["install", "unwrap_optimizer", "Watch", "steps_taken"]

#: optimizer steps taken in this process (any optimizer), and the last few: (the count after
#: it, the optimizer, the GradScaler that called it or None), newest last; a bounded list, so
#: that it keeps no optimizer alive for long
_count = 0
_RECENT: "collections.deque[tuple]" = collections.deque(maxlen=64)
#: the watches whose engine is between before_step() and after_step()
_OPEN: list = []
_installed = False
#: the code of the GradScaler methods that call optimizer.step()
_SCALER_CODE = frozenset(f.__code__ for f in (GradScaler.step, GradScaler._maybe_opt_step))


def steps_taken() -> int:
    """Optimizer steps taken in this process so far (any optimizer)."""
    return _count


def _scaler_calling() -> Optional[GradScaler]:
    """The enabled GradScaler whose `step()` called the optimizer step in progress, if any."""
    frame = sys._getframe(2)
    for _ in range(6):
        if frame is None:
            return None
        if frame.f_code in _SCALER_CODE:
            scaler = frame.f_locals.get("self")
            return scaler if isinstance(scaler, GradScaler) and scaler.is_enabled() else None
        frame = frame.f_back
    return None


def _post(optimizer, args, kwargs) -> None:
    global _count
    _count += 1
    _RECENT.append((_count, optimizer, _scaler_calling()))


def _pre(optimizer, args, kwargs):
    if not _OPEN:
        return None
    given = closure = args[1] if len(args) > 1 else kwargs.get("closure")
    for watch in tuple(_OPEN):
        closure = watch.check_before_update(optimizer, closure)
    if closure is given:
        return None
    if len(args) > 1:  # the step gets the watched closure instead
        return (args[0], closure, *args[2:]), kwargs
    return args, dict(kwargs, closure=closure)


def install() -> None:
    """Register the two global hooks (once per process)."""
    global _installed
    if not _installed:
        from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                           register_optimizer_step_pre_hook)

        register_optimizer_step_pre_hook(_pre)
        register_optimizer_step_post_hook(_post)
        _installed = True


def unwrap_optimizer(optimizer: Any) -> tuple[Optional[torch.optim.Optimizer],
                                               Optional[GradScaler]]:
    """The `torch.optim.Optimizer` that really steps under `optimizer` (a wrapper exposing it
    as `.optimizer`: Accelerate's, Lightning's), and the GradScaler a wrapper holds (Accelerate's
    `AcceleratedOptimizer.scaler`), or None."""
    scaler = None
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        found = getattr(optimizer, "scaler", None)
        if scaler is None and isinstance(found, GradScaler) and found.is_enabled():
            scaler = found
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    return optimizer, scaler


class Watch:
    """One engine's view of the optimizer steps: set up with its parameters when the per-step
    lists are built, opened by `before_step()` and closed by `after_step()`."""

    def __init__(self) -> None:
        self._ids: frozenset = frozenset()
        #: per group in the step: (its parameters in the step, the gradient tensors the step
        #: is to use, the version of the first one, the first weight's version and address)
        self._open: list[tuple[list, list, int, int, int]] = []
        self._holds: "weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple]" = \
            weakref.WeakKeyDictionary()
        self._since = self._closed = _count
        self._skip = False
        self.seen_any = False  # an optimizer holding SI's parameters was seen stepping

    def __getstate__(self) -> dict:
        return {"seen_any": self.seen_any}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self.seen_any = state.get("seen_any", False)

    def track(self, params: Iterable[torch.Tensor]) -> None:
        """SI regularizes `params` from now on."""
        self._ids = frozenset(map(id, params))
        self._holds = weakref.WeakKeyDictionary()

    def holds(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether `optimizer` steps one of SI's parameters (read again when its number of
        parameter groups changes: `add_param_group()`)."""
        groups = getattr(optimizer, "param_groups", ())
        known = self._holds.get(optimizer)
        if known is None or known[0] != len(groups):
            known = self._holds[optimizer] = (len(groups), any(
                id(p) in self._ids for group in groups for p in group["params"]))
        return known[1]

    def restart(self) -> None:
        """A task starts: optimizer steps before now are none of SI's business."""
        self._closed = _count
        self._skip = False

    def skip(self) -> None:
        """The next optimizer step has no gradient for SI's parameters: it moves none of
        them, and needs no measuring."""
        self._skip = True

    def open(self, entries: list) -> None:
        """`before_step()` ran: `entries` holds, per group, (its parameters in the step, the
        gradient tensors the step is to use, then the first gradient's version, and the first
        weight's version and address)."""
        self._since = _count
        self._open = entries
        if self not in _OPEN:
            _OPEN.append(self)

    def close(self) -> None:
        if self in _OPEN:
            _OPEN.remove(self)
        self._closed = _count

    def gradients_untouched(self) -> bool:
        """Whether the gradients are still those `before_step()` handed to the step, unchanged
        since (checked when no optimizer stepped: SI then takes back what it added)."""
        return all(params[0].grad is handed[0] and handed[0]._version == version
                   for params, handed, version, _, _ in self._open)

    def stepped(self) -> list[tuple[torch.optim.Optimizer, Optional[GradScaler]]]:
        """The optimizers holding SI's parameters that stepped since `open()`, each with the
        GradScaler that stepped it (or None); empty when none did."""
        found = self._stepped_since(self._since)
        if found:
            self.seen_any = True
        return found

    def taken(self) -> bool:
        """Whether an optimizer holding SI's parameters stepped since `open()` (the watch still
        open: `after_step()` is still to come)."""
        return self in _OPEN and bool(self._stepped_since(self._since))

    def stepped_after_close(self) -> bool:
        """Whether an optimizer holding SI's parameters stepped since the last `close()` (or a
        skipped step's)."""
        if self._skip:
            self._skip = False
            self._closed = _count
            return False
        return bool(self._stepped_since(self._closed))

    def _stepped_since(self, count: int) -> list:
        if _count == count:
            return []
        found, seen = [], set()
        for at, optimizer, scaler in reversed(_RECENT):
            if at <= count:
                break
            if id(optimizer) not in seen and self.holds(optimizer):
                seen.add(id(optimizer))
                found.append((optimizer, scaler))
        return found

    def check_before_update(self, optimizer: torch.optim.Optimizer, closure: Any) -> Any:
        """The pre-hook: an optimizer is about to step; refuse it if it holds SI's parameters
        and would not use what `before_step()` prepared. Returns the closure the step should
        get: a closure given is watched, so that one that computes the gradient again (after
        before_step() added the penalty to it) is refused before the update."""
        if not self.holds(optimizer):
            return closure
        self._check_unchanged()
        if closure is None:
            return closure
        return _Watched(self, closure)

    def _check_unchanged(self) -> None:
        for params, handed, _, version, ptr in self._open:
            if not all(map(operator.is_, [p.grad for p in params], handed)):
                self.close()
                raise RuntimeError(
                    "SI: gradient tensors were replaced between before_step() and the "
                    "optimizer step (zero_grad() and another backward pass, as SAM's second "
                    "pass does, or p.grad = ...), so SI cannot measure the step with the "
                    "gradient it uses. Change gradients in place (p.grad.clamp_(...)), or "
                    "before before_step(); see the guide 'SI in your own training loop', SAM "
                    "and closures.")
            weight = params[0]  # (changed by an optimizer's step already taken: several
            if _count == self._since and (  # optimizers in one step, fine)
                    weight.data_ptr() != ptr or weight._version != version):
                self.close()
                raise RuntimeError(
                    "SI: the weights changed between before_step() and the optimizer step (p.data "
                    "= ..., or in place: SAM's second_step() puts them back), so SI would measure "
                    "the step from the wrong weights. See the guide 'SI in your own training "
                    "loop', SAM and closures.")


class _Watched:
    """A closure given to an optimizer step after `before_step()`: if calling it changes the
    gradients (another backward pass: SAM's closure, a closure that recomputes the loss), the
    penalty `before_step()` added is gone, and the step is refused before the update (most
    optimizers call the closure first). A closure that leaves them (Lightning's, in manual
    optimization) changes nothing. Read on the host: each gradient's version counter."""

    def __init__(self, watch: Watch, closure: Any):
        self.watch, self.closure = watch, closure

    def __call__(self, *args, **kwargs):
        before = [(params[0], params[0].grad, getattr(params[0].grad, "_version", None))
                  for params, _, _, _, _ in self.watch._open]
        out = self.closure(*args, **kwargs)
        for weight, grad, version in before:
            if weight.grad is not grad or getattr(grad, "_version", None) != version:
                self.watch.close()
                raise RuntimeError(
                    "SI: the optimizer step's closure computed the gradient again after "
                    "before_step() added SI's penalty to it: the penalty would be lost. Call "
                    "before_step() inside the closure, after its backward pass (see the guide "
                    "'SI in your own training loop', SAM and closures).")
        return out
