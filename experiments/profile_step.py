"""Where SI's time goes in one training step: host time, kernel launches and GPU time per hook.

``python -m experiments.profile_step --device cuda [--save NAME]``

For each model, SIPlugin's two step hooks are driven as Avalanche's training loop drives them
(``after_backward`` between the backward pass and the step, ``after_update`` after it), with the
penalty active (one consolidation done), in each importance mode that needs no second
mini-batch, with and without CUDA graphs (``VARIANTS``):

- **host µs**: wall time for Python to issue the hook's work (no synchronisation inside);
- **launches**: kernel launches the hook makes, from ``torch.profiler``'s runtime events;
- **GPU µs**: time between CUDA events recorded around the hook.

Beside them the plain step's forward+backward and ``optimizer.step()``, and a copy of the bytes
SI's two passes move (11 numbers per weight) to compare SI's GPU time with: the floor of its
memory traffic. Medians over the timed steps. On a CPU only the host column means anything.
The ``CUDA graphs`` variants replay each hook's work as a CUDA graph (``cuda_graphs=True``);
on a CPU they run the eager path.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

MODELS = ("MLP 784-1000-1000", "deep MLP 32x256", "ResNet-18 32x32 b128", "ResNet-18 224x224 b64")


def build(name: str, device: str):
    """The model, one mini-batch on the device, and how many classes it has."""
    g = torch.Generator().manual_seed(0)
    if name.startswith("MLP"):
        model = torch.nn.Sequential(torch.nn.Linear(784, 1000), torch.nn.ReLU(),
                                    torch.nn.Linear(1000, 1000), torch.nn.ReLU(),
                                    torch.nn.Linear(1000, 10))
        x = torch.randn(128, 784, generator=g)
    elif name.startswith("deep MLP"):
        layers = [torch.nn.Linear(784, 256), torch.nn.ReLU()]
        for _ in range(30):
            layers += [torch.nn.Linear(256, 256), torch.nn.ReLU()]
        model = torch.nn.Sequential(*layers, torch.nn.Linear(256, 10))
        x = torch.randn(128, 784, generator=g)
    else:
        import torchvision

        model = torchvision.models.resnet18(num_classes=10)
        side, batch = (32, 128) if "32x32" in name else (224, 64)
        x = torch.randn(batch, 3, side, side, generator=g)
    y = torch.randint(0, 10, (x.shape[0],), generator=g)
    return model.to(device), x.to(device), y.to(device)


def _launches(prof) -> dict[str, int]:
    """Kernel launches inside each ``record_function`` range, from the runtime's launch calls."""
    out: dict[str, int] = {}

    def count(evt) -> int:
        own = 1 if "LaunchKernel" in evt.name or "cuLaunch" in evt.name else 0
        return own + sum(count(c) for c in evt.cpu_children)

    def kernels(evt) -> int:  # the kernels the profiler attributes to the range's operators
        return len(getattr(evt, "kernels", ()) or ()) + sum(kernels(c) for c in evt.cpu_children)

    for evt in prof.events():
        if evt.name.startswith("[") and evt.name.endswith("]"):
            out[evt.name] = out.get(evt.name, 0) + max(count(evt), kernels(evt))
    return out


#: the modes profiled: SI's three, and SOS (one buffer, no extra pass); SIU and SIB draw a
#: second mini-batch from the experience, which this loop without a stream does not have
#: (their extra forward and backward is timed by ``bench_overhead``)
#: the profiled variants: a label and SIPlugin's options
VARIANTS = {
    "total": dict(importance="total"),
    "total, CUDA graphs": dict(importance="total", cuda_graphs=True),
    "task": dict(importance="task"),
    "task, CUDA graphs": dict(importance="task", cuda_graphs=True),
    "delta_params": dict(importance="delta_params"),
    "sos": dict(importance="sos"),
}


