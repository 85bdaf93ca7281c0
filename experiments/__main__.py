import sys

try:
    import warnings

    warnings.filterwarnings("ignore")  # avalanche's import-time notices (no QP solver, ...)

    from .cli import main

    sys.exit(main())
except KeyboardInterrupt:  # Ctrl-C before main() took over: one line, not a traceback
    print("\ninterrupted.", file=sys.stderr, flush=True)
    sys.exit(130)
