r"""Sharded parameters (FSDP2's `fully_shard`, DTensors): SI works on each rank's own shard.

SI is elementwise: Ω, θ*, ω and θ before the step of a weight depend on that weight alone. On
a model sharded with `torch.distributed.fsdp.fully_shard` every parameter is a `DTensor` whose
rank-local shard (`Shard(0)`: a slice of rows) is what the optimizer steps, and its gradient a
`DTensor` sharded the same way after the backward pass's reduce-scatter. SI keeps its state
for the local shard only (`4n / world_size` numbers per rank) and does all its arithmetic on
local tensors, with no communication of its own; only the checkpoint sees global tensors:
`state_dict()` hands out DTensors laid out like the parameters, which
`torch.distributed.checkpoint` saves sharded and loads into any world size.

Refused, when SI binds: FSDP1 (`FullyShardedDataParallel`, whose flat parameters mix several
weights in one tensor), placements other than `Shard(0)` and `Replicate()` (tensor
parallelism's `Shard(1)`, say), and what needs a gradient or a step SI cannot compute on a
shard (see `check_group`). Nothing here imports a training framework.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["is_sharded", "local", "global_like", "check_model", "check_group"]


def _dtensor_type() -> Optional[type]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_sharded(t: Any) -> bool:
    """Whether `t` is a DTensor (a parameter or gradient of a sharded model)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """This rank's part of `t` (its local shard, no copy), or `t` itself."""
    return t._local_tensor if is_sharded(t) else t


def global_like(t: Tensor, param: Tensor) -> Tensor:
    """`t`, a tensor shaped like `param`'s local shard, as a DTensor laid out like `param`
    (itself when `param` is no DTensor). No copy and no communication."""
    if not is_sharded(param):
        return t
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def check_model(model: torch.nn.Module) -> None:
    """Refuse FSDP1: its flat parameters hold many weights in one tensor, named by FSDP."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            "SI does not support FSDP1 (FullyShardedDataParallel): its flat parameters mix "
            "many weights in one tensor. Shard the model with FSDP2, "
            "torch.distributed.fsdp.fully_shard, which SI supports (see the guide 'Sharded "
            "training').")


def check_group(name: str, param: Tensor) -> None:
    """Refuse a DTensor parameter laid out other than SI can serve shard by shard."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(param.placements)
    if not all(p == Shard(0) or isinstance(p, Replicate) for p in placements):
        raise ValueError(
            f"SI: parameter {name!r} is laid out as {placements}; SI serves DTensor parameters "
            "sharded on their first dimension (Shard(0), as fully_shard shards them) or "
            "replicated, not other placements (tensor parallelism's Shard(1), say).")


def check_estimator(estimator: Any, sharded: Sequence[str]) -> None:
    """Refuse an estimator that needs what SI cannot compute on a shard."""
    if not sharded:
        return
    what = None
    if estimator.independent_gradient:
        what = ("an independent mini-batch's gradient (record_independent_gradient uses "
                "torch.autograd.grad, which does not reduce-scatter as FSDP's backward does)")
    elif estimator.predicted_step:
        what = "the sharded optimizer's step, predicted from its state"
    if what is not None:
        raise ValueError(
            f"importance={estimator.name!r} needs {what}, which SI does not compute on a "
            f"sharded model ({sharded[0]!r} is a DTensor): use importance='total', 'task', "
            "'sos' or 'onaf'.")
