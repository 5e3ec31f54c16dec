import sys

# TensorFlow was quieted by tfcells' __init__, before it imported TensorFlow
# (benchmarks.quiet_if_benchmark).
from .cli import main

if __name__ == "__main__":
    sys.exit(main())
