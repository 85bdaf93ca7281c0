import os
import signal
import sys


def _interrupted_again(signum, frame):  # a second Ctrl-C while the first one winds down
    os._exit(130)


def _first_interrupt(signum, frame):
    signal.signal(signal.SIGINT, _interrupted_again)
    raise KeyboardInterrupt


def _after_the_end(signum, frame):  # Ctrl-C while Python shuts down (atexit, wandb, torch)
    os.write(2, b"\ninterrupted.\n")
    os._exit(130)


# Ctrl-C ends with one line at any moment: the first one is a KeyboardInterrupt that the
# command turns into its one line; a second, or one after the command is done, exits at once.
signal.signal(signal.SIGINT, _first_interrupt)
try:
    import warnings

    warnings.filterwarnings("ignore")  # avalanche's import-time notices (no QP solver, ...)

    from .cli import main

    code = main()
    if signal.getsignal(signal.SIGINT) is _first_interrupt:
        signal.signal(signal.SIGINT, _after_the_end)
except KeyboardInterrupt:  # Ctrl-C outside main()'s own handling: one line, not a traceback
    signal.signal(signal.SIGINT, _interrupted_again)
    print("\ninterrupted.", file=sys.stderr, flush=True)
    code = 130
# (once Python's shutdown has reset the handlers, a Ctrl-C ends the process without a word)
sys.exit(code)
