"""The names the command line accepts, the data error it reports, the run-id suffixes
that ``report`` needs, and how a command's rerun line and saved output are made: no imports beyond the standard library, so that ``python -m
experiments report`` (and ``--help``) start without loading torch or Avalanche."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys

BENCHMARKS = ("split-mnist", "permuted-mnist", "split-fmnist", "permuted-fmnist", "split-digits",
              "split-cifar10", "split-cifar100")
SCENARIOS = ("task", "domain", "class")
CLASS_ORDERS = ("seeded", "vandeven")
METHODS = ("naive", "si", "avalanche-si", "avalanche-si-fixed", "ewc", "joint")
#: the methods of online and task-free presets (experiments/online.py): SI by consolidation policy
ONLINE_METHODS = ("naive", "si-experience", "si-k", "si-plateau", "si-boundary")
TASK_HEADS = ("separate", "shared")  # Task-IL output: a head per task, or one masked layer
INITS = ("torch", "glorot", "benzing")  # linear layers: PyTorch's default, Keras's Dense, or
#                                        Glorot weights with biases 0.1 (Benzing's code)
LOSSES = ("torch", "keras")          # cross-entropy: PyTorch's, or Keras 2's clipped one
DATA_ENV = "AVALANCHE_SI_DATA"

# Run-id suffixes that change the data (the tasks) rather than the method: a run with one is
# compared with the Naive (or SI) run that has the same suffix (report.paired).
CLASS_ORDER_SUFFIX = {"vandeven": "-vdv_order"}
DATA_SUFFIXES = tuple(CLASS_ORDER_SUFFIX.values())
# Run-id suffixes of --init, --loss and --reinit (run.RunConfig.run_id writes "-init_<name>",
# "-loss_<name>" and "-reinit"): the network start and loss of a protocol. report.paired
# compares such a run with Naive (and SI) of the same suffixes, and with the same method minus
# one of them.
PROTOCOL_SUFFIX = re.compile(r"-(?:init|loss)_[a-z]+|-reinit(?![a-z_])")


class DataError(RuntimeError):
    """A dataset is missing or unreadable; the message says where it looked."""


def without_options(argv: list[str], drop: tuple[str, ...] = ("--data-root",)) -> list[str]:
    """`argv` without the options in `drop` and their values, in either spelling
    (`--data-root X`, `--data-root=X`): what is this machine's, not the result's (where the
    data lie, where output goes)."""
    shown, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in drop:
            skip = True
        elif not a.startswith(tuple(f"{d}=" for d in drop)):
            shown.append(a)
    return shown


def rerun_command(module: str, argv: list[str], drop: tuple[str, ...] = ("--data-root",)) -> str:
    """The command others rerun a result with: `python -m <module>` and `argv` less `drop`."""
    import shlex

    return " ".join(["python -m", module, *map(shlex.quote, without_options(argv, drop))])


def wrap_command(command: str, width: int = 88) -> str:
    """A shell command on lines of at most ``width`` characters where it can be, broken before
    an option (``--name values``) with a backslash, so that a page shows it without scrolling
    and it still pastes into a shell as one command."""
    import shlex

    groups: list[list[str]] = [[]]
    for token in shlex.split(command):
        if token.startswith("--") and groups[-1]:
            groups.append([])
        groups[-1].append(shlex.quote(token))
    lines = [" ".join(groups[0])]
    for option in map(" ".join, groups[1:]):
        if len(lines[-1]) + 1 + len(option) <= width - 2:  # room for " \\"
            lines[-1] += " " + option
        else:
            lines.append("    " + option)
    return " \\\n".join(lines)


class Tee(io.StringIO):
    """Keeps what is written (``getvalue()``, for a saved copy) and passes it on to `stream`
    at once, so that a run cut short still shows what it printed."""

    def __init__(self, stream):
        super().__init__()
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(text)
        self._stream.flush()
        return super().write(text)


@contextlib.contextmanager
def printed_and_saved(module: str, argv: list[str], save, folder):
    """Runs the block with its output printed as it comes, after the line ``$ <the command>``
    (`module` and `argv`, without ``--save``); with `save`, the whole output is also written to
    ``folder/<save>.txt`` (a benchmark's saved run, which the docs render)."""
    if save is not None and (not save or os.path.basename(save) != save or save[0] == "."):
        raise SystemExit(f"--save {save!r}: give a name, not a path (the file goes to {folder})")
    buffer = Tee(sys.stdout)
    with contextlib.redirect_stdout(buffer):
        print("$ " + rerun_command(module, argv, ("--save",)))
        yield
    if save:
        (folder / f"{save}.txt").write_text(buffer.getvalue())


def default_data_root() -> str:
    """``$AVALANCHE_SI_DATA`` if set, else ``./data``."""
    return os.environ.get(DATA_ENV, "data")


def si_importance(cfg):
    """SIPlugin's `importance=` for a run config: the name, or SOS with its α where one is
    set (the estimator loads torch: imported when called)."""
    if cfg.si_importance == "sos" and cfg.sos_alpha:
        from avalanche_si.estimators import SOS

        return SOS(alpha=cfg.sos_alpha)
    return cfg.si_importance
