r"""Fused CPU kernels for SI's per-step work: two passes over memory instead of five.

SI's per-step work is elementwise and memory-bound. With one ``torch._foreach_*``
operation per arithmetic step it reads and writes about 16 floats per weight and step
(:math:`d = \theta - \theta^*`; :math:`g \mathrel{+}= 2c\,\Omega d`; the copy of
:math:`\theta` before the step; :math:`\theta_\text{pre} - \theta`;
:math:`\omega \mathrel{+}= g \cdot (\theta_\text{pre} - \theta)`). The two kernels here do
the same arithmetic in two passes, 11 floats per weight and step, and allocate nothing:

- :func:`penalty`: :math:`g' = g + 2c\,\Omega (\theta - \theta^*)`, the copy
  :math:`\theta_\text{pre} \leftarrow \theta` and the per-tensor sums of
  :math:`\Omega (\theta - \theta^*)^2` (the penalty's value, in float64) in one pass;
- :func:`accumulate`: :math:`\omega \leftarrow \omega + g \cdot (\theta_\text{pre} - \theta)`
  in one pass.

They are *bit-identical* to the ``_foreach`` operations they replace: same operations in
the same order, and the one fused multiply-add where ATen's ``addcmul`` has one (probed
once per process, since that depends on how ATen was built; where the probe is not
conclusive the kernels are not used). The penalty's *value* is summed in float64 here,
so it can differ from the ``_foreach`` path's float32 sum in the last bits (it is a
logged number; the training arithmetic is unaffected).

The C source below is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``)
at first use in each process (about 0.2 s), with ``-march=native`` and OpenMP, which
links to the OpenMP runtime torch already loaded, and runs with ``torch.get_num_threads()``
threads. Used only for contiguous float32 CPU tensors; everything else, and every
machine without a working compiler, takes the ``_foreach`` path. ``AVALANCHE_SI_FUSED=0``
switches the kernels off for a process, ``with disabled():`` for a block.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
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

/* out = g + (two_c * om) * (th - prev); pre = th (if pre); sums[j] = sum om * d^2 */
void si_penalty(int k, float **g, float **out, float **om, float **th, float **prev,
                float **pre, const int64_t *n, float two_c, double *sums, int nthreads) {
    for (int j = 0; j < k; j++) {
        const float *gj = g[j], *omj = om[j], *thj = th[j], *pvj = prev[j];
        float *oj = out[j];
        float *prj = pre ? pre[j] : 0;
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

/* run += g * (pre - th) */
void si_accumulate(int k, float **run, float **g, float **pre, float **th,
                   const int64_t *n, int nthreads) {
    for (int j = 0; j < k; j++) {
        float *rj = run[j];
        const float *gj = g[j], *prj = pre[j], *thj = th[j];
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
    """Whether ATen's float32 ``addcmul`` rounds ``self + v*t1*t2`` as fma(v*t1, t2, self).

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
    src, lib = os.path.join(tmp, "si_fused.c"), os.path.join(tmp, "si_fused.so")
    with open(src, "w") as f:
        f.write(_SOURCE)
    base = [cc, "-O3", "-ffp-contract=off", "-shared", "-fPIC", f"-DSI_FMA={int(fma)}",
            "-o", lib, src, "-lm"]
    errors = []
    # Without OpenMP the kernels still work (one thread); without -march=native they
    # still vectorize with the baseline instruction set.
    for extra in (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], []):
        done = subprocess.run(base[:1] + extra + base[1:], capture_output=True, text=True)
        if done.returncode == 0:
            break
        errors.append(done.stderr.strip().splitlines()[-1:] or ["?"])
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"{cc} failed: {errors[0][0]}")
    loaded = ctypes.CDLL(lib)
    shutil.rmtree(tmp, ignore_errors=True)  # loaded: the file is no longer needed
    P, I64 = ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64)
    loaded.si_penalty.argtypes = [ctypes.c_int, P, P, P, P, P, P, I64, ctypes.c_float,
                                  ctypes.POINTER(ctypes.c_double), ctypes.c_int]
    loaded.si_penalty.restype = None
    loaded.si_accumulate.argtypes = [ctypes.c_int, P, P, P, P, I64, ctypes.c_int]
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
                    why_not = f"could not be compiled: {e}"
    return _lib is not None


@contextlib.contextmanager
def disabled():
    """A block in which every SI kernel takes the ``_foreach`` path (for comparisons)."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


def eligible(*lists: Sequence[Tensor]) -> bool:
    """All tensors contiguous float32 on the CPU, position by position of one size, and
    the kernels available and not :func:`disabled`."""
    if _off:
        return False
    first = lists[0]
    for lst in lists:
        if len(lst) != len(first):
            return False
        for t, ref in zip(lst, first):
            if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() \
                    or t.numel() != ref.numel():
                return False
    return available()


def _ptrs(tensors: Sequence[Tensor]):
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _sizes(tensors: Sequence[Tensor]):
    return (ctypes.c_int64 * len(tensors))(*[t.numel() for t in tensors])


def penalty(out: Sequence[Tensor], grads: Sequence[Tensor], omega: Sequence[Tensor],
            params: Sequence[Tensor], prev: Sequence[Tensor], pre: Optional[Sequence[Tensor]],
            *, two_c: float) -> Tensor:
    r"""One pass: ``out = grads + two_c·Ω·(θ − θ*)``, ``pre = θ`` if given; returns the
    float64 per-tensor sums of :math:`\Omega(\theta - \theta^*)^2`.

    ``out`` may be ``grads`` (in place). The caller has checked :func:`eligible`.
    """
    k = len(grads)
    sums = torch.empty(k, dtype=torch.float64)
    _lib.si_penalty(k, _ptrs(grads), _ptrs(out), _ptrs(omega), _ptrs(params), _ptrs(prev),
                    _ptrs(pre) if pre is not None else None, _sizes(params),
                    ctypes.c_float(two_c),
                    ctypes.cast(sums.data_ptr(), ctypes.POINTER(ctypes.c_double)),
                    torch.get_num_threads())
    return sums


def accumulate(running: Sequence[Tensor], grads: Sequence[Tensor], pre: Sequence[Tensor],
               params: Sequence[Tensor]) -> None:
    r"""One pass: :math:`\omega \leftarrow \omega + g \cdot (\theta_\text{pre} - \theta)`.

    The caller has checked :func:`eligible`.
    """
    _lib.si_accumulate(len(running), _ptrs(running), _ptrs(grads), _ptrs(pre), _ptrs(params),
                       _sizes(params), torch.get_num_threads())
