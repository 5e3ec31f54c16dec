"""Finds and loads the compiled op library, refusing a TensorFlow it was not built for."""

import ctypes
import os

import tensorflow as tf

from . import _build_info

# The compiled files sit beside the generated _build_info.py (in an editable install that is
# not this source directory).
OPS_LIBRARY_PATH = os.path.join(os.path.dirname(os.path.abspath(_build_info.__file__)),
                                "_tfcells_ops.so")

REBUILD_HINT = (
    "Rebuild tfcells against the installed TensorFlow: "
    "pip install --no-build-isolation --force-reinstall --no-deps <path to tfcells>"
)


def _check_tensorflow_version():
    built, running = _build_info.TENSORFLOW_VERSION, tf.__version__
    if built != running:
        raise ImportError(
            f"tfcells was built against TensorFlow {built}, but TensorFlow {running} is "
            f"installed; its custom ops would not load safely. {REBUILD_HINT}"
        )


_check_tensorflow_version()
ops_module = tf.load_op_library(OPS_LIBRARY_PATH)
# The same library, for the few plain C functions it exports (work counters, thread control).
c_library = ctypes.CDLL(OPS_LIBRARY_PATH)
c_library.tfcells_work_counters.argtypes = [ctypes.POINTER(ctypes.c_int64)]
c_library.tfcells_set_gemm_threads.argtypes = [ctypes.c_int]
c_library.tfcells_gemm_threads.restype = ctypes.c_int
