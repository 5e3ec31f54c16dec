"""The TensorFlow side of tfcells: its ops, Keras layers and build facts."""

from . import _build_info
from ._loader import c_library as _c_library
from . import _tfcells_core
from . import ops
from .ops import lstm, gru, simple_rnn
from .layers import LSTM, GRU, SimpleRNN, LSTMCell, GRUCell, SimpleRNNCell, RNN

__version__ = _build_info.VERSION


def _gpu_kernels_reason():
    """Why tfcells' GPU kernels cannot run in this process, or None when they can."""
    import tensorflow as tf

    from . import _loader

    if not _build_info.CUDA:
        return "tfcells was built without CUDA (no nvcc at build time)"
    if not tf.test.is_built_with_cuda():
        return "this TensorFlow is not a CUDA build (tensorflow-cpu)"
    if _loader.gpu_c_library is None:  # the loader's reason (the opt-in, a CUDA version, ...)
        return _loader.gpu_kernels_unavailable or "the GPU kernel library was not loaded"
    if not tf.config.list_physical_devices("GPU"):
        return "TensorFlow sees no GPU"
    return None


def build_info():
    """How this tfcells was built and runs: versions, whether CUDA kernels were compiled ("cuda")
    and whether they can run here ("gpu_kernels_usable": a CUDA build of TensorFlow, the GPU
    library loaded, a GPU visible; else "gpu_kernels_reason" says why not), and the CPU kernels'
    ISA level: `cpu_isa` the one running (the best this machine supports, or the one the
    environment variable TFCELLS_CPU_ISA named at import), `cpu_isas` every level of this build
    this machine can run, lowest first, and `cpu_bf16_products`: whether a bfloat16 call's step
    products multiply bfloat16 pairs at that level (AVX512_BF16), or float32 values."""
    reason = _gpu_kernels_reason()
    return {
        "version": _build_info.VERSION,
        "tensorflow_version": _build_info.TENSORFLOW_VERSION,
        "cuda": _build_info.CUDA,
        "gpu_kernels_usable": reason is None,
        "gpu_kernels_reason": reason,
        "compiler": _build_info.COMPILER,
        "native_arch": _build_info.NATIVE_ARCH,
        "cpu_isa": _tfcells_core.cpu_isa(),
        "cpu_isas": _tfcells_core.cpu_isas(),
        "cpu_bf16_products": _tfcells_core.cpu_bf16_products(),
    }


def set_cpu_gemm_threads(threads):
    """Caps how many threads of TensorFlow's intra-op pool one CPU op of tfcells uses: large
    GEMMs, pointwise loops and batch shards are split across at most this many (0, the
    default: the whole pool, i.e. tf.config.threading.get_intra_op_parallelism_threads() or one
    per core; 1: single-threaded). Work too small to pay for a hand-off stays on one thread."""
    _c_library.tfcells_set_gemm_threads(int(threads))


def cpu_gemm_threads():
    """The cap set by set_cpu_gemm_threads (0: none)."""
    return _c_library.tfcells_gemm_threads()


def set_cpu_split_units(on):
    """Opt-in (default off): CPU time loops whose weights are at least twice a core's L2 split
    each step's units across the intra-op pool, whose threads then synchronise at every step by
    spinning (oneDNN's structure). Same results bit for bit. Faster for a lone large layer
    (LSTM, I=H=512: 0.96-0.98x the time on a 2-core Intel Xeon), slower where other ops run on
    the pool at the same time (a Bidirectional LSTM there: 1.4x)."""
    _c_library.tfcells_set_split_units(1 if on else 0)


def cpu_split_units():
    """Whether set_cpu_split_units is on."""
    return bool(_c_library.tfcells_split_units())


def set_cpu_pin_shards(on):
    """On by default: while a CPU op's time loop runs on several threads, each of them holds a
    CPU of its own (pinned for that loop only, its affinity mask restored afterwards). Linux had
    put two of them on one CPU while another idled, for whole calls. Off: the scheduler places
    them. Same results either way."""
    _c_library.tfcells_set_pin_shards(1 if on else 0)


def cpu_pin_shards():
    """Whether set_cpu_pin_shards is on."""
    return bool(_c_library.tfcells_pin_shards())


_ROW_COPIES = ("auto", "always", "never")  # the C API's order


def set_cpu_row_copies(mode):
    """"auto" by default: on a CPU whose L1 data cache has fewer ways than the step GEMM's
    blocks have rows (Zen 4: 8 ways, 12-row blocks), each block of a per-step product's rows is
    copied first where the rows' stride would put them in one or two L1 sets (batch-major x at
    most lengths: they would evict one another at every column). "always" and "never" are for
    comparisons. Same results bit for bit."""
    if mode not in _ROW_COPIES:
        raise ValueError(f"set_cpu_row_copies: {mode!r} is not one of {', '.join(_ROW_COPIES)}")
    _c_library.tfcells_set_row_copies(_ROW_COPIES.index(mode))


def cpu_row_copies():
    """The mode set by set_cpu_row_copies."""
    return _ROW_COPIES[_c_library.tfcells_row_copies()]


__all__ = ["ops", "lstm", "gru", "simple_rnn", "build_info", "set_cpu_gemm_threads",
           "cpu_gemm_threads", "set_cpu_split_units", "cpu_split_units", "set_cpu_pin_shards",
           "cpu_pin_shards", "set_cpu_row_copies", "cpu_row_copies", "__version__", "LSTM",
           "GRU", "SimpleRNN", "LSTMCell", "GRUCell", "SimpleRNNCell", "RNN"]
