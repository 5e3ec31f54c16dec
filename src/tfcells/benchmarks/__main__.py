import os
import sys

# TensorFlow's start-up chatter would bury the table; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from .cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
