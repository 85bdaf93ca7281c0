"""Command line: ``python -m experiments [run|report] ...``.

With no arguments it runs the project's main job: SI vs Naive vs Avalanche's SI on
split-digits (real data bundled with scikit-learn, no download) in all three scenarios
over three seeds, then writes the tables and plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import math
import os
import re
import sys
from pathlib import Path

from avalanche_si.options import CLAMP_MODES, IMPORTANCE_MODES  # loads neither torch nor Avalanche

from .presets import PRESETS
from .options import (BENCHMARKS, CLASS_ORDERS, INITS, LOSSES, METHODS, ONLINE_METHODS,
                      SCENARIOS, TASK_HEADS, DataError, default_data_root)

SPLIT_CLASSES = {"split-mnist": 10, "split-fmnist": 10, "split-digits": 10, "split-cifar10": 10,
                 "split-cifar100": 100}


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default where there is one to show (not None, not a flag's False); options
    whose default depends on the preset say so in their help."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class UsageError(ValueError):
    """Bad command-line input; the message says how to fix it."""


def _load(*modules: str) -> None:
    """Import the heavy modules (torch, Avalanche, matplotlib: seconds) with Ctrl-C ending the
    process at once, in one line: an import cut short by a KeyboardInterrupt leaves modules
    half made, which then fail with unrelated errors (numpy's recursing ``__getattr__``)."""
    import signal
    import threading

    def leave(signum, frame):
        os.write(2, b"\ninterrupted.\n")
        os._exit(130)

    own = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, leave) if own else None
    try:
        for name in modules:
            if name == "matplotlib.pyplot":  # drawn to files: no window, on any machine
                importlib.import_module("matplotlib").use("Agg")
            importlib.import_module(name)
    finally:
        if own:
            signal.signal(signal.SIGINT, previous)


