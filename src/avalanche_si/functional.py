r"""Synaptic Intelligence, framework-free: the maths on lists of tensors.

Synaptic Intelligence (SI; Zenke, Poole & Ganguli, "Continual Learning Through
Synaptic Intelligence", ICML 2017) gives every regularized weight
`θ_k` an importance `Ω_k` and penalizes moving important
weights away from where an earlier task left them:

- after every optimizer step that moves θ by Δθ
  with gradient g: `ω ← ω - g ⊙ Δθ`
  (the running importance, the path integral of the loss decrease);
- at the end of a task, with `θ_prev` the weights at its start
  and damping `ξ > 0`:
  `Ω ← Ω + max(0, ω / ((θ - θ_prev)² + ξ))`,
  then `θ_prev ← θ` and `ω ← 0`;
- while training later tasks the loss gets
  `c Σ_k Ω_k (θ_k - θ_prev,k)²`.

Conventions (those of the design this module is a drop-in for, and of
van de Ven et al. 2019, appendix A.2.3):

- the clamp at 0 is applied to each task's contribution before it is added to
  Ω (an importance never pushes a weight *away* from an old solution);
- no ½ in the penalty, and the strength c is applied by the
  caller (`si_regularizer()` returns the bare sum);
- `θ_prev` for the first task is the weights at the first call
  of `si_pre_optim_step()`.

Memory: Ω, `θ_prev`, ω and
`θ_pre_step`, i.e. `4n` extra numbers for `n` regularized
weights (`3n` when the step is passed as `delta_params`).

The module has two layers:

1. The four functions `si_pre_optim_step()`, `si_post_optim_step()`,
   `si_compute_importance()` and `si_regularizer()` keep their state as
   buffers on a `net` named `si_omega{_name}_weights_{i}`,
   `si_prev_theta{_name}_weights_{i}`, `si_running_omega{_name}_weights_{i}`
   and `si_pre_step_theta{_name}_weights_{i}` (`_name` is `_<params_name>`,
   empty for `params_name=None`; `i` is the position in `params`), so that
   several parameter groups of one network each carry their own SI. A script
   written against that design runs unchanged against these.
2. The list kernels (`accumulate_*`, `penalty_step()`, `penalty_grad_()`,
   `penalty_value()`, `consolidate()`) that do the work with fused multi-tensor
   (`torch._foreach_*`) operations. The four functions call them, and so does
   `avalanche_si.SynapticIntelligence`, which holds the lists once per task.
   `penalty_step()` and `accumulate_from_pre()`, the two per-step kernels, do
   their work in one pass each on contiguous float32 CPU tensors (C kernels compiled at
   first use, bit-identical to the `_foreach` path: see `avalanche_si._fused`).

Nothing here imports a training framework (importing this module loads no Avalanche).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import _fused
from .options import CLAMP_MODES, check_choice, check_eps

__all__ = [
    "si_pre_optim_step",
    "si_post_optim_step",
    "si_compute_importance",
    "si_regularizer",
    "si_buffer_names",
    "NonFiniteImportanceError",
    "accumulate_from_step",
    "accumulate_from_pre",
    "accumulate_from_delta",
    "penalty_step",
    "penalty_grad",
    "penalty_grad_",
    "penalty_value",
    "deferred_penalty_value",
    "accumulate_squares",
    "SOS_DECAY",
    "consolidate",
    "consolidated_omega",
    "path_contribution",
    "sqrt_contribution",
    "commit_consolidation",
    "CLAMP_MODES",
    "fused_kernels_available",
]

# The public default for the damping ξ of the design this module follows
# (van de Ven et al. use 0.1 and Zenke et al. 0.1 or 1e-3 depending on the benchmark).
DEFAULT_EPS = 1e-3


class NonFiniteImportanceError(FloatingPointError):
    """Raised when consolidation would store a non-finite importance Ω.

    Training diverged, or the damping ξ is too small for the state's dtype; the message
    says which. The Ω and θ* stored from earlier tasks are left untouched.
    """


# --------------------------------------------------------------------------- kernels


def fused_kernels_available() -> tuple[bool, Optional[str]]:
    """Whether `penalty_step()` and `accumulate_from_pre()` run as one-pass C kernels
    in this process (on contiguous float32 CPU tensors), and if not, why.

    The first call compiles them (about 0.2 s). `AVALANCHE_SI_FUSED=0` switches them off.

    Returns:
        `(True, None)`, or `(False, reason)` when every tensor takes the `_foreach` path
        (same results, more passes over memory).
    """
    return _fused.available(), _fused.why_not


@torch.no_grad()
def accumulate_from_step(running: Sequence[Tensor], grads: Sequence[Tensor],
                         neg_delta: Sequence[Tensor]) -> None:
    r"""ω ← ω + g ⊙ (−Δθ), in place, fused over the lists.

    Args:
        running: the running importances ω, updated in place.
        grads: the gradients g the importance is measured with.
        neg_delta: `θ_pre_step - θ`, i.e. minus the step taken.
    """
    if running:
        torch._foreach_addcmul_(running, grads, neg_delta)


@torch.no_grad()
def accumulate_from_pre(running: Sequence[Tensor], grads: Sequence[Tensor],
                        pre: Sequence[Tensor], params: Sequence[Tensor]) -> None:
    r"""ω ← ω + g ⊙ (θ_pre − θ) after a step, θ_pre the weights before it.

    One pass on contiguous float32 CPU tensors (`avalanche_si._fused`), else
    `θ_pre − θ` into a temporary and `accumulate_from_step()`; both give the same bits.
    `pre` is left as it is (the value of the last step's penalty is read from it).

    Args:
        running: the running importances ω, updated in place.
        grads: the gradients g the importance is measured with.
        pre: `θ_pre_step`, the weights before the step.
        params: θ, the weights after it.
    """
    if running and not _fused.accumulate(running, grads, pre, params):
        # θ_pre − θ = −Δθ, a temporary freed at once: pre stays, and nothing else is kept
        accumulate_from_step(running, grads, torch._foreach_sub(pre, params))


@torch.no_grad()
def accumulate_from_delta(running: Sequence[Tensor], grads: Sequence[Tensor],
                          delta: Sequence[Tensor]) -> None:
    r"""ω ← ω − g ⊙ Δθ for a step Δθ given explicitly (`delta_params`)."""
    if running:
        torch._foreach_addcmul_(running, grads, delta, value=-1.0)


#: the decay β of SOS's running average of squared gradients (Benzing 2022's code)
SOS_DECAY = 0.999


@torch.no_grad()
def accumulate_squares(running: Sequence[Tensor], grads: Sequence[Tensor], *,
                       decay: float = SOS_DECAY, weight: Optional[Tensor] = None) -> None:
    r"""SOS's running average of squared gradients, `v ← β v + (1 - β) g²` (Benzing 2022).

    Not bias-corrected, as in his code: `v` starts at 0 after each consolidation, so after
    T steps it holds `(1 - β^T)` of the average (0.99 after 4,600 steps; 0.1 after 100).

    Args:
        running: v, updated in place.
        grads: g, the gradient of the step.
        decay: β.
        weight: None, or a 0-d tensor, 1 or 0 (`1 - found_inf`): 0 leaves v as it is, for a
            step that a GradScaler skips (no host sync).
    """
    if not running:
        return
    if weight is None:
        torch._foreach_mul_(running, decay)
        torch._foreach_addcmul_(running, grads, grads, value=1.0 - decay)
        return
    new = torch._foreach_mul(running, decay)  # the same arithmetic, into a temporary ...
    torch._foreach_addcmul_(new, grads, grads, value=1.0 - decay)
    # ... taken whole (weight 1) or not at all (0): lerp is exact at both ends
    torch._foreach_lerp_(running, new, [weight.to(r.device, r.dtype) for r in running])


@torch.no_grad()
def penalty_grad_(grads: Sequence[Tensor], omega: Sequence[Tensor], params: Sequence[Tensor],
                  prev: Sequence[Tensor], *, strength: float) -> list[Tensor]:
    r"""Add the gradient of `c Σ Ω (θ - θ_prev)²` to `grads`.

    The gradient `2cΩ ⊙ (θ - θ_prev)` is added in closed
    form (no autograd graph, no second backward), in two fused passes.

    Args:
        grads: the parameters' gradients, updated in place.
        omega: Ω.
        params: θ.
        prev: `θ_prev`.
        strength: the SI strength c.

    Returns:
        `d = θ - θ_prev` (the one temporary this allocates): pass it
        to `penalty_value()` for the penalty's value, when it is wanted.
    """
    d = torch._foreach_sub(params, prev)  # under no_grad: no graph, no detach needed
    torch._foreach_addcmul_(grads, omega, d, value=2.0 * strength)
    return d


@torch.no_grad()
def penalty_grad(grads: Sequence[Tensor], omega: Sequence[Tensor], params: Sequence[Tensor],
                 prev: Sequence[Tensor], *, strength: float) -> tuple[list[Tensor], list[Tensor]]:
    r"""Out-of-place `penalty_grad_()`: new tensors `g + 2cΩ ⊙ d`, and `d`.

    `grads` is left as it was, so the task-loss gradient survives the step without being
    recomputed as `(g + 2cΩ d) - 2cΩ d`; the same passes over memory as the
    in-place version, one more n-sized temporary.
    """
    d = torch._foreach_sub(params, prev)
    out = torch._foreach_addcmul(grads, omega, d, value=2.0 * strength)
    # with float32 state for 16-bit weights the sum is promoted: the gradient keeps its dtype
    return [o if o.dtype == g.dtype else o.to(g.dtype) for o, g in zip(out, grads)], d


@torch.no_grad()
def penalty_step(grads: Sequence[Tensor], omega: Sequence[Tensor], params: Sequence[Tensor],
                 prev: Sequence[Tensor], *, strength: float, in_place: bool = True,
                 pre: Optional[Sequence[Tensor]] = None, out: Optional[Sequence[Tensor]] = None
                 ) -> tuple[list[Tensor], Callable[[], Tensor]]:
    r"""One step's penalty gradient, and optionally the checkpoint of the weights before the step.

    Computes `g' = g + 2cΩ ⊙ (θ - θ_prev)` and, when
    `pre` is given, copies θ into it (the `θ_pre_step`
    that `accumulate_from_pre()` needs after the step), reading θ once.
    On contiguous float32 CPU tensors this is one pass over memory with no temporary
    (`avalanche_si._fused`); otherwise `penalty_grad_()` / `penalty_grad()`
    and a copy. Both paths give the same bits for `g'` and `pre`.

    Args:
        grads: g, the gradients.
        omega: Ω.
        params: θ.
        prev: `θ_prev`.
        strength: the SI strength c.
        in_place: add to `grads` (True) or leave them as they are and return new
            tensors (False: the task gradient survives the step, for `importance="task"`).
        pre: where to copy θ, or None.
        out: with `in_place=False`, tensors shaped and typed as `grads` (none of them one
            of `grads`) to write `g'` into instead of allocating new ones.

    Returns:
        `(g', value)`: the gradients to step with (`grads` itself when `in_place`),
        and a function returning `c Σ Ω (θ - θ_prev)²`
        at this step as a 0-d tensor (no host sync; on the fused path summed in float64).
        `value.held` lists the tensors it keeps alive until it is dropped: one float64 sum
        per tensor on the fused path and on the `_foreach` path without `pre` (summed in
        this call, in the memory of the temporary `d`, which is then freed); nothing on the
        `_foreach` path with `pre` (the value is computed from `pre` when read, so read it
        before `pre` is written again).
    """
    fused = _fused.penalty(grads, omega, params, prev, pre, two_c=2.0 * strength,
                           in_place=in_place, out=out) if grads else None
    if fused is not None:
        out, sums = fused
        value = partial(_summed_value, sums, strength, params[0].dtype)
        value.held = [sums]
        return out, value
    if in_place:
        out, d = list(grads), penalty_grad_(grads, omega, params, prev, strength=strength)
    elif out is not None:  # g' written into given tensors: the same bits as penalty_grad()'s
        out = list(out)
        torch._foreach_copy_(out, grads)
        d = penalty_grad_(out, omega, params, prev, strength=strength)
    else:
        out, d = penalty_grad(grads, omega, params, prev, strength=strength)
    if pre:
        torch._foreach_copy_(pre, params)
        return out, deferred_penalty_value(omega, pre, prev, strength=strength)  # d not kept
    # no copy of θ to read the value from later: summed now, in d's memory, which is then freed
    sums = _omega_d2_sums(omega, d)
    value = partial(_summed_value, sums, strength, params[0].dtype)
    value.held = [sums]
    return out, value


def deferred_penalty_value(omega: Sequence[Tensor], pre: Sequence[Tensor],
                           prev: Sequence[Tensor], *, strength: float) -> Callable[[], Tensor]:
    r"""The penalty `c Σ Ω (θ_pre - θ*)²` of the step whose weights `pre` holds, as a
    function computing it when called (what `penalty_step()` returns when given `pre`;
    `value.held` is empty: it keeps nothing alive). Call it before `pre` is written again."""
    value = partial(_value_from_pre, omega, pre, prev, strength)
    value.held = []
    return value


def _value_from_pre(omega, pre, prev, strength: float) -> Tensor:
    """The penalty at the step whose weights `pre` holds: `pre − θ*` is the `d` of that
    step, to the bit (the same subtraction of the same numbers)."""
    d = torch._foreach_sub(pre, prev)
    return _summed_value(_omega_d2_sums(omega, d), strength, d[0].dtype)


def _summed_value(sums: Tensor, strength: float, dtype: torch.dtype) -> Tensor:
    return (sums.sum() * strength).to(dtype)


@torch.no_grad()
def penalty_value(omega: Sequence[Tensor], d: Sequence[Tensor], *, strength: float) -> Tensor:
    r"""`c Σ Ω d²` as a 0-d tensor on the tensors' device (no host sync).

    Kept out of `penalty_grad_()` so that training pays for the value only when
    somebody reads it (logging every k steps, say).
    """
    if not d:
        return torch.zeros(())
    return _summed_value(_omega_d2_sums(omega, torch._foreach_mul(d, 1.0)), strength, d[0].dtype)


def _omega_d2_sums(omega: Sequence[Tensor], d: Sequence[Tensor]) -> Tensor:
    """The per-tensor sums of Ω d² (1-d, float64 where the device has it), computed in `d`'s
    memory (overwritten) with a fixed number of multi-tensor kernels, however many tensors.

    Ω may be negative (`clamp="none"`), so the sum is Σ|x| − 2 Σ|min(x, 0)|: two L1 norms,
    the second exactly 0 when every Ω ≥ 0."""
    torch._foreach_mul_(d, d)
    torch._foreach_mul_(d, omega)
    acc = torch.float32 if d[0].device.type == "mps" else torch.float64
    total = torch.stack(torch._foreach_norm(d, 1)).to(acc)
    torch._foreach_clamp_max_(d, 0.0)
    return total - 2.0 * torch.stack(torch._foreach_norm(d, 1)).to(acc)


@torch.no_grad()
def path_contribution(running: Sequence[Tensor], params: Sequence[Tensor],
                      start: Sequence[Tensor], *, eps: float) -> list[Tensor]:
    r"""A period's contribution to Ω in SI's path integral, before any clamp:
    `ω / ((θ − θ_start)² + ξ)` (new tensors; `running` is left as it is)."""
    denom = torch._foreach_sub([p.detach() for p in params], start)
    torch._foreach_mul_(denom, denom)
    torch._foreach_add_(denom, eps)
    return torch._foreach_div(running, denom)


@torch.no_grad()
def sqrt_contribution(running: Sequence[Tensor]) -> list[Tensor]:
    r"""SOS's contribution to Ω: `√max(v, 0)` of its running average v of squared gradients,
    not divided by the path length (Benzing 2022, whose damping 1.0 is the divisor)."""
    return torch._foreach_sqrt(torch._foreach_clamp_min(running, 0.0))


@torch.no_grad()
def consolidated_omega(omega: Sequence[Tensor], prev: Sequence[Tensor], running: Sequence[Tensor],
                       params: Sequence[Tensor], *, eps: float, clamp: str = "task",
                       names: Optional[Sequence[str]] = None, sos: bool = False,
                       start: Optional[Sequence[Tensor]] = None,
                       contribution: Optional[Callable[..., list[Tensor]]] = None) -> list[Tensor]:
    r"""The Ω that `consolidate()` would store, checked, without storing anything.

    `start` is where the path began, θ_start, when the weights were moved after the last
    consolidation (re-initialised, as in Benzing's code): Δ = θ − θ_start. Default: `prev`.

    With `sos=True`, `running` is SOS's running average v of squared gradients and the
    contribution is `√v` (`sqrt_contribution()`), not divided by the path length (Benzing
    2022's SOS, whose damping 1.0 is the divisor: `eps` is not used). `contribution`, a
    function `(running, params, start, *, eps) -> list`, computes it instead (an importance
    estimator's, `avalanche_si.estimators`); default `path_contribution()`.

    Raises:
        NonFiniteImportanceError: a new Ω would be NaN or infinite; the message names the
            parameter and the cause (a running importance ω that is already not finite,
            weights that are not finite, or ω / (Δ² + ξ) overflowing the state's dtype).
    """
    check_choice(clamp, CLAMP_MODES, "clamp")
    if not omega:
        return []
    params = [p.detach() for p in params]
    start = prev if start is None else start
    if contribution is not None:
        added = contribution(running, params, start, eps=eps)
    elif sos:
        added = sqrt_contribution(running)
    else:
        added = path_contribution(running, params, start, eps=eps)
    if clamp == "task":
        torch._foreach_clamp_min_(added, 0.0)
    new_omega = torch._foreach_add(omega, added)
    if clamp == "total":
        torch._foreach_clamp_min_(new_omega, 0.0)
    # One host synchronisation per task, not per step.
    finite = torch.stack([torch.isfinite(t).all() for t in new_omega])
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0])
        name = names[bad] if names is not None else f"#{bad}"
        raise NonFiniteImportanceError(
            f"SI importance Ω of parameter {name} is not finite: "
            f"{_why_not_finite(running[bad], params[bad], start[bad], eps)}")
    return new_omega


def _why_not_finite(running: Tensor, param: Tensor, prev: Tensor, eps: float) -> str:
    """What made ω / ((θ − θ*)² + ξ) non-finite, for the error message (runs on failure only)."""
    bad_run = int((~torch.isfinite(running)).sum())
    if bad_run:
        return (f"its running importance ω has {bad_run} non-finite entries of "
                f"{running.numel()}: training diverged (lower the learning rate, or SI's "
                "strength c if it is large), or a step "
                "that torch.amp.GradScaler skipped was counted (pass scaler=..., or call "
                "avalanche_si.amp.unscale_ with the functional API; see the guide 'Recovering "
                "from divergence').")
    bad_w = int((~torch.isfinite(param)).sum())
    if bad_w:
        return (f"{bad_w} of its weights are not finite: training diverged; lower the "
                "learning rate, or SI's strength c if it is large (the penalty's gradient "
                "2cΩ(θ − θ*) grows with it).")
    dtype = torch.promote_types(running.dtype, prev.dtype)
    return (f"ω is finite (max |ω| = {float(running.abs().max()):.3g}) but ω / ((θ − θ*)² + ξ) "
            f"overflows {dtype} (largest {torch.finfo(dtype).max:.3g}) where the weights barely "
            f"moved: the damping ξ = {eps:g} is too small for this dtype and these gradients; "
            "raise eps.")


@torch.no_grad()
def commit_consolidation(omega: Sequence[Tensor], prev: Sequence[Tensor],
                         running: Sequence[Tensor], params: Sequence[Tensor],
                         new_omega: Sequence[Tensor]) -> None:
    r"""Store a `consolidated_omega()`: Ω ← new Ω, θ_prev ← θ, ω ← 0."""
    if omega:
        torch._foreach_copy_(omega, new_omega)
        torch._foreach_copy_(prev, [p.detach() for p in params])
        torch._foreach_zero_(running)


@torch.no_grad()
def consolidate(omega: Sequence[Tensor], prev: Sequence[Tensor], running: Sequence[Tensor],
                params: Sequence[Tensor], *, eps: float,
                names: Optional[Sequence[str]] = None, clamp: str = "task",
                start: Optional[Sequence[Tensor]] = None) -> None:
    r"""End of a task: Ω ← Ω + max(0, ω / ((θ − θ_prev)² + ξ)); θ_prev ← θ; ω ← 0.

    `clamp` says where the max(0, ·) goes, following the conventions of the existing
    implementations: `"task"` (default, above: each task's contribution), `"total"`
    (Ω ← max(0, Ω + ω / ((θ − θ_prev)² + ξ)), Zenke et al.'s code) or `"none"` (no clamp,
    van de Ven's code; Ω may then be negative).

    Checks the result before storing anything: if any new Ω would be NaN or
    infinite, raises `NonFiniteImportanceError` naming the parameter and the cause,
    and leaves `omega`, `prev` and `running` untouched.

    Args:
        omega: Ω (all four lists of equal length and shapes).
        prev: `θ_prev`.
        running: ω.
        params: θ.
        eps: the damping `ξ > 0`.
        names: how the error message names each parameter (default: `#<position>`).
        start: where this task's path began when the weights were moved since the last
            consolidation (re-initialised): Δ = θ − start instead of θ − θ_prev. θ_prev,
            the penalty's anchor, still becomes θ.
    """
    new = consolidated_omega(omega, prev, running, params, eps=eps, clamp=clamp, names=names,
                             start=start)
    commit_consolidation(omega, prev, running, params, new)


# ----------------------------------------------------------------- the four functions


def si_buffer_names(param_id: int, params_name: Optional[str] = None) -> tuple[str, str, str, str]:
    """Buffer names of Ω, θ_prev, ω and θ_pre_step for the `param_id`-th parameter.

    Returns:
        `("si_omega{_name}_weights_{i}", "si_prev_theta{_name}_weights_{i}",
        "si_running_omega{_name}_weights_{i}", "si_pre_step_theta{_name}_weights_{i}")`
        with `_name = "_" + params_name` (empty when `params_name` is None).
    """
    suffix = f"{'' if params_name is None else '_' + params_name}_weights_{param_id}"
    return (f"si_omega{suffix}", f"si_prev_theta{suffix}",
            f"si_running_omega{suffix}", f"si_pre_step_theta{suffix}")


def _set_buffer(net: torch.nn.Module, name: str, value: Optional[Tensor]) -> None:
    if name in net._buffers:
        net._buffers[name] = value
    else:
        net.register_buffer(name, value)


def _active(params: Sequence[Tensor]) -> list[tuple[int, Tensor]]:
    return [(i, p) for i, p in enumerate(params) if p.requires_grad]


def _check_fits(buffer: Optional[Tensor], p: Tensor, i: int, name: str) -> None:
    """The state held for position `i` must have the parameter's shape: a list in another
    order, or another model's parameters, would otherwise be paired with the wrong state."""
    if buffer is not None and buffer.shape != p.shape:
        raise ValueError(f"SI state {name!r} has shape {tuple(buffer.shape)} but parameter #{i} "
                         f"has shape {tuple(p.shape)}: pass the same parameters, in the same "
                         "order, to every call for this net and params_name.")


def check_not_meta(p: Tensor, what: str) -> None:
    """SI needs the weights' values: a parameter on the meta device has none yet."""
    if p.is_meta:
        raise ValueError(f"SI: {what} is on the meta device (not materialized yet): give SI the "
                         "model after its weights exist (model.to_empty(device=...) and their "
                         "initialisation, or loading a checkpoint).")


def _check_order(net: torch.nn.Module, params: Sequence[Tensor],
                 params_name: Optional[str]) -> None:
    """The same parameter objects in another order would pair each with another's state: refuse
    that (new objects, such as a grown head, are fine). The order is remembered on `net`."""
    seen = net.__dict__.setdefault("_si_param_order", {})
    ids = tuple(id(p) for p in params)
    old = seen.get(params_name)
    if old is not None and old != ids and sorted(old) == sorted(ids):
        raise ValueError(f"si_*: the parameters of group {params_name!r} come in another order "
                         "than before, so each would meet another's state: pass them in the "
                         "same order every time.")
    seen[params_name] = ids


def si_pre_optim_step(net: torch.nn.Module, params: Sequence[Tensor],
                      params_name: Optional[str] = None, no_pre_step_ckpt: bool = False) -> None:
    r"""Call right before `optimizer.step()`: checkpoint `θ_pre_step`.

    On the very first call for a parameter it also stores
    `θ_prev = θ` (the weights at the start of the first task,
    which normalize Ω at its end).

    Args:
        net: the module that holds the SI state as buffers.
        params: the parameters to regularize; those with `requires_grad=False`
            are skipped (their position still counts for the buffer names).
        params_name: the group's name, for several groups on one `net`.
        no_pre_step_ckpt: do not checkpoint `θ_pre_step`; then
            `si_post_optim_step()` must get `delta_params` (3n memory, not 4n).
            One call is still needed before the first update of the first task.
    """
    for i, p in _active(params):  # every check before anything is written
        check_not_meta(p, f"parameter #{i}")
        prev_name = si_buffer_names(i, params_name)[1]
        _check_fits(getattr(net, prev_name, None), p, i, prev_name)
    _check_order(net, params, params_name)
    for i, p in _active(params):
        _, prev_name, _, pre_name = si_buffer_names(i, params_name)
        if getattr(net, prev_name, None) is None:
            _set_buffer(net, prev_name, p.detach().clone())
        if not no_pre_step_ckpt:
            _set_buffer(net, pre_name, p.detach().clone())


def si_post_optim_step(net: torch.nn.Module, params: Sequence[Tensor],
                       params_name: Optional[str] = None,
                       delta_params: Optional[Sequence[Tensor]] = None) -> None:
    r"""Call right after `optimizer.step()`: `ω ← ω - g ⊙ Δθ`.

    g is `p.grad`; `Δθ = θ - θ_pre_step`, or
    `delta_params[i]` when given (then `θ_pre_step` is not needed,
    nor is the optimizer step itself: only the gradients must be there).

    Raises:
        ValueError: a parameter has no gradient, or `si_pre_optim_step()` was
            not called before this step and no `delta_params` were given.
    """
    active = _active(params)
    if delta_params is not None and len(delta_params) != len(params):
        raise ValueError(f"delta_params has {len(delta_params)} entries but params has "
                         f"{len(params)}: pass one step tensor per parameter, in the same order.")
    running, grads, other = [], [], []
    names = []
    for i, p in active:
        _, _, run_name, pre_name = si_buffer_names(i, params_name)
        if p.grad is None:
            raise ValueError(f"si_post_optim_step: parameter #{i} has no gradient; call "
                             "loss.backward() before the optimizer step and this function.")
        omega = getattr(net, run_name, None)
        _check_fits(omega, p, i, run_name)
        if omega is None:
            omega = torch.zeros_like(p, memory_format=torch.preserve_format).detach()
            _set_buffer(net, run_name, omega)
        if delta_params is None:
            pre = getattr(net, pre_name, None)
            if pre is None:
                raise ValueError("si_post_optim_step needs the weights from before the step: "
                                 "call si_pre_optim_step(net, params) right before "
                                 "optimizer.step(), or pass delta_params.")
            other.append(pre)
            names.append(pre_name)
        else:
            if delta_params[i].shape != p.shape:
                raise ValueError(f"delta_params[{i}] has shape {tuple(delta_params[i].shape)} but "
                                 f"parameter #{i} has shape {tuple(p.shape)}: pass each step "
                                 "with its parameter's shape (broadcasting is refused).")
            other.append(delta_params[i])
        running.append(omega)
        grads.append(p.grad)
    if delta_params is None:
        # A step that moved nothing adds nothing, also with a non-finite gradient (a step that
        # GradScaler skipped, amp.unscale_ not called): its inf·0 would make ω NaN
        live = [p for _, p in active]
        grads = [torch.where(pre == p, 0.0, g) for g, pre, p in zip(grads, other, live)]
        accumulate_from_pre(running, grads, other, live)
        for name in names:  # a second post-step without a new pre-step is an error
            _set_buffer(net, name, None)
    else:
        accumulate_from_delta(running, grads, [d.detach() for d in other])


def si_compute_importance(net: torch.nn.Module, params: Sequence[Tensor],
                          params_name: Optional[str] = None, epsilon: float = DEFAULT_EPS) -> None:
    r"""Call after training a task: consolidate Ω.

    `Ω ← Ω + max(0, ω / ((θ - θ_prev)² + ξ))`,
    then `θ_prev ← θ` and ω is reset.

    Args:
        epsilon: the damping `ξ > 0` (default 1e-3).

    Raises:
        ValueError: no `si_pre_optim_step()` / `si_post_optim_step()` call
            happened since the last consolidation, or `epsilon <= 0`.
        NonFiniteImportanceError: the new Ω would not be finite. Ω and θ_prev are left as
            they were and ω is dropped: restore the weights from before the task and train
            it again.
    """
    epsilon = check_eps(epsilon, "epsilon")
    omega, prev, running, live, names = [], [], [], [], []
    for i, p in _active(params):
        om_name, prev_name, run_name, _ = si_buffer_names(i, params_name)
        if getattr(net, prev_name, None) is None:
            raise ValueError("si_compute_importance: no SI state for this task; call "
                             "si_pre_optim_step(net, params) before the first optimizer step.")
        if getattr(net, run_name, None) is None:
            raise ValueError("si_compute_importance: no running importance; call "
                             "si_post_optim_step(net, params) after every optimizer step "
                             "of the task before computing its importance.")
        _check_fits(getattr(net, prev_name), p, i, prev_name)
        if getattr(net, om_name, None) is None:
            _set_buffer(net, om_name, torch.zeros_like(p).detach())
        omega.append(getattr(net, om_name))
        prev.append(getattr(net, prev_name))
        running.append(getattr(net, run_name))
        live.append(p)
        names.append(f"#{i}" + ("" if params_name is None else f" of group {params_name!r}"))
    try:
        consolidate(omega, prev, running, live, eps=epsilon, names=names)
    finally:  # ω is reset, also after an error: the next (or retrained) task starts anew
        for i, _ in _active(params):
            _set_buffer(net, si_buffer_names(i, params_name)[2], None)


def si_regularizer(net: torch.nn.Module, params: Sequence[Tensor],
                   params_name: Optional[str] = None) -> Tensor:
    r"""The SI penalty `Σ_k Ω_k (θ_k - θ_prev,k)²`.

    No strength and no ½: multiply by c yourself. Differentiable
    with respect to `params`.

    Raises:
        ValueError: `si_compute_importance()` was never called.
    """
    _check_order(net, params, params_name)
    reg: Tensor | float = 0.0
    for i, p in _active(params):
        om_name, prev_name, _, _ = si_buffer_names(i, params_name)
        omega = getattr(net, om_name, None)
        prev = getattr(net, prev_name, None)
        if omega is None or prev is None:
            raise ValueError("si_regularizer needs importances: call "
                             "si_compute_importance(net, params) after training the first "
                             "task before adding the penalty.")
        _check_fits(prev, p, i, prev_name)
        reg = reg + (omega * (p - prev).pow(2)).sum()
    if isinstance(reg, float):
        return torch.zeros((), device=params[0].device if params else None)
    return reg
