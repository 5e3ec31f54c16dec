// How a row-major GEMM of the driver becomes a column-major cuBLAS call. Host-only and free of
// CUDA, so that tests can check the mapping on any machine (tests/test_cuda.py compiles
// tests/cuda_host/gemm_mapping_test.cc, which runs the whole driver through it).
//
// Row-major C[m,n] = op(A) op(B) + beta C, read column-major, is Cᵀ = op(B)ᵀ op(A)ᵀ + beta Cᵀ:
// the same buffers and leading dimensions, operands swapped, m and n swapped.
#pragma once

#include <climits>
#include <string>

#include "../core/common.h"

namespace tfcells {

template <typename T>
struct ColumnMajorGemm {
  bool trans_first, trans_second;  // op of the first and second operand
  int m, n, k;                     // column-major sizes
  const T* first;
  int ld_first;
  const T* second;
  int ld_second;
  T* c;
  int ldc;
};

// Returns "" and fills *out, or a message when a size exceeds cuBLAS' 32-bit arguments.
// Callers handle m == 0, n == 0 and k == 0 before (cuBLAS rejects such leading dimensions).
template <typename T>
std::string ToColumnMajor(bool trans_a, bool trans_b, Index m, Index n, Index k, const T* a,
                          Index lda, const T* b, Index ldb, T* c, Index ldc,
                          ColumnMajorGemm<T>* out) {
  for (Index v : {m, n, k, lda, ldb, ldc}) {
    if (v > INT_MAX)
      return "a GEMM dimension (" + std::to_string(v) +
             ") exceeds cuBLAS' 32-bit limit; split the batch or the sequence";
  }
  *out = {trans_b, trans_a, int(n), int(m), int(k), b, int(ldb), a, int(lda), c, int(ldc)};
  return "";
}

}  // namespace tfcells
