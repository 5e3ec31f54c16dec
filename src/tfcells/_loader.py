"""Finds and loads the compiled op library, refusing a TensorFlow it was not built for."""

import ctypes
import os
import warnings

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
c_library.tfcells_work_counters.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int]
c_library.tfcells_set_gemm_threads.argtypes = [ctypes.c_int]
c_library.tfcells_gemm_threads.restype = ctypes.c_int
c_library.tfcells_set_split_units.argtypes = [ctypes.c_int]
c_library.tfcells_split_units.restype = ctypes.c_int
c_library.tfcells_set_pin_shards.argtypes = [ctypes.c_int]
c_library.tfcells_pin_shards.restype = ctypes.c_int
c_library.tfcells_set_row_copies.argtypes = [ctypes.c_int]
c_library.tfcells_row_copies.restype = ctypes.c_int
c_library.tfcells_cpu_isa.restype = ctypes.c_char_p
c_library.tfcells_cpu_isa_error.restype = ctypes.c_char_p
# The op library links its own copy of the core, which chose its level when it loaded.
if c_library.tfcells_cpu_isa().decode() != CPU_ISA:
    raise ImportError(
        f"tfcells' op library chose CPU level {c_library.tfcells_cpu_isa().decode()!r} "
        f"({c_library.tfcells_cpu_isa_error().decode()}), its NumPy module {CPU_ISA!r}: was "
        "TFCELLS_CPU_ISA changed while tfcells was importing?")

# GPU kernels live in their own library (the ops are registered by the CPU one). Loaded only into
# a CUDA build of TensorFlow (tensorflow-cpu has no GPU device to run them on), of the CUDA major
# version tfcells was compiled with, and, until the TensorFlow ops have run on a GPU, only on
# request: TFCELLS_GPU_KERNELS=1 in the environment when tfcells is imported. (The CUDA kernels
# passed on an H200 through the pybind11 module; the TensorFlow kernel wrapper, its allocator and
# stream, has not run: no TensorFlow on that machine.) Without them a tfcells layer on a GPU runs
# Keras' own implementation (layers.py asks gpu_fallback_reason()).
GPU_KERNELS_ENV = "TFCELLS_GPU_KERNELS"


def gpu_kernels_reason(opted_in, tf_cuda_build, tf_cuda_version, built_cuda, built_cuda_version,
                       library_exists):
    """Why tfcells' GPU kernels are not to be loaded (None: load them)."""
    if not tf_cuda_build:
        return "TensorFlow is not a CUDA build"
    if not built_cuda or not library_exists:
        return ("this tfcells build has no CUDA kernels (it was built where nvcc was not found, "
                "or beside a TensorFlow of another CUDA major version); rebuild it with the "
                "nvcc of TensorFlow's CUDA version on the PATH")
    if not opted_in:
        return (f"tfcells' TensorFlow GPU kernels have not yet run inside TensorFlow on a GPU "
                f"(their CUDA kernels have, through tfcells._tfcells_cuda) and are opt-in: set "
                f"{GPU_KERNELS_ENV}=1 in the environment before importing tfcells to run them")
    tf_major = str(tf_cuda_version).split(".")[0]
    ours = str(built_cuda_version).split(".")[0]
    if tf_major and ours and tf_major != ours:
        return (f"tfcells' CUDA kernels were compiled with CUDA {built_cuda_version} but "
                f"TensorFlow uses CUDA {tf_cuda_version}; rebuild tfcells with CUDA "
                f"{tf_major}'s nvcc")
    return None


gpu_kernels_unavailable = gpu_kernels_reason(
    opted_in=os.environ.get(GPU_KERNELS_ENV) == "1",
    tf_cuda_build=tf.test.is_built_with_cuda(),
    tf_cuda_version=tf.sysconfig.get_build_info().get("cuda_version", ""),
    built_cuda=_build_info.CUDA,
    built_cuda_version=getattr(_build_info, "CUDA_VERSION", ""),
    library_exists=os.path.exists(GPU_OPS_LIBRARY_PATH))
gpu_c_library = None
if gpu_kernels_unavailable is None:
    tf.load_op_library(GPU_OPS_LIBRARY_PATH)
    gpu_c_library = ctypes.CDLL(GPU_OPS_LIBRARY_PATH)
    gpu_c_library.tfcells_gpu_work_counters.argtypes = [ctypes.POINTER(ctypes.c_int64),
                                                        ctypes.c_int]
    gpu_c_library.tfcells_gpu_set_allow_tf32.argtypes = [ctypes.c_int]
    gpu_c_library.tfcells_gpu_allow_tf32.restype = ctypes.c_int


def _gpu_visible():
    """Whether TensorFlow has a GPU to place a layer on: Keras' own test for its cuDNN path (any
    visible GPU), without initialising TensorFlow's runtime."""
    return bool(tf.config.get_visible_devices("GPU"))


_warned = False


def gpu_fallback_reason():
    """Why a tfcells layer runs Keras' own implementation on this machine's GPU instead of the
    fused op (whose CPU kernel would otherwise run, with copies to and from the GPU), or None:
    no GPU is visible, or tfcells' GPU kernels are loaded. Warns once per process."""
    global _warned
    if gpu_kernels_unavailable is None or not _gpu_visible():
        return None
    reason = f"a GPU is visible but {gpu_kernels_unavailable}"
    if not _warned:
        _warned = True
        warnings.warn(f"tfcells: {reason}. Until then tfcells layers run Keras' own "
                      "implementation (cuDNN where Keras uses it) on the GPU.", stacklevel=3)
    return reason