class _Parser(argparse.ArgumentParser):
    """An argparse error in one line (argparse prints its whole usage block first, 25 lines
    for ``run``, which buries the one line that says what was wrong)."""

    def error(self, message):
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def _parser() -> argparse.ArgumentParser:
    fmt = _Help
    p = _Parser(
        prog="python -m experiments", formatter_class=fmt,
        description="Synaptic Intelligence on continual-learning streams, through Avalanche. "
                    "With no arguments: the main job (SI, Naive and Avalanche's SI on "
                    "scikit-learn's digits, every scenario, three seeds; offline).")
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", formatter_class=fmt,
                       help="train and evaluate; write one JSON per run, then the report")
    r.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a published protocol (sets benchmark, network, optimizer, iterations, c)")
    r.add_argument("--benchmark", choices=BENCHMARKS, default=None,
                   help="the data, when no --preset sets it (split-digits needs no download); "
                        "with an online preset, the tasks its stream is made of")
    r.add_argument("--scenario", nargs="+", choices=SCENARIOS, default=list(SCENARIOS),
                   help="task: a head per task, task labels at test; domain: one shared head "
                        "of a task's size; class: one head over all classes (online presets: "
                        "task and domain)")
    r.add_argument("--method", nargs="+", choices=sorted(set(METHODS + ONLINE_METHODS),
                                                         key=(METHODS + ONLINE_METHODS).index),
                   default=None, metavar="METHOD",
                   help="methods to run: " + ", ".join(METHODS) + "; on online and task-free "
                        "presets: " + ", ".join(ONLINE_METHODS) + " (SI by when it "
                        "consolidates). Default: naive si avalanche-si, or every online method")
    r.add_argument("--si-importance", nargs="+", choices=IMPORTANCE_MODES, default=None,
                   help="SIPlugin importance mode(s), for --method si (default: the preset's, "
                        "else total)")
    r.add_argument("--si-clamp", nargs="+", choices=CLAMP_MODES, default=None,
                   help="where SIPlugin clamps the importance at 0 (task: each task's part, "
                        "the paper; total: the running sum, Zenke's code; none: van de Ven's "
                        "code), for --method si (default: the preset's, else task)")
    r.add_argument("--task-head", choices=TASK_HEADS, default=None,
                   help="Task-IL output layer: separate (a head per task, Avalanche's "
                        "MultiHeadClassifier) or shared (one layer, each task's units selected "
                        "by its label: van de Ven's code); results of shared go to e.g. "
                        "si-shared_head/. Default: the preset's, else separate")
    r.add_argument("--class-order", choices=CLASS_ORDERS, default="seeded",
                   help="split benchmarks: which classes form which task for a seed; seeded "
                        "(torch's generator) or vandeven (the orders of van de Ven & Tolias's "
                        "code, whose published means are over --seeds 1 to 20); results of "
                        "vandeven go to e.g. si-vdv_order/")
    r.add_argument("--init", choices=INITS, default=None,
                   help="initialisation of the linear layers: torch (PyTorch's default, weights "
                        "and biases uniform in ±1/sqrt(fan_in)) or glorot (Keras's Dense "
                        "default, which Zenke et al.'s code used: Glorot-uniform weights, zero "
                        "biases) or benzing (Glorot-uniform weights, biases 0.1, as Benzing's "
                        "code); default: the preset's (glorot for zenke-permuted-mnist, benzing "
                        "for benzing-permuted-mnist), else torch; results go to e.g. "
                        "si-init_glorot/")
    r.add_argument("--reinit", action=argparse.BooleanOptionalAction, default=None,
                   help="re-initialise the network's linear layers (with --init) at the start of "
                        "every task after the first, as Benzing's code does; SI measures that "
                        "task's path length from the new start (restart_path) while its penalty "
                        "still pulls towards the last task's end. Default: the preset's (on for "
                        "benzing-permuted-mnist), else off; results go to e.g. "
                        "si-init_benzing-reinit/")
    r.add_argument("--loss", choices=LOSSES, default="torch",
                   help="training loss: torch (nn.CrossEntropyLoss) or keras (Keras 2's "
                        "categorical cross-entropy, which Zenke et al.'s code used: softmax "
                        "probabilities clipped to [1e-7, 1-1e-7], so an example's gradient is "
                        "exactly zero once its class has p > 1-1e-7); results of keras go to "
                        "e.g. naive-loss_keras/")
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="random seeds; each fixes the class split, data order and initialisation")
    r.add_argument("--si-lambda", type=float, default=None,
                   help="SI strength c, in every scenario (default: the preset's per scenario)")
    r.add_argument("--eps", type=float, default=None,
                   help="SI damping xi (default: the preset's, 0.1 in the published protocols)")
    r.add_argument("--ewc-lambda", type=float, default=None,
                   help="EWC strength, for --method ewc (default 5000)")
    r.add_argument("--lr", type=float, default=None,
                   help="Adam's learning rate (default: the preset's)")
    r.add_argument("--iterations", type=int, default=None,
                   help="mini-batches per task (default: the preset's)")
    r.add_argument("--epochs", type=int, default=None,
                   help="epochs per task, instead of --iterations")
    r.add_argument("--batch-size", type=int, default=None,
                   help="mini-batch size (default: the preset's)")
    r.add_argument("--hidden", type=int, nargs="+", default=None,
                   help="hidden layer sizes of the MLP (default: the preset's)")
    r.add_argument("--n-tasks", type=int, default=None,
                   help="number of tasks (default: the preset's, or 5 split / 10 permuted)")
    r.add_argument("--consolidate-every", type=int, default=None, metavar="K",
                   help="online presets, si-k: optimizer steps between consolidations "
                        "(default: the preset's, 100 as van de Ven's --update-every)")
    r.add_argument("--plateau", type=float, nargs=3, default=None,
                   metavar=("WINDOW", "MEAN", "VARIANCE"),
                   help="online presets, si-plateau: the loss window's length and the mean and "
                        "variance below which it is a plateau (default: the preset's)")
    r.add_argument("--fuzziness", type=int, default=None, metavar="N",
                   help="task-free presets: iterations over which one context gives way to "
                        "the next, on each side of the transition (default: the preset's, 500 "
                        "as van de Ven's; at most half of --iterations)")
    r.add_argument("--eval-every", type=int, default=None, metavar="N",
                   help="online presets: iterations between two accuracy measurements over "
                        "all tasks (default: a twentieth of the stream)")
    r.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    r.add_argument("--data-root", default=None,
                   help=f"folder with torchvision's dataset folders (default ${'{'}AVALANCHE_SI_DATA{'}'} "
                        "or ./data)")
    r.add_argument("--out", default=None,
                   help="results folder (default results/<preset>, results/digits for the "
                        "main job)")
    r.add_argument("--validation", type=float, default=None, metavar="FRACTION",
                   help="hold this fraction of each task's training data out and report "
                        "accuracy on it instead of the test set: choose c this way, then rerun "
                        "the chosen value without it (use another --out)")
    r.add_argument("--force", action="store_true", help="rerun runs whose results exist")
    r.add_argument("--wandb", action="store_true",
                   help="log each run to Weights & Biases (SIWandBLogger), plus one run with "
                        "the tables and plots; wandb writes them under <out>/wandb/ (with "
                        "WANDB_MODE=offline, to upload later with `wandb sync`); wandb's own "
                        "messages are off unless WANDB_SILENT=false")
    r.add_argument("--wandb-project", default="avalanche-si",
                   help="wandb project of --wandb runs (they are written under <out>/wandb/)")
    r.add_argument("--no-report", action="store_true", help="skip tables and plots")
    r.add_argument("--dry-run", action="store_true",
                   help="list the runs these options make, each marked done (its JSON exists "
                        "in the results folder) or to run, and train nothing")
    rep = sub.add_parser("report", formatter_class=fmt,
                         help="rebuild tables and plots from saved results")
    rep.add_argument("--out", default="results/digits",
                     help="the results folder to read (its seed*.json files) and write "
                          "summary.md, summary.csv, paired.md and plots/ into")
    rep.add_argument("--docs", default=None, metavar="DOCS",
                     help="instead of one folder, regenerate the documentation's result pages "
                          "(DOCS/reproductions/, DOCS/performance.md) and results/headline.md "
                          "from every folder of results/")
    rep.add_argument("--readme", default=None, metavar="README.md",
                     help="then refresh this file's '<!-- copy of PATH -->' blocks from the "
                          "files they name (how this project's README tables are made)")
    p.commands = {"run": r, "report": rep}
    return p


