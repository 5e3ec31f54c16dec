"""The CPU backend's GEMM paths (the packed step GEMM, the thread-split large GEMM) through the
entry point the benchmark's GEMM floor uses (every op test also runs them inside the ops)."""

import time

import numpy as np
import pytest

from tfcells import _tfcells_core as core
from tfcells.benchmarks import floor


# Shapes around the micro-kernel's blocking: rows below, at and past one block (12 on AVX-512,
# 6 otherwise), columns short of, at and past one panel (16..32), k = 1.
SHAPES = [(1, 1, 1, 1), (3, 5, 7, 9), (2, 13, 1, 33), (4, 64, 256, 96), (2, 25, 40, 31)]


# split_units: the columns split across the threads as the ops split a step's units (where n
# is a multiple of 32 and a step at least 1 MFLOP: (4, 64, 256, 96) in three parts).
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("count,m,k,n", SHAPES)
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("split_units", [False, True], ids=["ops_rules", "split_units"])
def test_products_match_numpy(dtype, count, m, k, n, threads, split_units):
    rng = np.random.default_rng(count * 1000 + m)
    a = rng.standard_normal((count, m, k)).astype(dtype)
    w = rng.standard_normal((k, n)).astype(dtype)
    out = np.full((m, n), np.nan, dtype)  # every element must be written
    core.products(a, w, out, threads, split_units=split_units)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, a[-1] @ w, rtol=tol, atol=tol * np.sqrt(k))


@pytest.mark.parametrize("threads", [1, 2])
def test_large_transposed_product_matches_numpy(threads):
    """count == 1 takes the split BLAS path; trans_a reads a [1, k, m] as its transpose (the
    weight gradients' Xᵀ·dG), large enough (> 4 MFLOP) to be split across the threads."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((1, 300, 70)).astype(np.float32)  # k=300, m=70
    w = rng.standard_normal((300, 130)).astype(np.float32)
    out = np.full((70, 130), np.nan, np.float32)
    core.products(a, w, out, threads, trans_a=True)
    np.testing.assert_allclose(out, a[0].T @ w, rtol=1e-4, atol=1e-4)


def _rounded_to_bfloat16(x):
    """x rounded to the nearest bfloat16 (ties to even), as float32 (finite x only)."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("count,m,k,n,trans_a", [(3, 25, 40, 31, False), (4, 64, 256, 96, False),
                                                 (1, 70, 300, 130, True)],
                         ids=["per_step", "per_step_wide", "transposed"])
def test_bf16_pair_products_round_both_operands(count, m, k, n, trans_a):
    """bf16_pairs (the floor's path for bfloat16 calls where the machine multiplies pairs) runs
    the products on bfloat16 pairs: the float64 product of the operands rounded to bfloat16,
    summed in float32, and not the float32 product (what it would give if the flag were lost)."""
    rng = np.random.default_rng(k)
    a = rng.standard_normal((count, k, m) if trans_a else (count, m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    out = np.full((m, n), np.nan, np.float32)
    core.products(a, w, out, 2, trans_a=trans_a, bf16_pairs=True)
    left = a[0].T if trans_a else a[-1]
    want = _rounded_to_bfloat16(left).astype(np.float64) @ _rounded_to_bfloat16(w)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.sqrt(k))
    assert np.abs(out - left.astype(np.float64) @ w).max() > 1e-3
    with pytest.raises(ValueError, match="bf16_pairs needs float32"):
        core.products(a.astype(np.float64), w.astype(np.float64), out.astype(np.float64),
                      trans_a=trans_a, bf16_pairs=True)


def test_products_back_to_back_on_the_warm_pool():
    """Hundreds of short calls with changing thread counts (the pool's workers are reused,
    grown, and left idle in turn; some park between calls): every result is right."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((3, 40, 16)).astype(np.float32)
    w = rng.standard_normal((16, 24)).astype(np.float32)
    want = a[-1] @ w
    for i in range(400):
        out = np.full((40, 24), np.nan, np.float32)
        core.products(a, w, out, 1 + i % 4)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
        if i % 100 == 99:
            time.sleep(0.01)  # longer than the workers spin: they park, then must wake


def test_products_rejects_mismatched_shapes():
    a = np.zeros((2, 4, 5), np.float32)
    with pytest.raises(ValueError, match="products needs"):
        core.products(a, np.zeros((6, 3), np.float32), np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="products needs"):
        core.products(a, np.zeros((5, 3), np.float32), np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match="products needs"):  # trans_a takes one product
        core.products(a, np.zeros((4, 3), np.float32), np.zeros((5, 3), np.float32),
                      trans_a=True)


@pytest.mark.parametrize("gemm", [floor.Gemm("h·W_h", m=20, k=24, n=72, count=5),
                                  floor.Gemm("dW=Xᵀ·dG", m=24, k=300, n=72, trans_a=True)],
                         ids=["per_step", "transposed"])
def test_floor_candidates_compute_the_same_products(gemm):
    """The floor times the faster of two implementations of each group: both must do the same
    work (here: the same last product, the one left in the output)."""
    a, b, c = floor._operands(gemm, np.float32, np.random.default_rng(1))
    floor._numpy_products(a, b, c)()
    expected = c.copy()
    c[:] = np.nan
    floor._tfcells_products(a, b, c, gemm.trans_a)()
    np.testing.assert_allclose(c, expected, rtol=1e-4, atol=1e-4)
