r"""CUDA-graph replay of SI's per-step work: one launch per hook, however many tensors.

On a GPU, SI's per-step arithmetic is a few fused `_foreach` kernels that move about
11 floats per weight, microseconds of memory traffic; issuing them from Python costs more
than that, and the cost grows with the number of parameter tensors (each `_foreach`
kernel takes a bounded number of tensors, so a long list is several launches). With
`cuda_graphs=True` (`SynapticIntelligence`, `SIPlugin`) each step hook's work for a
parameter group is captured once as a CUDA graph and replayed afterwards: one launch per
hook and group, with the *same kernels*, so the results are bit-identical to the eager
path.

A graph bakes in the addresses of every tensor it reads and writes, and its scalars. What
may change between steps is therefore part of a key that is compared before each replay:

- the addresses of the weights θ and the gradients g;
- the strength c, whether the penalty is on, which parameters have a gradient this step;
- SI's own state (Ω, θ*, ω, θ_pre, and with `importance="task"` the tensors the task
  gradient is copied into, since `.grad` gets the penalty in place) is not in the key: its
  tensors change only when SI rebuilds its per-step lists, which drops every graph of the
  group.

On the host, a step whose tensors are where they were at the last step costs one C call
per list to check that (no tuple of addresses built or hashed); the per-tensor work left
is reading each `.grad`.

A key seen for the first time runs eagerly; the second time it is captured (on a side
stream, without a host synchronisation) and replayed; from then on it is replayed. Up to
`KEEP` graphs are kept per group, the least recently replayed dropped first (gradients that
alternate between two sets of tensors need two per hook). When `MAX_WASTED` graphs were
dropped having been replayed less than twice, the group stops capturing and stays eager:
its gradients move every step (a loop that frees them, and a memory allocator that does
not give the same blocks back). The graphs of a group share one memory pool, which keeps
the temporaries of the eager kernels (θ - θ* before the step, θ_pre - θ after it): n
numbers for n weights, allocated for good instead of per step.

Only the work of `importance="total"` and `"task"` is captured; the other modes read
per-step scalars (an optimizer's step count, a scaler's verdict) and stay eager.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Hashable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["StepGraphs", "Addresses", "supported", "addresses", "summary"]

#: graphs kept per group (both hooks); the least recently replayed is dropped beyond it
KEEP = 8
#: graphs dropped after fewer than two replays, after which a group stays eager
MAX_WASTED = 4
#: compare every tensor's address with the captured ones at each replay (tests set it: a
#: key that misses a change then fails loudly instead of replaying on stale memory)
CHECK = False

_data_ptr = Tensor.data_ptr


def addresses(tensors: Sequence[Tensor]) -> tuple[int, ...]:
    """The tensors' data pointers, for a key (one C call per tensor, no device access)."""
    return tuple(map(_data_ptr, tensors))


def _same_addresses_in_python(tensors, ptrs, indices) -> bool:
    return list(map(_data_ptr, tensors)) == ptrs


#: whether `tensors[i].data_ptr() == ptrs[i]` for every i of `indices`, in one C call (what
#: torch's own CUDA-graph trees check their inputs with); a Python loop where torch lacks it
_same_addresses = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal",
                          _same_addresses_in_python)


class Addresses:
    """The data pointers of a step's tensor lists, as a key part whose hash is computed once
    (a step on the same tensors as the last one gets the same object back from
    `StepGraphs.addresses()`, so neither the pointers' tuple nor its hash is built again)."""

    __slots__ = ("ptrs", "_hash")

    def __init__(self, ptrs: tuple[tuple[int, ...], ...]):
        self.ptrs = ptrs
        self._hash = hash(ptrs)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (type(other) is Addresses and self.ptrs == other.ptrs)

    def __repr__(self) -> str:
        return f"Addresses({self.ptrs!r})"


class _CudaGraph:
    """`fn(*lists)` captured on a side stream into `pool`; `replay()` launches it on the
    current stream. The capture runs nothing: the caller replays it once for this step."""

    __slots__ = ("graph",)

    def __init__(self, fn: Callable[..., Any], lists: Sequence[Sequence[Tensor]], pool: Any):
        device = lists[0][0].device
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)  # the gradients are written on the current stream
        with torch.cuda.device(device), torch.cuda.stream(side):
            # "thread_local": a DataLoader's pin-memory thread may call CUDA meanwhile
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                fn(*lists)
            finally:
                graph.capture_end()
        current.wait_stream(side)
        self.graph = graph

    def replay(self, lists: Sequence[Sequence[Tensor]]) -> None:
        self.graph.replay()

    @staticmethod
    def pool(device: torch.device) -> Any:
        with torch.cuda.device(device):
            return torch.cuda.graph_pool_handle()


class _Checked:
    """A graph that also recorded every address it was captured with, and refuses to
    replay on others (`CHECK`)."""

    __slots__ = ("inner", "seen")

    def __init__(self, inner: Any, lists: Sequence[Sequence[Tensor]]):
        self.inner, self.seen = inner, _all_addresses(lists)

    def replay(self, lists: Sequence[Sequence[Tensor]]) -> None:
        now = _all_addresses(lists)
        if now != self.seen:
            raise RuntimeError("avalanche_si: a CUDA graph of SI's step would replay on other "
                               "tensors than it was captured with; this is a bug, please "
                               "report it (cuda_graphs=False avoids it).")
        self.inner.replay(lists)