def profile(name: str, device: str, options: Optional[dict], steps: int) -> dict[str, float]:
    """Median host µs / GPU µs per step of each phase, and launches per step."""
    from avalanche_si import SIPlugin

    model, x, y = build(name, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cuda = device.startswith("cuda")
    si = None if options is None else SIPlugin(1.0, **options)
    s = SimpleNamespace(model=model, optimizer=opt, loss=None, experience=None,
                        clock=SimpleNamespace(train_exp_counter=0))

    def step(record: dict):
        def phase(label, fn):
            t0 = time.perf_counter()
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
            with torch.profiler.record_function(f"[{label}]"):
                fn()
            host = (time.perf_counter() - t0) * 1e6
            if cuda:
                b.record()
                record.setdefault(label, []).append((host, (a, b)))
            else:
                record.setdefault(label, []).append((host, None))

        opt.zero_grad()

        def fwd_bwd():
            s.loss = torch.nn.functional.cross_entropy(model(x), y)
            s.loss.backward()
        phase("forward+backward", fwd_bwd)
        if si is not None:
            phase("SI after_backward", lambda: si.after_backward(s))
        phase("optimizer.step", opt.step)
        if si is not None:
            phase("SI after_update", lambda: si.after_update(s))

    if si is not None:  # one task, a consolidation: the penalty is active from here on
        si.before_training_exp(s)
        for _ in range(3):
            step({})
        si.after_training_exp(s)
        si.before_training_exp(s)
    for _ in range(10):  # warm-up
        step({})
    if cuda:
        torch.cuda.synchronize()
    record: dict = {}
    for _ in range(steps):
        step(record)
    if cuda:
        torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step({})
    launches = _launches(prof)
    out = {}
    for label, rows in record.items():
        out[f"{label} host"] = statistics.median(h for h, _ in rows)
        out[f"{label} gpu"] = statistics.median(a.elapsed_time(b) * 1e3 for _, (a, b) in rows) \
            if cuda else float("nan")
        out[f"{label} launches"] = launches.get(f"[{label}]", 0) / 3
    out["n"] = sum(p.numel() for p in model.parameters())
    out["tensors"] = len(list(model.parameters()))
    if si is not None:
        from avalanche_si.graphs import summary

        out["graphs"] = summary(si.engine)
    return out


def copy_floor_us(n_floats: int, device: str) -> float:
    """GPU µs of a device copy that reads and writes n_floats / 2 float32 numbers each."""
    if not device.startswith("cuda"):
        return float("nan")
    src = torch.empty(n_floats // 2, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times[5:])


def report(device: str, models, steps: int) -> None:
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else "none"
    print(f"# torch {torch.__version__}, CUDA {torch.version.cuda}, device {device} ({gpu})\n")
    for name in models:
        plain = profile(name, device, None, steps)
        n = plain["n"]
        print(f"# {name}: {n / 1e6:.2f}M weights in {plain['tensors']} tensors; "
              f"median of {steps} steps\n")
        print("| variant | phase | host µs | launches | GPU µs |")
        print("|---|---|---|---|---|")
        for phase in ("forward+backward", "optimizer.step"):
            print(f"| no SI | {phase} | {plain[phase + ' host']:.0f} | "
                  f"{plain[phase + ' launches']:.0f} | {plain[phase + ' gpu']:.0f} |")
        notes = []
        for label, options in VARIANTS.items():
            r = profile(name, device, options, steps)
            for phase in ("SI after_backward", "SI after_update"):
                print(f"| SIPlugin {label} | {phase} | {r[phase + ' host']:.0f} | "
                      f"{r[phase + ' launches']:.0f} | {r[phase + ' gpu']:.0f} |", flush=True)
            if options.get("cuda_graphs"):
                notes.append(f"{label}: {r['graphs']}")
        if notes:
            print(f"\nCUDA graphs (warm-up and profiled steps included): {'; '.join(notes)}.")
        floor = copy_floor_us(11 * n, device)
        print(f"\nA copy moving the bytes of SI's two passes (11 floats per weight, "
              f"{11 * n * 4 / 1e6:.1f} MB): {floor:.0f} GPU µs.\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.profile_step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, metavar="MODEL")
    ap.add_argument("--save", metavar="NAME", default=None,
                    help="also write the output to results/bench_overhead/NAME.txt (the "
                         "performance page shows every file there)")
    args = ap.parse_args(argv)
    from .options import printed_and_saved

    argv = list(argv if argv is not None else sys.argv[1:])
    with printed_and_saved("experiments.profile_step", argv, args.save,
                           Path(__file__).resolve().parents[1] / "results" / "bench_overhead"):
        report(args.device, args.models, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
