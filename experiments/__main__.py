import sys
import warnings

warnings.filterwarnings("ignore")  # avalanche's import-time notices (no QP solver, ...)

from .cli import main  # noqa: E402

sys.exit(main())
