r"""Fused CPU kernels for SI's per-step work: two passes over memory instead of five.

SI's per-step work is elementwise and memory-bound. With one `torch._foreach_*`
operation per arithmetic step it reads and writes about 16 floats per weight and step
(`d = θ - θ*`; `g += 2cΩ d`; the copy of
θ before the step; `θ_pre - θ`;
`ω += g · (θ_pre - θ)`). The two kernels here do
the same arithmetic in two passes, 11 floats per weight and step, and allocate nothing:

- `penalty()`: `g' = g + 2cΩ (θ - θ*)`, the copy
  `θ_pre ← θ` and the per-tensor sums of
  `Ω (θ - θ*)²` (the penalty's value, in float64) in one pass;
- `accumulate()`: `ω ← ω + g · (θ_pre - θ)`
  in one pass.

They are *bit-identical* to the `_foreach` operations they replace: same operations in
the same order, and the one fused multiply-add where ATen's `addcmul` has one (probed
once per process, since that depends on how ATen was built; where the probe is not
conclusive the kernels are not used). The penalty's *value* is summed in float64 here,
so it can differ from the `_foreach` path's float32 sum in the last bits (it is a
logged number; the training arithmetic is unaffected).

The C source below is compiled with the system C compiler (`$CC`, else `cc`/`gcc`)
at first use in each process (about 0.2 s), with `-march=native` and OpenMP, which
links to the OpenMP runtime torch already loaded, and runs with `torch.get_num_threads()`
threads. Used only for contiguous float32 CPU tensors; everything else, and every
machine without a working compiler, takes the `_foreach` path. `AVALANCHE_SI_FUSED=0`
switches the kernels off for a process, `with disabled():` for a block.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from array import array
import shutil
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["available", "disabled", "eligible", "penalty", "accumulate"]

_SOURCE = r"""
#include <stdint.h>
#include <math.h>

#if SI_FMA
#define MAC(a, b, c) fmaf((a), (b), (c))   /* a*b + c rounded once: ATen's addcmul here */
#else
#define MAC(a, b, c) ((c) + (a) * (b))
#endif
#define GRAIN 32768                          /* ATen's grain size for elementwise work */
/* tab: k pointers per list, the lists one after the other, then the k sizes */
#define AT(list, j) ((float *)(intptr_t)tab[(list) * k + (j)])

/* lists g, out, om, th, prev[, pre]: out = g + (two_c * om) * (th - prev); pre = th;
   sums[j] = sum om * (th - prev)^2 */
void si_penalty(int k, const int64_t *tab, int has_pre, float two_c, double *sums,
                int nthreads) {
    const int64_t *n = tab + (has_pre ? 6 : 5) * k;
    for (int j = 0; j < k; j++) {
        const float *gj = AT(0, j), *omj = AT(2, j), *thj = AT(3, j), *pvj = AT(4, j);
        float *oj = AT(1, j);
        float *prj = has_pre ? AT(5, j) : 0;
        const int64_t nj = n[j];
        double s = 0.0;
        if (prj) {
            #pragma omp parallel for simd reduction(+:s) schedule(static) \
                num_threads(nthreads) if (nj >= GRAIN)
            for (int64_t i = 0; i < nj; i++) {
                const float t = thj[i], d = t - pvj[i], w = omj[i];
                oj[i] = MAC(two_c * w, d, gj[i]);
                prj[i] = t;
                s += (double)w * ((double)d * (double)d);
            }
        } else {
            #pragma omp parallel for simd reduction(+:s) schedule(static) \
                num_threads(nthreads) if (nj >= GRAIN)
            for (int64_t i = 0; i < nj; i++) {
                const float d = thj[i] - pvj[i], w = omj[i];
                oj[i] = MAC(two_c * w, d, gj[i]);
                s += (double)w * ((double)d * (double)d);
            }
        }
        sums[j] = s;
    }
}

