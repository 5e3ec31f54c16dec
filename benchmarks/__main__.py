"""`python -m benchmarks` from the repository root: the suite lives in tfcells.benchmarks so
that it installs with the package (console script `tfcells-bench`). TensorFlow's start-up
notices are quieted by `import tfcells`, which sees this command line (see
tfcells.benchmarks.quiet_if_benchmark)."""

import sys

from tfcells.benchmarks.cli import main

sys.exit(main())
