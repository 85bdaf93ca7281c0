"""Host time in SI's step hooks by the number of parameter tensors.

``python -m experiments.host_cost [--device cuda] [--baseline REV] [--save NAME]``

SI's per-step work is a few elementwise passes; on a GPU what a step costs is mostly the
host's time to issue them. This drives the engine's two step hooks (``before_step()`` after
the backward pass, ``after_step()`` after ``optimizer.step()``: what every adapter calls)
around MLPs of 6, 16 and 64 parameter tensors, the penalty active, and times each hook's wall
clock with no synchronisation inside it (on a GPU the device is synchronised after each step,
outside the timed region, so that no launch waits for a full queue). The variants run in
interleaved chunks; each number is the median over the chunks of the chunk's median step.

On a CPU the work runs on the host itself, so the eager rows there include the arithmetic
(on tensors of ``--width``² numbers) and the ``CUDA graphs`` rows replay a stand-in that does
nothing: they measure SI's Python work alone, what is left per step once a hook's work is
one launch. On a GPU every row is the real thing, launches included.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

TENSORS = (6, 16, 64)
VARIANTS = {
    "total": dict(importance="total"),
    "total, CUDA graphs": dict(importance="total", cuda_graphs=True),
    "task": dict(importance="task"),
    "task, CUDA graphs": dict(importance="task", cuda_graphs=True),
}


class _StandIn:
    """A CUDA graph's stand-in on a CPU: captures nothing, replays nothing."""

    def __init__(self, fn, lists, pool):
        pass

    def replay(self, lists) -> None:
        pass

    @staticmethod
    def pool(device):
        return None


@contextlib.contextmanager
def _stand_in_graphs(packages):
    import importlib

    modules = [importlib.import_module(f"{p.__name__}.graphs") for p in packages]
    real = [m.backend_for for m in modules]
    for m in modules:
        m.backend_for = lambda device: _StandIn
    try:
        yield
    finally:
        for m, r in zip(modules, real):
            m.backend_for = r


class _Case:
    """One MLP with `tensors` parameter tensors, its optimizer and an engine, penalty on."""

    def __init__(self, tensors: int, options: dict, device: str, width: int, package):
        SynapticIntelligence = package.SynapticIntelligence
        layers = []
        for _ in range(tensors // 2):
            layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
        self.model = torch.nn.Sequential(*layers).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.si = SynapticIntelligence(self.model, self.opt, si_lambda=1.0, **options)
        self.x = torch.randn(8, width, device=device)
        self.cuda = device.startswith("cuda")
        self.si.start_task()
        self.run(3)
        self.si.end_task()  # a consolidation: the penalty is active from here on
        self.si.start_task()
        self.run(10)  # warm-up; CUDA graphs are captured on a key's second step

    def run(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            self.opt.zero_grad(set_to_none=False)
            self.model(self.x).square().mean().backward()
            t0 = time.perf_counter()
            self.si.before_step()
            t1 = time.perf_counter()
            self.opt.step()
            t2 = time.perf_counter()
            self.si.after_step()
            t3 = time.perf_counter()
            if self.cuda:
                torch.cuda.synchronize()
            times.append((t1 - t0 + t3 - t2) * 1e6)
        return times

    def graph_note(self) -> str:
        from avalanche_si.graphs import summary

        return summary(self.si)


def report(device: str, width: int, chunk: int, repeats: int, stand_in: bool,
           baseline=None) -> None:
    import avalanche_si

    variants = {label: (options, avalanche_si) for label, options in VARIANTS.items()}
    if baseline is not None:  # the same variants of another avalanche_si, side by side
        variants.update({f"{label} (baseline)": (options, baseline)
                         for label, options in VARIANTS.items()})
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else "none"
    if not device.startswith("cuda"):  # one thread: the arithmetic of the eager rows
        torch.set_num_threads(1)
    print(f"# torch {torch.__version__}, CUDA {torch.version.cuda}, device {device} ({gpu}), "
          f"{torch.get_num_threads()} thread(s); host µs per step in before_step() + "
          f"after_step(), MLPs of {width}x{width} layers; median of {repeats} interleaved "
          f"chunks of {chunk} steps\n")
    packages = {package for _, package in variants.values()}
    with _stand_in_graphs(packages) if stand_in else contextlib.nullcontext():
        cases = {(n, label): _Case(n, options, device, width, package)
                 for n in TENSORS for label, (options, package) in variants.items()}
        medians: dict = {key: [] for key in cases}
        for _ in range(repeats):
            for key, case in cases.items():
                medians[key].append(statistics.median(case.run(chunk)))
    cell = {key: statistics.median(m) for key, m in medians.items()}
    labels = [f"{label} (stand-in replay)" if stand_in and "graphs" in label else label
              for label in variants]
    print("| parameter tensors | " + " | ".join(labels) + " |")
    print("|---" * (len(variants) + 1) + "|")
    for n in TENSORS:
        print(f"| {n} | " + " | ".join(f"{cell[(n, label)]:.1f}" for label in variants) + " |")
    lo, hi = TENSORS[0], TENSORS[-1]
    print(f"| {hi} / {lo} | " + " | ".join(f"{cell[(hi, label)] / cell[(lo, label)]:.2f}×"
                                           for label in variants) + " |")
    if baseline is not None:
        for label in VARIANTS:
            base = f"{label} (baseline)"
            ratios = ", ".join(f"{n} tensors {cell[(n, label)] / cell[(n, base)]:.2f}"
                               for n in TENSORS)
            print(f"\n{label}: this code / baseline: {ratios}", end="")
        print()
    notes = [f"{label}: {cases[(hi, label)].graph_note()}" for label in VARIANTS
             if VARIANTS[label].get("cuda_graphs")]
    print(f"\nCUDA graphs at {hi} tensors: {'; '.join(notes)}."
          + (" On this CPU the replays are stand-ins that do nothing: those columns are SI's "
             "host work alone." if stand_in else "") + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.host_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=100, help="steps per timed chunk")
    ap.add_argument("--repeats", type=int, default=7, help="chunks per variant, interleaved")
    ap.add_argument("--save", metavar="NAME", default=None,
                    help="also write the output to results/bench_overhead/NAME.txt (the "
                         "performance page shows every file there)")
    ap.add_argument("--baseline", metavar="REV", default=None,
                    help="another avalanche_si timed beside this one, in the same run: a git "
                         "revision of this repository or the folder of a package")
    args = ap.parse_args(argv)
    if args.chunk < 1 or args.repeats < 1 or args.width < 1:
        ap.error("--chunk, --repeats and --width must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device here")
    from .options import printed_and_saved

    argv = list(argv if argv is not None else sys.argv[1:])
    with printed_and_saved("experiments.host_cost", argv, args.save,
                           Path(__file__).resolve().parents[1] / "results" / "bench_overhead"):
        baseline = None
        if args.baseline:
            from .bench_overhead import load_baseline

            baseline = load_baseline(args.baseline)
        report(args.device, args.width, args.chunk, args.repeats,
               stand_in=not args.device.startswith("cuda"), baseline=baseline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
