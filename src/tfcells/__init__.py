"""tfcells: fused LSTM, GRU and SimpleRNN kernels for TensorFlow 2 / Keras 3.

The backward pass of every op computes only the gradients that are needed: a frozen matrix,
an input that needs no gradient or an initial state that is a constant costs no work.
"""

# Before TensorFlow is imported: when this process is the benchmark suite (tfcells-bench,
# python -m tfcells.benchmarks), quiet the start-up notices TensorFlow prints as it imports.
from .benchmarks import quiet_if_benchmark as _quiet_if_benchmark

_quiet_if_benchmark()

try:
    import tensorflow as _tensorflow  # noqa: F401
except ImportError as _error:
    # A GPU machine with PyTorch but no TensorFlow can still run the compiled kernel modules
    # (tfcells._tfcells_core, tfcells._tfcells_cuda) and `python -m benchmarks --device gpu`;
    # everything else says why it is missing.
    _NO_TENSORFLOW = str(_error)

    def __getattr__(name):
        raise ImportError(f"tfcells.{name} needs TensorFlow, which does not import here "
                          f"({_NO_TENSORFLOW}); install requirements.txt")
else:
    from ._tensorflow_api import *  # noqa: F401,F403
    from ._tensorflow_api import __all__, __version__  # noqa: F401
