"""Finds and loads the compiled op library, refusing a TensorFlow it was not built for."""

import ctypes
import os

import tensorflow as tf

from . import _build_info

# The compiled files sit beside the generated _build_info.py (in an editable install that is
# not this source directory).
_LIBRARY_DIR = os.path.dirname(os.path.abspath(_build_info.__file__))
OPS_LIBRARY_PATH = os.path.join(_LIBRARY_DIR, "_tfcells_ops.so")
GPU_OPS_LIBRARY_PATH = os.path.join(_LIBRARY_DIR, "_tfcells_gpu_ops.so")

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


def _check_cpu_isa():
    """The CPU kernels' ISA level, chosen when the core loads (TFCELLS_CPU_ISA caps it); a bad
    TFCELLS_CPU_ISA fails the import with the valid choices."""
    from . import _tfcells_core
    try:
        return _tfcells_core.cpu_isa()
    except ValueError as error:
        raise ImportError(str(error)) from None


CPU_ISA = _check_cpu_isa()
_check_tensorflow_version()
ops_module = tf.load_op_library(OPS_LIBRARY_PATH)
# The same library, for the few plain C functions it exports (work counters, thread control).
c_library = ctypes.CDLL(OPS_LIBRARY_PATH)
c_library.tfcells_work_counters.argtypes = [ctypes.POINTER(ctypes.c_int64)]
c_library.tfcells_set_gemm_threads.argtypes = [ctypes.c_int]
c_library.tfcells_gemm_threads.restype = ctypes.c_int
c_library.tfcells_cpu_isa.restype = ctypes.c_char_p
c_library.tfcells_cpu_isa_error.restype = ctypes.c_char_p
# The op library links its own copy of the core, which chose its level when it loaded.
if c_library.tfcells_cpu_isa().decode() != CPU_ISA:
    raise ImportError(
        f"tfcells' op library chose CPU level {c_library.tfcells_cpu_isa().decode()!r} "
        f"({c_library.tfcells_cpu_isa_error().decode()}), its NumPy module {CPU_ISA!r}: was "
        "TFCELLS_CPU_ISA changed while tfcells was importing?")

# GPU kernels live in their own library (the ops are registered by the CPU one). Loaded only
# into a CUDA build of TensorFlow: tensorflow-cpu has no GPU device to run them on.
gpu_c_library = None
if _build_info.CUDA and tf.test.is_built_with_cuda() and os.path.exists(GPU_OPS_LIBRARY_PATH):
    tf.load_op_library(GPU_OPS_LIBRARY_PATH)
    gpu_c_library = ctypes.CDLL(GPU_OPS_LIBRARY_PATH)
    gpu_c_library.tfcells_gpu_work_counters.argtypes = [ctypes.POINTER(ctypes.c_int64)]
    gpu_c_library.tfcells_gpu_set_allow_tf32.argtypes = [ctypes.c_int]
    gpu_c_library.tfcells_gpu_allow_tf32.restype = ctypes.c_int
