"""The GEMM floor: the time of a step's matrix products alone, all of them through NumPy's BLAS
or all through tfcells' own GEMM path (its packed step GEMM for the per-step products, its
thread-split BLAS calls for the weight gradients), whichever is faster, and the FLOP model that
counts them. tfcells' path is timed twice: with the per-step products split by its own rules
(batch shards at the benchmark's shapes, each product's weights alone fitting L2) and with their
columns split across the threads as the ops split a step's units; the faster counts.

A fused recurrent kernel spends nearly all its time in these GEMMs; the rest (gates, copies,
the framework) is overhead, so floor_ms / median_ms says how close an implementation gets to
what the hardware allows. Taking the faster path keeps the floor a floor: tfcells' GEMMs beat
NumPy's BLAS at the recurrence's skinny shapes, and a floor built from the slower one would
let a kernel look faster than its own GEMMs.
"""

import ctypes
import dataclasses
import glob
import os

import numpy as np

from .workload import GATES, trainable_names, weight_dtype


_PAIRS = "tfcells_bf16_pairs"  # tfcells' GEMM path on bfloat16 pairs (floor_callables)


@dataclasses.dataclass(frozen=True)
class Gemm:
    """count products of [m, k] x [k, n]; trans_a: the left operand is stored transposed."""

    label: str
    m: int
    k: int
    n: int
    count: int = 1
    trans_a: bool = False

    @property
    def flops(self):
        return 2 * self.m * self.k * self.n * self.count


def gemms(cell, config, shape):
    """The GEMMs of one step of `config`, layer by layer, in the order a fused kernel runs them."""
    T, B, H = shape.T, shape.B, shape.H
    gh = GATES[cell] * H
    out = []
    for layer in range(config.layers):
        n_in = shape.I if layer == 0 else H
        p = f"L{layer}:" if config.layers > 1 else ""
        # The fused kernels run x_t·W_x, h·W_h and dx_t = dG_t·W_xᵀ a step at a time (their
        # packed step GEMM is faster there than one BLAS call over all T*B rows), and the
        # weight gradients, which sum over all rows, as one GEMM each.
        out += [Gemm(p + "x·W_x", B, n_in, gh, count=T), Gemm(p + "h·W_h", B, H, gh, count=T)]
        needed = trainable_names(config, layer)
        if not needed:
            continue
        # Every training config needs dG at every step, so the dh recurrence always runs.
        out.append(Gemm(p + "dG·W_hᵀ", B, gh, H, count=T))
        if "kernel" in needed:
            out.append(Gemm(p + "dW_x=Xᵀ·dG", n_in, T * B, gh, trans_a=True))
        if "recurrent_kernel" in needed:
            out.append(Gemm(p + "dW_h=Hᵀ·dG", H, T * B, gh, trans_a=True))
        if "x" in needed:
            out.append(Gemm(p + "dx=dG·W_xᵀ", B, gh, n_in, count=T))
    return out


def flops(cell, config, shape):
    return sum(g.flops for g in gemms(cell, config, shape))


def _operands(gemm, dtype, rng):
    """Operands for one Gemm; per-step products get a distinct left operand per step."""
    shape_a = (gemm.count, gemm.k, gemm.m) if gemm.trans_a else (gemm.count, gemm.m, gemm.k)
    a = rng.standard_normal(shape_a).astype(dtype)
    if gemm.trans_a:
        a = a.transpose(0, 2, 1)  # a view: BLAS reads it transposed, as the kernels do
    b = rng.standard_normal((gemm.k, gemm.n)).astype(dtype)
    c = np.empty((gemm.m, gemm.n), dtype)
    return a, b, c


def _numpy_products(a, b, c):
    def run():
        for a_t in a:  # one BLAS call per step for the recurrence, one for the big GEMMs
            np.matmul(a_t, b, out=c)

    return run


def _tfcells_products(a, b, c, trans_a, split_units=False, bf16_pairs=False):
    """The same products through tfcells' CPU GEMM path, on as many threads as NumPy's BLAS
    uses (split_units: the per-step products' columns split across the threads, as the ops
    split a step's units, else by the ops' own rules; bf16_pairs: on bfloat16 pairs, as a
    bfloat16 call's products run where the machine has them); None where the compiled module
    is missing."""
    try:
        from tfcells import _tfcells_core
    except ImportError:
        return None
    threads = blas_threads() or os.cpu_count() or 1
    base = a.transpose(0, 2, 1) if trans_a else a  # _operands' stored (contiguous) array
    return lambda: _tfcells_core.products(base, b, c, threads, trans_a, split_units, bf16_pairs)