def _all_addresses(lists: Sequence[Optional[Sequence[Tensor]]]) -> tuple:
    return tuple(None if lst is None else (addresses(lst), tuple(t.shape for t in lst),
                                           tuple(t.stride() for t in lst)) for lst in lists)


def summary(engine: Any) -> str:
    """How an engine's CUDA graphs were used, for a benchmark's notes: "N replays, M
    captures" (and why they stopped, if they did), "not used on this device" when no group
    has graphs, "" when `cuda_graphs` is off."""
    if not engine.cuda_graphs:
        return ""
    graphs = [g.graphs for g in engine._groups if g.graphs is not None]
    if not graphs:
        return "not used on this device"
    off = next((g.off for g in graphs if g.off), None)
    return f"{sum(g.replays for g in graphs)} replays, {sum(g.captures for g in graphs)} " \
        "captures" + (f" (stopped: {off})" if off else "")


def backend_for(device: torch.device) -> Optional[type]:
    """The graph class for tensors on `device`, or None where graphs are not available."""
    if device.type == "cuda" and torch.cuda.is_available():
        return _CudaGraph
    return None


def supported(params: Sequence[Tensor]) -> bool:
    """Whether a group's work can be captured: every tensor on one device that has graphs.
    Decided when the per-step lists are built, not per step."""
    if not params:
        return False
    device = params[0].device
    return backend_for(device) is not None and all(p.device == device for p in params)


class StepGraphs:
    """The captured graphs of one parameter group, by key (see the module's docstring)."""

    __slots__ = ("device", "_graphs", "_seen", "_pool", "captures", "replays", "wasted", "off",
                 "_last", "_last_ptrs", "_indices")

    def __init__(self, device: torch.device):
        self.device = device
        self._graphs: dict[Hashable, list] = {}  # key: [graph, replays], least recent first
        self._seen: dict[Hashable, None] = {}    # keys run eagerly once, oldest first
        self._pool: Any = None
        self.captures = 0
        self.replays = 0
        self.wasted = 0
        #: why this group stopped capturing (None: it has not)
        self.off: Optional[str] = None
        self._last: Optional[Addresses] = None   # what addresses() returned last, and its
        self._last_ptrs: list[list[int]] = []    # pointers as lists (what the C check reads)
        self._indices: list[list[int]] = []      # 0..k-1 for each of them

    def addresses(self, *lists: Sequence[Tensor]) -> Addresses:
        """The tensors' addresses as a key part: the object returned last time when every
        tensor is where it was then (checked in C, one call per list), else a new one."""
        last, ptrs = self._last, self._last_ptrs
        if last is not None and len(lists) == len(ptrs) and all(
                len(lst) == len(p) and _same_addresses(lst, p, k)
                for lst, p, k in zip(lists, ptrs, self._indices)):
            return last
        self._last_ptrs = ptrs = [list(map(_data_ptr, lst)) for lst in lists]
        self._indices = [list(range(len(p))) for p in ptrs]
        self._last = last = Addresses(tuple(map(tuple, ptrs)))
        return last

    def run(self, key: Hashable, fn: Callable[..., Any], *lists: Optional[Sequence[Tensor]]) -> None:
        """Do `fn(*lists)`: replay the graph captured for `key`, capture one if the key was
        seen before, else run `fn` eagerly. `fn`'s return value is not used."""
        entry = self._graphs.pop(key, None)
        if entry is None and self.off is None and key in self._seen:
            entry = self._capture(key, fn, lists)
        if entry is None:
            if self.off is None:
                self._seen[key] = None
                if len(self._seen) > KEEP:
                    del self._seen[next(iter(self._seen))]
            fn(*lists)
            return
        entry[0].replay(lists)
        entry[1] += 1
        self.replays += 1
        self._graphs[key] = entry  # the most recent last
        if len(self._graphs) > KEEP:
            dropped = self._graphs.pop(next(iter(self._graphs)))
            if dropped[1] < 2:
                self.wasted += 1
                if self.wasted >= MAX_WASTED:
                    self.off = (f"{self.wasted} graphs dropped unused: the gradients (or "
                                "weights) move between steps")

    def pool_bytes(self) -> int:
        """Device memory the group's graphs hold in their pool (the eager path's per-step
        temporaries, kept); 0 before the first capture. Reads the allocator's snapshot:
        for diagnostics, not for every step."""
        if self._pool is None or self.device.type != "cuda":
            return 0
        pool = tuple(self._pool)
        return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
                   if tuple(seg.get("segment_pool_id", ())) == pool)

    def _capture(self, key: Hashable, fn: Callable[..., Any],
                 lists: Sequence[Optional[Sequence[Tensor]]]) -> Optional[list]:
        del self._seen[key]
        backend = backend_for(self.device)
        if backend is None:  # pragma: no cover - the group was checked when built
            self.off = f"no CUDA graphs on {self.device}"
            return None
        try:
            if self._pool is None:
                self._pool = backend.pool(self.device)
            graph = backend(fn, lists, self._pool)
        except Exception as exc:  # a capture that fails has run nothing: go on eagerly
            self.off = f"capture failed: {exc}"
            self._graphs.clear()
            warnings.warn(f"avalanche_si: SI's step could not be captured as a CUDA graph "
                          f"({exc}); it runs without graphs from now on (same results, more "
                          "host time). cuda_graphs=False silences this.", stacklevel=4)
            return None
        if CHECK:
            graph = _Checked(graph, lists)
        self.captures += 1
        return [graph, 0]
