"""SI, SIU, SIB and SOS (Benzing 2022; SOS also with α = 1) compared on accuracy, each with its
own strength c chosen on held-out training data, at two batch sizes.

For every batch size, scenario and method: a sweep of c over a grid, each value trained on
the tasks with a fraction of every task's training data held out (`--validation`), scored by
the mean held-out accuracy after the last task over the sweep seeds; then the chosen c trained
on the full training data and measured on the test set over the final seeds, beside Naive on
the same seeds. Every run is a `python -m experiments run` run (its JSON file in the output
folder), so the command reruns only what is missing.

    python -m experiments.family --benchmark split-digits --scenario task domain \\
        --batch-sizes 16 128 --out results/family/split-digits
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

#: each method's importance= and SOS's α (SOS-alpha1: Benzing's batch-2048 SOS)
METHODS = {"SI": ("task", 0.0), "SIU": ("siu", 0.0), "SIB": ("sib", 0.0), "SOS": ("sos", 0.0),
           "SOS-alpha1": ("sos", 1.0)}


def _runs(out: Path, configs, log, command: str) -> list[dict]:
    """Each config's saved result, training the missing ones; their files record `command`
    (the study's, without where this machine keeps the data) and no data folder."""
    from .config import result_path, save_result
    from .run import run

    results = []
    for cfg in configs:
        path = result_path(out, cfg)
        if not path.exists():
            log(f"  {cfg.run_id()}  c={cfg.si_lambda:g} batch {cfg.batch_size}"
                + (" (validation)" if cfg.validation else ""))
            result = run(cfg, log=lambda m: None)
            result["command"] = command
            result["config"]["data_root"] = ""
            save_result(out, result)
        results.append(json.loads(path.read_text()))
    return results


def main(argv=None) -> int:
    from .options import default_data_root, rerun_command, without_options, wrap_command
    from .report import _pm, mean_sem
    from .config import RunConfig

    ap = argparse.ArgumentParser(prog="python -m experiments.family",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--benchmark", default="split-digits")
    ap.add_argument("--scenario", nargs="+", default=["task", "domain"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--grid", type=float, nargs="+", default=[0.1, 1, 10, 100, 1000])
    ap.add_argument("--sweep-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12, 13, 14])
    ap.add_argument("--validation", type=float, default=0.2)
    ap.add_argument("--hidden", type=int, nargs="+", default=[100, 100])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--eps", type=float, default=1e-3, help="SI's damping ξ (SIU, SIB; SOS "
                    "divides by 1, Benzing's damping for it)")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    ap.add_argument("--scale-lr", action="store_true",
                    help="multiply --lr by batch/256 at each batch size, as Benzing's code does")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS)[:4],
                    help="SI and the estimators to compare with it (default: SI SIU SIB SOS; "
                         "SOS-alpha1 is SOS of g − g_u, Benzing's batch-2048 setting)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if "SI" not in args.methods:
        ap.error("--methods must include SI: every other method is compared with it")
    methods = {m: METHODS[m] for m in METHODS if m in args.methods}
    shown = without_options(argv if argv is not None else sys.argv[1:])
    command = rerun_command("experiments.family", shown)
    out = Path(args.out)
    # (the digits need no data folder: none is recorded in their results)
    root = "" if args.benchmark == "split-digits" else args.data_root or default_data_root()
    base = dict(benchmark=args.benchmark, hidden=tuple(args.hidden), iterations=None,
                epochs=args.epochs, si_eps=args.eps, lr=args.lr, data_root=root)
    lr_of = (lambda b: args.lr * b / 256) if args.scale_lr else (lambda b: args.lr)
    log = lambda m: print(m, flush=True)  # noqa: E731
    rows, paired, chosen = [], [], []
    curves = {}  # (scenario, method) -> [(batch, mean, sem)]
    for batch in args.batch_sizes:
        for scenario in args.scenario:
            common = dict(base, scenario=scenario, batch_size=batch, lr=lr_of(batch))
            best = {}
            for name, (importance, alpha) in methods.items():
                scores = {}
                for c in args.grid:
                    runs = _runs(out / "sweep" / f"batch{batch}" / f"c{c:g}", [
                        RunConfig(**common, method="si", si_importance=importance, si_lambda=c,
                                  sos_alpha=alpha, seed=s, validation=args.validation)
                        for s in args.sweep_seeds], log, command)
                    scores[c] = sum(r["final_average_accuracy"] for r in runs) / len(runs)
                best[name] = max(scores, key=scores.get)
                chosen.append(f"| {batch} | {scenario} | {name} | "
                              + " | ".join(f"{100 * scores[c]:.1f}" for c in args.grid)
                              + f" | **{best[name]:g}** |")
            test = out / "test" / f"batch{batch}"
            finals = {"Naive": _runs(test, [RunConfig(**common, method="naive", seed=s)
                                            for s in args.seeds], log, command)}
            for name, (importance, alpha) in methods.items():
                finals[name] = _runs(test, [
                    RunConfig(**common, method="si", si_importance=importance, sos_alpha=alpha,
                              si_lambda=best[name], seed=s) for s in args.seeds], log, command)
            acc = {m: [100 * r["final_average_accuracy"] for r in rs] for m, rs in finals.items()}
            for m in acc:
                curves.setdefault((scenario, m), []).append((batch, *mean_sem(acc[m])))
            rows.append(f"| {batch} | {scenario} | "
                        + " | ".join(_pm(*mean_sem(acc[m])) for m in ["Naive", *methods])
                        + " |")
            pairs = [(m, "SI") for m in methods if m != "SI"]
            if "SOS" in methods and "SOS-alpha1" in methods:
                pairs.append(("SOS-alpha1", "SOS"))
            for m, minus in pairs:
                diffs = [a - b for a, b in zip(acc[m], acc[minus])]
                paired.append(f"| {batch} | {scenario} | {m} − {minus} | "
                              f"{_pm(*mean_sem(diffs))} |")
    text = "\n".join([
        f"{args.benchmark}, {'-'.join(map(str, args.hidden))} hidden units, Adam (lr "
        + (f"{args.lr:g} × batch/256" if args.scale_lr else f"{args.lr:g}")
        + f"), {args.epochs} epoch{'s' if args.epochs != 1 else ''} per task, "
        f"ξ = {args.eps:g} (SOS: 1). Mean accuracy over all tasks after the last (%), "
        f"mean ± SEM over seeds {', '.join(map(str, args.seeds))} on the test set, each "
        f"method at the c it scored best with on held-out training data "
        f"({args.validation:g} of each task, seeds {', '.join(map(str, args.sweep_seeds))}):\n",
        "| batch | scenario | Naive | " + " | ".join(methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
        *rows, "",
        "Paired differences on the same seeds, points:\n",
        "| batch | scenario | pair | difference |", "|---|---|---|---|", *paired, "",
        "Held-out accuracy (%) per c of the sweep, and the c chosen:\n",
        "| batch | scenario | method | " + " | ".join(f"c = {c:g}" for c in args.grid)
        + " | chosen |", "|---|---|---|" + "---|" * (len(args.grid) + 1), *chosen, "",
        "Rerun:\n", "```bash", wrap_command(command), "```", ""])
    (out / "summary.md").write_text(text)
    _plot(curves, args.scenario, ["Naive", *methods], out / "batch-size.png")
    (out / "family.json").write_text(json.dumps({"argv": shown,
                                                 "args": {k: v for k, v in vars(args).items()
                                                          if k != "data_root"},
                                                 "config": dataclasses.asdict(
                                                     RunConfig(**dict(base, data_root="")))}))
    print(text)
    return 0


def _plot(curves: dict, scenarios: list[str], methods: list[str], path: Path) -> None:
    """Accuracy against batch size, per method, one panel per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scenarios), figsize=(4.2 * len(scenarios), 4.0),
                             squeeze=False, layout="constrained")
    markers = "osD^vP*X"
    for ax, scenario in zip(axes[0], scenarios):
        for k, m in enumerate(methods):
            pts = curves.get((scenario, m), [])
            if pts:
                b, mean, sem = zip(*pts)
                # each method a little to the side, so that equal points stay visible
                dodge = 2 ** (0.05 * (k - (len(methods) - 1) / 2))
                ax.errorbar([x * dodge for x in b], mean, yerr=sem, marker=markers[k % 8],
                            capsize=3, label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({b for (s, _), pts in curves.items() if s == scenario
                              for b, *_ in pts}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("batch size")
        ax.set_ylabel("accuracy after the last task, %")
        ax.set_title(f"{scenario}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8,
               frameon=False)  # below the panels, not over their lines
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
