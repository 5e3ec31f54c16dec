#!/usr/bin/env python
"""Moved into the benchmark suite (tfcells.benchmarks.gpu): this runs `python -m benchmarks
--device gpu` with the given arguments."""
import sys

from tfcells.benchmarks.cli import main

sys.exit(main(["--device", "gpu", *sys.argv[1:]]))