/* lists run, g, pre, th: run += g * (pre - th) */
void si_accumulate(int k, const int64_t *tab, int nthreads) {
    const int64_t *n = tab + 4 * k;
    for (int j = 0; j < k; j++) {
        float *rj = AT(0, j);
        const float *gj = AT(1, j), *prj = AT(2, j), *thj = AT(3, j);
        const int64_t nj = n[j];
        #pragma omp parallel for simd schedule(static) num_threads(nthreads) if (nj >= GRAIN)
        for (int64_t i = 0; i < nj; i++)
            rj[i] = MAC(gj[i], prj[i] - thj[i], rj[i]);
    }
}
"""

_lib: Optional[ctypes.CDLL] = None
_tried = False
_off = 0  # depth of disabled() blocks
why_not: Optional[str] = None  # why the kernels are off in this process, once tried


def _aten_addcmul_is_fma() -> Optional[bool]:
    """Whether ATen's float32 `addcmul` rounds `self + v*t1*t2` as fma(v*t1, t2, self).

    Decided on values where the fused and the unfused results differ, through the
    vectorized body and the scalar tail alike; None if ATen agrees with neither.
    """
    g = torch.Generator().manual_seed(0)
    n = 1027  # a vectorized body and a scalar tail
    a, b, c = (torch.randn(n, generator=g) for _ in range(3))
    v = 1.3
    got = torch.addcmul(c, a, b, value=v)
    va = (torch.tensor(v, dtype=torch.float32) * a).double()  # v*t1, rounded to float32
    fused = (c.double() + va * b.double()).float()            # one rounding (va*b is exact)
    plain = c + (va.float() * b)
    if torch.equal(got, fused) and not torch.equal(got, plain):
        return True
    if torch.equal(got, plain) and not torch.equal(got, fused):
        return False
    return None


def _compile(fma: bool) -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise OSError("no C compiler found (set $CC)")
    tmp = tempfile.mkdtemp(prefix="avalanche_si_")
    try:
        src, lib = os.path.join(tmp, "si_fused.c"), os.path.join(tmp, "si_fused.so")
        with open(src, "w") as f:
            f.write(_SOURCE)
        base = [cc, "-O3", "-ffp-contract=off", "-shared", "-fPIC", f"-DSI_FMA={int(fma)}",
                "-o", lib, src, "-lm"]
        first_error = None
        # Without OpenMP the kernels still work (one thread); without -march=native they
        # still vectorize with the baseline instruction set.
        for extra in (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], []):
            done = subprocess.run(base[:1] + extra + base[1:], capture_output=True, text=True,
                                  timeout=120)
            if done.returncode == 0:
                break
            first_error = first_error or (done.stderr.strip().splitlines() or ["?"])[-1]
        else:
            raise OSError(f"{cc} failed: {first_error}")
        loaded = ctypes.CDLL(lib)  # OSError where the folder is not executable (noexec)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # once loaded, the file is no longer needed
    V, I = ctypes.c_void_p, ctypes.c_int
    loaded.si_penalty.argtypes = [I, V, I, ctypes.c_float, V, I]
    loaded.si_penalty.restype = None
    loaded.si_accumulate.argtypes = [I, V, I]
    loaded.si_accumulate.restype = None
    return loaded


def available() -> bool:
    """Whether the fused kernels can run in this process (compiled on first call)."""
    global _lib, _tried, why_not
    if not _tried:
        _tried = True
        if os.environ.get("AVALANCHE_SI_FUSED", "1").strip().lower() in ("0", "false", "off", "no"):
            why_not = "switched off by AVALANCHE_SI_FUSED"
        elif sys.platform == "win32":
            why_not = "not built on Windows"
        else:
            fma = _aten_addcmul_is_fma()
            if fma is None:
                why_not = "ATen's addcmul rounds neither as fma nor as mul-then-add"
            else:
                try:
                    _lib = _compile(fma)
                except (OSError, subprocess.SubprocessError) as e:
                    why_not = f"could not be built or loaded: {e}"
    return _lib is not None


@contextlib.contextmanager
def disabled():
    """A block in which every SI kernel takes the `_foreach` path (for comparisons)."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


def eligible(*lists: Sequence[Tensor]) -> bool:
    """All tensors contiguous float32 on the CPU, position by position of one size, and
    the kernels available and not `disabled()`."""
    return _pointers(lists) is not None


_F32, _STRIDED = torch.float32, torch.strided


def _pointers(lists: Sequence[Sequence[Tensor]]) -> Optional[list[int]]:
    """The data pointers of every tensor, list after list, then the sizes of the first
    list's tensors; None unless `eligible()`. One pass, the only per-step check."""
    if _off or not lists[0] or not lists[0][0].is_cpu or not available():
        return None  # on a GPU: decided by the first tensor, with no loop over the others
    sizes = [t.numel() for t in lists[0]]
    k = len(sizes)
    out = []
    for lst in lists:
        if len(lst) != k:
            return None
        for t, n in zip(lst, sizes):
            if t.dtype is not _F32 or not t.is_cpu or t.layout is not _STRIDED \
                    or not t.is_contiguous() or t.numel() != n:
                return None
            out.append(t.data_ptr())
    return out + sizes



def penalty(grads: Sequence[Tensor], omega: Sequence[Tensor], params: Sequence[Tensor],
            prev: Sequence[Tensor], pre: Optional[Sequence[Tensor]], *, two_c: float,
            in_place: bool, out: Optional[Sequence[Tensor]] = None
            ) -> Optional[tuple[list[Tensor], Tensor]]:
    r"""One pass: `g' = grads + two_c·Ω·(θ − θ*)` (into `grads` if `in_place`, else
    into `out`, or new tensors) and `pre = θ` if given.

    Returns:
        `(g', sums)`, `sums` the float64 per-tensor sums of
        `Ω(θ - θ*)²`; or None, having done nothing, when the
        tensors are not `eligible()`.
    """
    rest = [omega, params, prev] + ([pre] if pre is not None else [])
    given = out is not None and not in_place
    table = _pointers([grads, out, *rest] if given else [grads, *rest])  # one check pass
    if table is None:
        return None
    k = len(grads)
    if in_place:
        out = list(grads)
        table[k:k] = table[:k]  # the out list: the gradients themselves
    elif given:
        out = list(out)
    else:
        out = [torch.empty_like(g) for g in grads]
        table[k:k] = [t.data_ptr() for t in out]
    tab = array("q", table)
    sums = torch.empty(k, dtype=torch.float64)
    _lib.si_penalty(k, tab.buffer_info()[0], int(pre is not None), two_c, sums.data_ptr(),
                    torch.get_num_threads())
    return out, sums


def accumulate(running: Sequence[Tensor], grads: Sequence[Tensor], pre: Sequence[Tensor],
               params: Sequence[Tensor]) -> bool:
    r"""One pass: `ω ← ω + g · (θ_pre - θ)`.

    Returns False, having done nothing, when the tensors are not `eligible()`.
    """
    table = _pointers([running, grads, pre, params])
    if table is None:
        return False
    tab = array("q", table)
    _lib.si_accumulate(len(running), tab.buffer_info()[0], torch.get_num_threads())
    return True
