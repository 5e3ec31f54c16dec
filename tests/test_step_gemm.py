"""The CPU backend's packed step GEMM, through the entry point the benchmark's GEMM floor uses
(every op test also runs it inside the recurrences)."""

import numpy as np
import pytest

from tfcells import _tfcells_core as core
from tfcells.benchmarks import floor


# Shapes around the micro-kernel's blocking: rows below, at and past one block (12 on AVX-512,
# 6 otherwise), columns short of, at and past one panel (16..32), k = 1.
SHAPES = [(1, 1, 1, 1), (3, 5, 7, 9), (2, 13, 1, 33), (4, 64, 256, 96), (2, 25, 40, 31)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("count,m,k,n", SHAPES)
@pytest.mark.parametrize("threads", [1, 3])
def test_step_products_match_numpy(dtype, count, m, k, n, threads):
    rng = np.random.default_rng(count * 1000 + m)
    a = rng.standard_normal((count, m, k)).astype(dtype)
    w = rng.standard_normal((k, n)).astype(dtype)
    out = np.full((m, n), np.nan, dtype)  # every element must be written
    core.step_products(a, w, out, threads)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, a[-1] @ w, rtol=tol, atol=tol * np.sqrt(k))


def test_step_products_rejects_mismatched_shapes():
    a = np.zeros((2, 4, 5), np.float32)
    with pytest.raises(ValueError, match="step_products"):
        core.step_products(a, np.zeros((6, 3), np.float32), np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="step_products"):
        core.step_products(a, np.zeros((5, 3), np.float32), np.zeros((4, 2), np.float32))


def test_floor_candidates_compute_the_same_products():
    """The floor times the faster of two implementations of each per-step group: both must do
    the same work (here: the same last product, the one left in the output)."""
    g = floor.Gemm("h·W_h", m=20, k=24, n=72, count=5)
    a, b, c = floor._operands(g, np.float32, np.random.default_rng(1))
    floor._numpy_products(a, b, c)()
    expected = c.copy()
    c[:] = np.nan
    floor._step_products(a, b, c)()
    np.testing.assert_allclose(c, expected, rtol=1e-5, atol=1e-5)
