"""Benzing's variants of SI side by side: the importances SI, SIU, SIB and SOS measure on one
training trajectory, and how they correlate.

One network trains on the first task of a stream with Adam (no penalty: it is the first task);
four `SynapticIntelligence` engines watch every step of the same run (`importance="task"`,
i.e. SI as Zenke et al.'s code and Benzing measure it, and `"siu"`, `"sib"`, `"sos"`), the
independent mini-batch of SIU and SIB drawn from the same task each step. At the task's end
each engine consolidates, and the Pearson and Spearman correlations of their Ω are computed
per layer (weights and biases of a layer together). Benzing (AISTATS 2022) reports SI and SOS
correlating near 0.99 on permuted MNIST: SI's importance is driven by the bias from using the
step's own mini-batch, which makes it approximate the square root of the Fisher, as SOS does.

    python -m experiments.estimators --benchmark permuted-mnist --hidden 2000 2000 \\
        --epochs 20 --batch-size 256 --seeds 0 --out results/estimators/permuted-mnist

writes `importances-seed<k>.json` per seed, `summary.md` (mean over seeds) and a scatter plot
of SI against SOS.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

METHODS = {"SI": "task", "SIU": "siu", "SIB": "sib", "SOS": "sos"}
PAIRS = [("SI", "SOS"), ("SI", "SIB"), ("SI", "SIU"), ("SIU", "SOS"), ("SIB", "SOS")]


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 (ties broken by position: the importances are continuous)."""
    r = torch.empty_like(x, dtype=torch.float64)
    r[x.argsort()] = torch.arange(len(x), dtype=torch.float64)
    return r


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else float("nan")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return pearson(_ranks(a), _ranks(b))


def first_task(benchmark: str, *, root: str, seed: int):
    """The first task's training inputs and labels, and the number of outputs."""
    from .streams import make_stream

    stream = make_stream(benchmark, "task", root=root, seed=seed, pad=0)
    task = stream.tasks[0]
    return task.x_train.reshape(len(task.x_train), -1), task.y_train, stream.n_outputs


def run(benchmark: str, *, hidden: list[int], epochs: int, batch_size: int, seed: int,
        root: str, eps: tuple[float, ...] = (0.1, 1e-3), log=print) -> dict:
    from avalanche_si import SynapticIntelligence

    x, y, outputs = first_task(benchmark, root=root, seed=seed)
    torch.manual_seed(seed)
    widths = [x.shape[1], *hidden, outputs]
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    # Benzing's learning rate: 0.001 at batch 256, scaled with the batch size
    opt = torch.optim.Adam(model.parameters(), lr=0.001 * batch_size / 256)
    engines = {m: SynapticIntelligence(model, opt, si_lambda=0.0, eps=eps[0], importance=imp)
               for m, imp in METHODS.items()}
    ce = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(10_000 + seed)
    for si in engines.values():
        si.start_task()
    steps, start = 0, time.process_time()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch_size + 1, batch_size):
            rows = order[i:i + batch_size]
            u = torch.randint(len(x), (batch_size,), generator=g)  # independent of rows
            for m in ("SIU", "SIB"):  # (each engine differentiates its own graph of it)
                engines[m].record_independent_gradient(ce(model(x[u]), y[u]))
            opt.zero_grad()
            ce(model(x[rows]), y[rows]).backward()
            for si in engines.values():
                si.before_step()
            opt.step()
            for si in engines.values():
                si.after_step()
            steps += 1
        log(f"  epoch {epoch + 1}/{epochs}: {steps} steps, {time.process_time() - start:.0f} s CPU")
    # Ω of the path-integral estimators at each damping ξ (the run is the same: ω and the path
    # length Δ = θ − θ* do not depend on ξ), as the consolidation computes it
    omegas = {xi: {} for xi in eps}
    for m, si in engines.items():
        state = si.state_dict()
        index = state["groups"][None]["index"]
        buffers = state["buffers"]
        for xi in eps:
            omegas[xi][m] = {}
            for name, i in index.items():
                run_ = buffers[f"si_running_omega_weights_{i}"]
                if m == "SOS":
                    omegas[xi][m][name] = run_.clamp_min(0).sqrt()
                else:
                    delta = dict(model.named_parameters())[name].detach() - \
                        buffers[f"si_prev_theta_weights_{i}"]
                    omegas[xi][m][name] = (run_ / (delta ** 2 + xi)).clamp_min(0)
    for si in engines.values():
        si.end_task()
    for m in ("SI", "SOS"):  # the engines' own consolidation (at ξ = eps[0]) agrees
        for n, o in engines[m].importances().items():
            torch.testing.assert_close(o, omegas[eps[0]][m][n])
    layers = sorted({n.rsplit(".", 1)[0] for n in omegas[eps[0]]["SI"]}, key=lambda s: int(s))
    correlations = {}
    for xi in eps:
        omega = omegas[xi]
        for a, b in PAIRS:
            for layer in layers:
                va = torch.cat([omega[a][n].flatten() for n in omega[a]
                                if n.startswith(layer + ".")])
                vb = torch.cat([omega[b][n].flatten() for n in omega[b]
                                if n.startswith(layer + ".")])
                correlations[f"xi={xi:g}/{a}-{b}/{layer}"] = {"pearson": pearson(va, vb),
                                                              "spearman": spearman(va, vb)}
    omega = omegas[eps[0]]
    # a sample of (SI, SOS) pairs of the first layer for the scatter plot
    first = [n for n in omega["SI"] if n.startswith(layers[0] + ".")]
    si_all = torch.cat([omega["SI"][n].flatten() for n in first])
    sos_all = torch.cat([omega["SOS"][n].flatten() for n in first])
    pick = torch.randperm(len(si_all), generator=g)[:5000]
    return {"benchmark": benchmark, "seed": seed, "hidden": hidden, "epochs": epochs,
            "batch_size": batch_size, "steps": steps, "layers": layers, "eps": list(eps),
            "correlations": correlations,
            "scatter": {"SI": si_all[pick].tolist(), "SOS": sos_all[pick].tolist()},
            "cpu_seconds": time.process_time() - start, "torch": torch.__version__}


