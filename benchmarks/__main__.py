"""`python -m benchmarks` from the repository root: the suite lives in tfcells.benchmarks so
that it installs with the package (console script `tfcells-bench`)."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tfcells.benchmarks.cli import main  # noqa: E402

sys.exit(main())