def _configs(args) -> list:
    """The runs these options ask for. Every check that needs no import comes first, so that
    a wrong value is refused in a fraction of a second rather than after torch and Avalanche
    have loaded."""
    preset_name = args.preset or ("digits" if args.benchmark in (None, "split-digits") else None)
    preset = dict(PRESETS[preset_name]) if preset_name else {}
    online = preset.get("stream", "tasks") != "tasks"
    if args.method is None:
        args.method = list(ONLINE_METHODS) if online else ["naive", "si", "avalanche-si"]
    wrong = [m for m in args.method if m not in (ONLINE_METHODS if online else METHODS)]
    if wrong:
        raise UsageError(f"--method {' '.join(wrong)}: "
                         + (f"the online preset {preset_name} runs {', '.join(ONLINE_METHODS)}."
                            if online else "the online methods run on online presets only "
                                           "(vandeven-taskfree-*, avalanche-online-*)."))
    if not online:
        for opt in ("consolidate_every", "plateau", "eval_every", "fuzziness"):
            if getattr(args, opt) is not None:
                raise UsageError(f"--{opt.replace('_', '-')} applies to online presets only.")
    if online and "class" in (args.scenario or []) and args.scenario != list(SCENARIOS):
        raise UsageError("online presets run the task and domain scenarios (SI does not help "
                         "class-incremental learning); drop --scenario class.")
    if online and args.scenario == list(SCENARIOS):
        args.scenario = ["task", "domain"]
    if args.benchmark and preset and args.benchmark != preset["benchmark"] and \
            preset.get("stream", "tasks") == "tasks":  # an online preset is a stream protocol
        raise UsageError(f"--benchmark {args.benchmark} contradicts --preset {preset_name} "
                         f"({preset['benchmark']}); drop one of them.")
    if args.iterations is not None and args.epochs is not None:
        raise UsageError("give --iterations or --epochs, not both.")
    if "si" not in args.method and args.si_importance is not None:
        raise UsageError("--si-importance applies to --method si only; add si to --method.")
    if "si" not in args.method and args.si_clamp is not None:
        raise UsageError("--si-clamp applies to --method si only; add si to --method.")
    si_methods = {"si", "avalanche-si", "avalanche-si-fixed"} | set(ONLINE_METHODS[1:])
    for opt, value in (("--si-lambda", args.si_lambda), ("--eps", args.eps)):
        if value is not None and not si_methods & set(args.method):
            raise UsageError(f"{opt} applies to the SI methods only (si, avalanche-si, "
                             f"avalanche-si-fixed); add one to --method.")
    if args.ewc_lambda is not None and "ewc" not in args.method:
        raise UsageError("--ewc-lambda applies to --method ewc only; add ewc to --method.")
    if args.hidden is not None and any(h <= 0 for h in args.hidden):
        raise UsageError(f"--hidden sizes must be positive integers, got "
                         f"{' '.join(map(str, args.hidden))}.")
    task_head = args.task_head or preset.get("task_head", "separate")
    if args.task_head not in (None, "separate") and "task" not in args.scenario:
        raise UsageError("--task-head applies to --scenario task only; add task to --scenario.")
    if any(s < 0 for s in args.seeds):
        raise UsageError("--seeds must be non-negative integers.")
    for name in ("si_lambda", "ewc_lambda", "eps", "lr", "validation"):
        v = getattr(args, name)
        if v is not None and not math.isfinite(v):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {v}.")
    if not re.fullmatch(r"(cpu|mps|(cuda|xpu)(:\d+)?)", args.device):
        raise UsageError(f"--device {args.device}: give cpu, cuda, cuda:N, xpu[:N] or mps.")
    for name in ("si_lambda", "ewc_lambda"):
        v = getattr(args, name)
        if v is not None and v < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {v}.")
    for name in ("eps", "lr"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise UsageError(f"--{name} must be > 0, got {v}.")
    for name in ("iterations", "epochs", "batch_size", "n_tasks", "consolidate_every",
                 "eval_every", "fuzziness"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {v}.")
    # A preset may fix the SI variant of the code it reproduces (Zenke's: task gradient,
    # clamp on the running total); --si-importance / --si-clamp override it.
    importances = args.si_importance or [preset.get("si_importance", "total")]
    clamps = args.si_clamp or [preset.get("si_clamp", "task")]
    init = args.init or preset.get("init", "torch")  # Zenke's preset: their Keras init
    base = {k: v for k, v in preset.items()
            if k not in ("si_lambda", "si_importance", "si_clamp", "init", "task_head")}
    if args.reinit is not None:
        base["reinit"] = args.reinit
    if base.get("reinit"):
        if base.get("stream", "tasks") != "tasks":
            raise UsageError("--reinit applies to streams of whole tasks, not to online or "
                             "task-free presets.")
        plugin = [m for m in args.method if m.startswith("avalanche-si")]
        if plugin:
            raise UsageError(f"--reinit: {plugin[0]} (Avalanche's SI plugin) would count the jump "
                             "to the new weights as part of the task's path; leave it out of "
                             "--method, or add --no-reinit.")
    if args.plateau is not None:
        w, m, v = args.plateau
        if not all(map(math.isfinite, (w, m, v))) or w != int(w) or w < 1 or m <= 0 or v <= 0:
            raise UsageError("--plateau takes a whole window length >= 1 and a mean and a "
                             "variance threshold > 0.")
        args.plateau = (int(w), m, v)
    if args.validation is not None and not 0 < args.validation < 1:
        raise UsageError(f"--validation takes a fraction between 0 and 1, got {args.validation:g}.")
    overrides = dict(si_eps=args.eps, ewc_lambda=args.ewc_lambda, lr=args.lr,
                     batch_size=args.batch_size, n_tasks=args.n_tasks,
                     hidden=tuple(args.hidden) if args.hidden else None,
                     consolidate_every=args.consolidate_every, plateau=args.plateau,
                     eval_every=args.eval_every, fuzziness=args.fuzziness,
                     validation=args.validation)
    base.update({k: v for k, v in overrides.items() if v is not None})
    if args.epochs is not None:
        base.update(iterations=None, epochs=args.epochs)
    if args.iterations is not None:
        base["iterations"] = args.iterations
    if args.benchmark:
        base["benchmark"] = args.benchmark
    if "benchmark" not in base:
        raise UsageError("choose a --benchmark or a --preset.")
    if base.get("stream") == "fuzzy" and 2 * base.get("fuzziness", 0) > (base.get("iterations") or 0):
        raise UsageError(f"--fuzziness {base['fuzziness']} is more than half of --iterations "
                         f"{base.get('iterations')}: a transition must fit in a context.")
    n_classes = SPLIT_CLASSES.get(base["benchmark"])
    if n_classes and args.n_tasks and n_classes % args.n_tasks:
        raise UsageError(f"{base['benchmark']} has {n_classes} classes, which --n-tasks "
                         f"{args.n_tasks} cannot split into equal tasks; use a divisor of "
                         f"{n_classes}.")
    if args.class_order != "seeded" and not base["benchmark"].startswith("split-"):
        raise UsageError(f"--class-order applies to split benchmarks only, not "
                         f"{base['benchmark']}.")
    if args.device.startswith("cuda"):  # the one check that loads torch
        _load("torch")
        import torch
        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available here; use --device cpu.")
    from .config import RunConfig

    data_root = args.data_root or default_data_root()
    configs = []
    for scenario in args.scenario:
        c = args.si_lambda
        if c is None:
            c = preset.get("si_lambda", 1.0)
            c = c[scenario] if isinstance(c, dict) else c
        for method in args.method:
            variants = (itertools.product(importances, clamps) if method == "si"
                        else [("total", "task")])
            for importance, clamp in variants:
                for seed in args.seeds:
                    configs.append(RunConfig(**base, scenario=scenario, method=method, seed=seed,
                                             si_lambda=c, si_importance=importance, si_clamp=clamp,
                                             task_head=task_head if scenario == "task"
                                             else "separate", class_order=args.class_order,
                                             init=init, loss=args.loss,
                                             data_root=data_root, device=args.device,
                                             preset=preset_name))
    return configs


def _runs(n: int) -> str:
    return f"{n} run" + ("" if n == 1 else "s")


def cmd_run(args) -> int:
    from .config import result_path
    from .report import write_report

    configs = _configs(args)

    out = Path(args.out or f"results/{configs[0].preset or configs[0].benchmark}")
    if not args.dry_run:  # before anything is made on the disk
        _can_make(out)
        _load("experiments.run", "experiments.streams",
              *([] if args.no_report else ["matplotlib.pyplot"]),
              *(["avalanche_si.wandb_logger"] if args.wandb else []))
    try:
        todo = [c for c in configs if args.force or not result_path(out, c).exists()]
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot read there ({exc.strerror or exc}); choose a "
                         "folder you can read and write.") from None
    print(f"{_runs(len(configs))} ({len(configs) - len(todo)} already in {out}); "
          f"results go to {out}/", flush=True)
    def label(cfg):  # the same words in the dry-run listing and the training log
        if cfg.method in ("naive", "joint", "ewc"):
            return cfg.run_id() + (f"  lambda={cfg.ewc_lambda:g}" if cfg.method == "ewc" else "")
        return f"{cfg.run_id()}  c={cfg.si_lambda:g} xi={cfg.si_eps:g}"

    if args.dry_run:
        for cfg in configs:
            print(f"  {'to run' if cfg in todo else 'done'}  {label(cfg)}")
        return 0
    if args.wandb:
        # wandb's own banners and summaries would bury the progress lines: off unless asked
        # for (WANDB_SILENT=false); one line here says where the runs go
        os.environ.setdefault("WANDB_SILENT", "true")
        print(f"wandb: runs are written under {out}/wandb/"
              + (" (offline: upload them later with `wandb sync`)"
                 if os.environ.get("WANDB_MODE") == "offline" else ""), flush=True)
    created, finished = _check_writable(out), []
    try:
        _train_all(args, out, todo, label, finished)
    except KeyboardInterrupt:
        _remove_if_empty(created, out)
        done = sum(result_path(out, c).exists() for c in configs)
        if args.force:  # the files there may be older runs; --force reruns them all again
            said = (f"{len(finished)} of {_runs(len(todo))} rerun; without --force the same "
                    "command resumes with the others.")
        elif done:
            said = (f"{done} of {_runs(len(configs))} {'is' if len(configs) == 1 else 'are'} "
                    f"saved in {out}/; the same command resumes with the others.")
        else:
            said = "no run was saved; the same command starts again."
        print("\ninterrupted: " + said, file=sys.stderr, flush=True)
        return 130
    except BaseException:  # a data error, a crash: leave no empty results folder behind
        _remove_if_empty(created, out)
        raise
    if not args.no_report:
        try:
            report = write_report(out)
        except KeyboardInterrupt:
            print(f"\ninterrupted while writing the report; every run is saved in {out}/, and "
                  f"`python -m experiments report --out {out}` writes it.", file=sys.stderr,
                  flush=True)
            return 130
        if args.wandb:  # one more run that carries the tables and plots of the whole batch
            from avalanche_si.wandb_logger import SIWandBLogger
            lg = SIWandBLogger(project=args.wandb_project, name=f"report {out}", dir=str(out),
                               config={"results": str(out)}, job_type="report")
            lg.log_images(report["plots"])
            lg.log_markdown_table(report["summary_md"])
            lg.finish()
    return 0


def _train_all(args, out: Path, todo, label, finished: list) -> None:
    """Train and save each run in turn, appending each saved one to ``finished`` (a Ctrl-C
    between or inside runs loses only the run in progress)."""
    from .run import run

    streams = {}
    for k, cfg in enumerate(todo, 1):
        print(f"[{k}/{len(todo)}] {label(cfg)}", flush=True)
        key = (cfg.benchmark, cfg.scenario, cfg.seed, cfg.n_tasks, cfg.pad, cfg.class_order,
               cfg.validation)
        if key not in streams:  # one stream per (benchmark, scenario, seed), reused by methods
            from .streams import make_stream
            streams = {key: make_stream(cfg.benchmark, cfg.scenario, root=cfg.data_root,
                                        seed=cfg.seed, n_tasks=cfg.n_tasks, pad=cfg.pad,
                                        class_order=cfg.class_order,
                                        validation=cfg.validation)}
        loggers = []
        if args.wandb:
            from avalanche_si.wandb_logger import SIWandBLogger
            loggers.append(SIWandBLogger(project=args.wandb_project, name=cfg.run_id(),
                                         config=dataclasses.asdict(cfg), dir=str(out)))
        result = run(cfg, stream=streams[key], loggers=loggers,
                     log=lambda m: print(m, flush=True))
        path = _save(out, result)
        finished.append(cfg)
        for lg in loggers:
            lg.log_result(result)
            lg.finish()
        print(f"    final mean accuracy {100 * result['final_average_accuracy']:.2f}%, "
              f"forgetting {100 * result['average_forgetting']:.2f}%, "
              f"{result['seconds']:.1f} s -> {path}", flush=True)


def _can_make(out: Path) -> None:
    """Refuse, before anything loads or is made, a results folder under a file or under a
    folder we may not write in (the nearest one that exists decides)."""
    folder, why = Path(os.path.abspath(out)), None
    try:
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir():
            why = "is not a folder"
        elif not os.access(folder, os.W_OK | os.X_OK):
            why = "is not writable"
    except OSError:
        why = "cannot be read"
    if why:
        raise UsageError(f"--out {out}: cannot write there ({folder} {why}); choose a folder "
                         "you can write to.")


def _check_writable(out: Path) -> Path | None:
    """Refuse, before any training, a results folder that cannot be written. Returns the
    outermost folder this made (None if ``out`` existed), for :func:`_remove_if_empty`."""
    created = None
    # (through "..", a folder's parents on the path are not the folders above it on the
    # disk: such a path is left as it is rather than risk removing an empty folder of yours)
    for p in [] if ".." in out.parts else [out.absolute(), *out.absolute().parents]:
        try:
            if p.exists():
                break
        except OSError:  # a folder we may not look into: not ours to remove
            created = None
            break
        created = p
    probe = out / ".avalanche_si-write-test"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        _remove_if_empty(created, out)
        raise UsageError(f"--out {out}: cannot write there ({exc.strerror or exc}); choose a "
                         "folder you can write to.") from None
    return created


def _remove_if_empty(created: Path | None, out: Path) -> None:
    """Remove the folders from ``out`` up to ``created`` that this run made and left empty
    (a run that failed before saving anything leaves no trace)."""
    if created is None:
        return
    for p in [out.absolute(), *out.absolute().parents]:
        try:
            p.rmdir()  # only an empty folder
        except OSError:
            return
        if p == created:
            return


def _save(out: Path, result: dict) -> Path:
    """Save a run's result; if its folder has become unwritable, save it elsewhere and say
    where, rather than lose the run to a traceback."""
    from .config import save_result

    try:
        return save_result(out, result)
    except OSError as exc:
        import tempfile

        rescue = Path(tempfile.mkdtemp(prefix="avalanche_si-results-"))
        path = save_result(rescue, result)
        print(f"warning: could not write to {out} ({exc.strerror or exc}); this run's result "
              f"is in {path}: move it to {out}/{result['run_id']}.json", file=sys.stderr,
              flush=True)
        return path


def cmd_report(args) -> int:
    from .report import ReportError, refresh_readme, run_files, write_report

    if args.readme and not Path(args.readme).is_file():
        raise UsageError(f"--readme {args.readme}: no such file.")
    if args.docs:
        from .docs import write_docs

        _load("matplotlib.pyplot")
        written = write_docs(Path(args.docs), Path("results"))
        print(f"{len(written)} files written under {args.docs}/ and results/headline.md")
        if args.readme:
            changed = refresh_readme(Path(args.readme))
            print(f"{args.readme}: " + (f"refreshed {', '.join(changed)}" if changed
                                         else "its copied tables were current"))
        # pages that copy the README's quick start or the changelog, paths from the repo root
        root = Path(args.docs).resolve().parent
        for page in sorted(Path(args.docs).rglob("*.md")):
            changed = refresh_readme(page, root)
            if changed:
                print(f"{page}: refreshed {', '.join(changed)}")
        return 0
    try:
        if next(run_files(Path(args.out)), None):  # there is something to draw
            _load("matplotlib.pyplot")
        write_report(Path(args.out))
        changed = refresh_readme(Path(args.readme)) if args.readme else None
    except (FileNotFoundError, ReportError) as exc:  # no results, mixed results, a README
        raise UsageError(str(exc)) from None         # block naming a missing file
    except OSError as exc:
        raise UsageError(f"--out {args.out}: cannot read or write there "
                         f"({exc.strerror or exc}).") from None
    if changed is not None:
        print(f"{args.readme}: " + (f"refreshed {', '.join(changed)}" if changed
                                     else "its copied tables were current"))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run"] + argv
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would name the top-level help; the subcommand's lists the options
        parser.commands[args.command or "run"].error(
            f"unrecognized arguments: {' '.join(unknown)}")
    try:
        if args.command == "report":
            return cmd_report(args)
        return cmd_run(args)
    except (UsageError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while torch loads, or the report draws: nothing to resume
        print("\ninterrupted.", file=sys.stderr, flush=True)
        return 130
