// CPU backend: single-threaded OpenBLAS GEMMs, large ones split across the caller's thread
// pool, and vectorised single-thread pointwise loops (O(B*H) per step against O(B*H*G*H) for
// the GEMMs).
#pragma once

#include "../common.h"
#include "cpu_rnn.h"

namespace tfcells {

struct CpuBackend {
  const ParallelRunner* runner = nullptr;
  int max_tasks = 1;

  void Gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, const float* a, Index lda,
            const float* b, Index ldb, float beta, float* c, Index ldc);
  void Gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, const double* a, Index lda,
            const double* b, Index ldb, double beta, double* c, Index ldc);

  template <typename F>
  void ForEach(Index rows, Index cols, const F& functor) {
    const F f = functor;  // a local copy: its pointers provably not clobbered by the stores
    for (Index b = 0; b < rows; ++b) {
#pragma omp simd
      for (Index j = 0; j < cols; ++j) f(b, j);
    }
  }

  const bool* TrueFlag() const {
    static const bool kTrue = true;
    return &kTrue;
  }

  template <typename T>
  void ColumnSum(Index rows, Index cols, const T* a, Index lda, T* out) {
    for (Index j = 0; j < cols; ++j) out[j] = T(0);
    for (Index r = 0; r < rows; ++r) {
      const T* row = a + r * lda;
#pragma omp simd
      for (Index j = 0; j < cols; ++j) out[j] += row[j];
    }
  }
};

}  // namespace tfcells