def _bf16_pairs_here():
    """Whether tfcells' bfloat16 calls multiply bfloat16 pairs on this machine."""
    try:
        from tfcells import _tfcells_core
    except ImportError:
        return False
    return bool(_tfcells_core.cpu_bf16_products())


def _tf_products(operands, dtype):
    """All of the step's products with TensorFlow's own `dtype` GEMMs (tf.matmul on the CPU:
    oneDNN's, or Eigen's), in one tf.function, per-step products as one batched matmul of the
    same [m, k] x [k, n] products, the big ones transposed as the kernels read them."""
    import tensorflow as tf

    with tf.device("/CPU:0"):
        pairs = [(tf.cast(tf.constant(a.transpose(0, 2, 1)[0] if g.trans_a else a), dtype),
                  tf.cast(tf.constant(b), dtype), g.trans_a) for g, (a, b, _) in operands]

    @tf.function(jit_compile=False)
    def products():
        # Returned, so that nothing is pruned.
        return [tf.matmul(a, b, transpose_a=t) for a, b, t in pairs]

    def run():
        with tf.device("/CPU:0"):
            products()

    run()  # traced (and oneDNN's kernels made) before timing
    return run


def floor_callables(cell, config, shape, dtype):
    """{GEMM path: a function that runs all of the step's GEMMs once} for NumPy's BLAS and, where
    compiled, tfcells' GEMM path, with preallocated operands. Each is timed in its own block and
    the floor is the faster: mixing the two inside one step would time each after the other's
    spinning threads (seen here: tfcells' products 2x slower right after NumPy's).

    A 16-bit dtype (mixed precision): those two paths in float32, what tfcells computes in,
    and the same products in `dtype` through TensorFlow's tf.matmul ("tf_bfloat16",
    "tf_float16"), the machine's 16-bit GEMM rate; for bfloat16, where tfcells' calls
    multiply bfloat16 pairs, its own GEMM path on pairs too ("tfcells_bf16_pairs"), so the
    floor is never slower than the products the op runs (path_dtype says which is which)."""
    rng = np.random.default_rng(0)
    compute = weight_dtype(dtype)
    operands = [(g, _operands(g, compute, rng)) for g in gemms(cell, config, shape)]
    paths = {"numpy": [_numpy_products(a, b, c) for _, (a, b, c) in operands]}
    ours_variants = [("tfcells", False, False), ("tfcells_units", True, False)]
    if dtype == "bfloat16" and _bf16_pairs_here():
        ours_variants.append((_PAIRS, False, True))
    for name, split_units, pairs in ours_variants:
        ours = [_tfcells_products(a, b, c, g.trans_a, split_units, pairs)
                for g, (a, b, c) in operands]
        if all(fn is not None for fn in ours):
            paths[name] = ours
    if dtype != compute:
        paths["tf_" + dtype] = [_tf_products(operands, dtype)]

    def sequence(fns):
        def run():
            for fn in fns:
                fn()
        return run

    return {name: sequence(fns) for name, fns in paths.items()}


def path_dtype(path, dtype):
    """The dtype of the GEMMs a floor path (a key of floor_callables) runs in a `dtype` run."""
    if path == _PAIRS:
        return "bfloat16"
    return path[len("tf_"):] if path.startswith("tf_") else weight_dtype(dtype)


# NumPy's OpenBLAS has its own thread pool; reach it through the library NumPy loaded.
_SET = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
        "openblas_set_num_threads64_", "openblas_set_num_threads")
_GET = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
        "openblas_get_num_threads64_", "openblas_get_num_threads")


def _openblas():
    libs = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libs, "*openblas*"))):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def _symbol(lib, names):
    for name in names:
        fn = getattr(lib, name, None) if lib is not None else None
        if fn is not None:
            return fn
    return None


def blas_threads(set_to=None):
    """NumPy's BLAS thread count (after setting it, when set_to is given); None if unknown."""
    lib = _openblas()
    if set_to is not None:
        setter = _symbol(lib, _SET)
        if setter is not None:
            setter(int(set_to))
    getter = _symbol(lib, _GET)
    return int(getter()) if getter is not None else None
