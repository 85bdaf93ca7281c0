"""The one-pass C kernels: the same bits as the _foreach path, and SI by the definition."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from avalanche_si import SIPlugin, _fused, functional as F
from conftest import make_stream, make_tasks, mlp, strategy, train_stream

# Every test that needs the kernels to run is marked; the off switch and a failing compiler
# are checked on any machine.
needs_kernels = pytest.mark.skipif(not _fused.available(),
                                   reason=f"fused kernels unavailable: {_fused.why_not}")


@needs_kernels
def test_the_public_query_says_they_run():
    from avalanche_si import fused_kernels_available
    assert fused_kernels_available() == (True, None)


def rand_lists(shapes, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def one(s, positive=False):
        t = torch.randn(s, generator=g, dtype=dtype)
        return t.abs() if positive else t
    return ([one(s) for s in shapes], [one(s, True) for s in shapes], [one(s) for s in shapes],
            [one(s) for s in shapes])  # grads, omega, params, prev


def clone(ts):
    return [t.clone() for t in ts]


def both_paths(fn):
    """fn() on the fused path, then on the _foreach path."""
    fused = fn()
    with _fused.disabled():
        plain = fn()
    return fused, plain


shapes = st.lists(st.lists(st.integers(1, 40), min_size=0, max_size=3), min_size=1, max_size=6)


@needs_kernels
@settings(max_examples=40, deadline=None)
@given(shapes=shapes, c=st.floats(0.0, 1e3), in_place=st.booleans(), with_pre=st.booleans(),
       into=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_penalty_step_bits_equal_foreach_and_match_float64(shapes, c, in_place, with_pre, into,
                                                          seed):
    grads, omega, params, prev = rand_lists(shapes, seed)
    into = into and not in_place  # out= (importance="task"'s reused tensors)

    def run():
        g, pre = clone(grads), ([torch.full_like(p, float("nan")) for p in params]
                                if with_pre else None)
        given_out = [torch.full_like(t, float("nan")) for t in grads] if into else None
        out, value = F.penalty_step(g, omega, params, prev, strength=c, in_place=in_place, pre=pre,
                                    out=given_out)
        if into:
            assert all(a is b for a, b in zip(out, given_out))  # written there, not allocated
        return g, out, pre, value()

    (g1, out1, pre1, v1), (g2, out2, pre2, v2) = both_paths(run)
    assert all(torch.equal(a, b) for a, b in zip(out1, out2))  # the step's gradient: same bits
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))      # in place or left alone alike
    if in_place:
        assert all(a is b for a, b in zip(out1, g1))
    else:
        assert all(torch.equal(a, b) for a, b in zip(g1, grads))
        if into:  # the same bits as into new tensors
            new, _ = F.penalty_step(clone(grads), omega, params, prev, strength=c, in_place=False)
            assert all(torch.equal(a, b) for a, b in zip(out1, new))
    if with_pre:
        assert all(torch.equal(a, p) for a, p in zip(pre1, params))
    ref_value = 0.0
    for k in range(len(shapes)):  # float64, by the definition
        d = params[k].double() - prev[k].double()
        torch.testing.assert_close(out1[k].double(), grads[k].double() + 2 * c * omega[k].double() * d,
                                   rtol=1e-5, atol=1e-5 * (1 + c))
        ref_value += c * float((omega[k].double() * d * d).sum())
    assert v1.dtype == torch.float32 and v2.dtype == torch.float32
    assert float(v1) == pytest.approx(ref_value, rel=1e-6, abs=1e-6)  # float64 sum on the fused path
    assert float(v2) == pytest.approx(ref_value, rel=1e-4, abs=1e-4)


@needs_kernels
@settings(max_examples=40, deadline=None)
@given(shapes=shapes, seed=st.integers(0, 2 ** 16))
def test_accumulate_from_pre_bits_equal_foreach_and_match_float64(shapes, seed):
    grads, running, params, pre = rand_lists(shapes, seed)

    def run():
        r = clone(running)
        F.accumulate_from_pre(r, grads, clone(pre), params)
        return r

    fused, plain = both_paths(run)
    for k in range(len(shapes)):
        assert torch.equal(fused[k], plain[k])
        ref = running[k].double() + grads[k].double() * (pre[k].double() - params[k].double())
        torch.testing.assert_close(fused[k].double(), ref, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_large_tensors_take_the_threaded_loop_and_stay_bit_equal():
    # above ATen's grain size (32768) the kernels split the work over threads
    shapes = [(300, 400), (70001,), (3,)]
    grads, omega, params, prev = rand_lists(shapes, 7)
    running = [torch.randn(s) for s in shapes]

    def run():
        g, pre, r = clone(grads), [torch.empty_like(p) for p in params], clone(running)
        _, value = F.penalty_step(g, omega, params, prev, strength=0.3, pre=pre)
        moved = [p + 1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
                 for p in params]
        F.accumulate_from_pre(r, g, pre, moved)
        return g + r + [value()]

    ref_value = 0.3 * sum(float((o.double() * (p.double() - q.double()) ** 2).sum())
                          for o, p, q in zip(omega, params, prev))
    threads = torch.get_num_threads()
    try:
        for n in sorted({1, threads, 2}):
            torch.set_num_threads(n)
            fused, plain = both_paths(run)
            assert all(torch.equal(a, b) for a, b in zip(fused[:-1], plain[:-1])), n
            # the value: summed in float64 on the fused path, in float32 on the other
            assert float(fused[-1]) == pytest.approx(ref_value, rel=1e-6)
            assert float(plain[-1]) == pytest.approx(ref_value, rel=1e-4)
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_what_the_kernels_cannot_take_goes_the_foreach_way():
    grads, omega, params, prev = rand_lists([(4, 6), (5,)], 3)
    assert _fused.eligible(grads, omega, params, prev)
    assert not _fused.eligible([g.double() for g in grads], omega, params, prev)
    assert not _fused.eligible([grads[0].t(), grads[1]], omega, params, prev)  # not contiguous
    assert not _fused.eligible(grads, omega[:1], params, prev)                 # lengths differ
    assert not _fused.eligible([grads[0][:2], grads[1]], omega, params, prev)  # sizes differ
    assert not _fused.eligible([grads[0].to_sparse(), grads[1]], omega, params, prev)
    with _fused.disabled():
        assert not _fused.eligible(grads, omega, params, prev)
    assert _fused.eligible(grads, omega, params, prev)
    # and the public kernels still compute the right thing on such input
    t = grads[0].t().contiguous().t()  # a transposed (non-contiguous) gradient
    g = [t.clone(), grads[1].clone()]
    out, _ = F.penalty_step(g, omega, params, prev, strength=1.0)
    torch.testing.assert_close(out[0], t + 2 * omega[0] * (params[0] - prev[0]))


@needs_kernels
@pytest.mark.parametrize("importance", ["total", "task", "delta_params"])
def test_plugin_training_bit_identical_with_and_without_the_kernels(importance):
    tasks = make_tasks(dtype=torch.float32)

    def train():
        model = mlp(dtype=torch.float32)
        si = SIPlugin(2.0, eps=0.1, importance=importance, groups={"a": ["0", "2"], "b": ["4"]})
        train_stream(strategy(model, torch.optim.Adam(model.parameters(), lr=0.05), [si]),
                     make_stream(tasks))
        return model, si

    (m1, s1), (m2, s2) = both_paths(train)
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(p, q), n
    for group in ("a", "b"):
        o1, o2 = s1.importances(group), s2.importances(group)
        assert all(torch.equal(o1[n], o2[n]) and o1[n].abs().sum() > 0 for n in o1)


CHECK = """
import torch
from avalanche_si import fused_kernels_available, functional as F
g, o, p, q = ([torch.full((3,), v) for _ in range(2)] for v in (1.0, 2.0, 3.0, 0.5))
out, value = F.penalty_step(g, o, p, q, strength=0.5)  # the _foreach path does the work
print(*fused_kernels_available(), float(out[0][0]), float(value()))
"""


def run_check(**env):
    base = {k: v for k, v in os.environ.items() if k != "AVALANCHE_SI_FUSED"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=dict(base, **env),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_switched_off_by_the_environment():
    # g + 2c·Ω·(θ − θ*) = 1 + 2·0.5·2·2.5 = 6; c·ΣΩd² = 0.5 · (2 tensors × 3) · 2 · 2.5² = 37.5
    assert run_check(AVALANCHE_SI_FUSED="0") == "False switched off by AVALANCHE_SI_FUSED 6.0 37.5"


@pytest.mark.skipif(sys.platform == "win32", reason="the kernels are not built on Windows")
def test_a_machine_whose_compiler_fails_takes_the_foreach_path():
    out = run_check(CC="false")
    assert out.startswith("False could not be built or loaded: false failed") and \
        out.endswith(" 6.0 37.5"), out