def summary(results: list[dict]) -> str:
    """Mean (over seeds) Pearson and Spearman correlation per pair and layer, as Markdown."""
    r0 = results[0]
    lines = [f"{r0['benchmark']}, first task, {'-'.join(map(str, r0['hidden']))} hidden units, "
             f"Adam, batch {r0['batch_size']}, {r0['epochs']} epochs ({r0['steps']} steps), "
             f"{len(results)} seed(s); Pearson / Spearman of Ω per layer (weights and biases "
             f"together), mean over seeds, for SI's damping ξ (SOS uses none):\n",
             "| ξ | pair | " + " | ".join(f"layer {k + 1}" for k in range(len(r0["layers"])))
             + " |", "|---|---|" + "---|" * len(r0["layers"])]
    for xi in r0["eps"]:
        for a, b in PAIRS:
            cells = []
            for layer in r0["layers"]:
                key = f"xi={xi:g}/{a}-{b}/{layer}"
                p = sum(r["correlations"][key]["pearson"] for r in results) / len(results)
                s = sum(r["correlations"][key]["spearman"] for r in results) / len(results)
                cells.append(f"{p:.3f} / {s:.3f}")
            lines.append(f"| {xi:g} | {a} vs {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def scatter_plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = results[0]
    si, sos = torch.tensor(r["scatter"]["SI"]), torch.tensor(r["scatter"]["SOS"])
    keep = (si > 0) & (sos > 0)
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.scatter(sos[keep], si[keep], s=2, alpha=0.4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("SOS: √(running average of g²)")
    ax.set_ylabel(f"SI: Ω (task-loss gradient × step), ξ = {r['eps'][0]:g}")
    ax.set_title(f"{r['benchmark']}, first layer, seed {r['seed']}\n"
                 f"(5,000 weights; {int((~keep).sum())} with Ω = 0 left out)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    from .options import BENCHMARKS, default_data_root, rerun_command

    ap = argparse.ArgumentParser(prog="python -m experiments.estimators",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--benchmark", choices=BENCHMARKS, default="permuted-mnist")
    ap.add_argument("--hidden", type=int, nargs="+", default=[2000, 2000])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--eps", type=float, nargs="+", default=[0.1, 1e-3],
                    help="SI's dampings ξ to correlate at (one run serves them all; default "
                         "0.1, Benzing's for MNIST, and 1e-3, his for CIFAR and this package's)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", required=True, help="folder for the JSON files, summary and plot")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = rerun_command("experiments.estimators", argv if argv is not None else sys.argv[1:])
    results = []
    for seed in args.seeds:
        path = out / f"importances-seed{seed}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
            print(f"seed {seed}: already in {path}")
            continue
        print(f"seed {seed}: {args.benchmark}, first task", flush=True)
        r = run(args.benchmark, hidden=args.hidden, epochs=args.epochs,
                batch_size=args.batch_size, seed=seed, eps=tuple(args.eps),
                root=args.data_root or default_data_root(),
                log=lambda m: print(m, flush=True))
        r["command"] = command
        path.write_text(json.dumps(r))
        results.append(r)
    results.sort(key=lambda r: r["seed"])
    text = summary(results)
    (out / "summary.md").write_text(text)
    scatter_plot(results, out / "si-vs-sos.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
