#include "cpu_rnn.h"

#include <cblas.h>

#include "cpu_backend.h"

namespace tfcells {

namespace {

CBLAS_TRANSPOSE Op(bool trans) { return trans ? CblasTrans : CblasNoTrans; }

// BLAS rejects k == 0 (its leading dimensions would be 0); the product is then empty.
template <typename T>
bool ScaleIfEmpty(Index m, Index n, Index k, T beta, T* c, Index ldc) {
  if (m == 0 || n == 0) return true;
  if (k > 0) return false;
  for (Index i = 0; i < m; ++i)
    for (Index j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
  return true;
}

}  // namespace

void CpuBackend::Gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, const float* a,
                      Index lda, const float* b, Index ldb, float beta, float* c, Index ldc) {
  if (ScaleIfEmpty(m, n, k, beta, c, ldc)) return;
  scipy_cblas_sgemm(CblasRowMajor, Op(trans_a), Op(trans_b), m, n, k, 1.0f, a, lda, b, ldb,
                    beta, c, ldc);
}

void CpuBackend::Gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, const double* a,
                      Index lda, const double* b, Index ldb, double beta, double* c,
                      Index ldc) {
  if (ScaleIfEmpty(m, n, k, beta, c, ldc)) return;
  scipy_cblas_dgemm(CblasRowMajor, Op(trans_a), Op(trans_b), m, n, k, 1.0, a, lda, b, ldb, beta,
                    c, ldc);
}

void ForwardCpu(const ForwardArgs<float>& args) {
  CpuBackend be;
  Forward(be, args);
}
void ForwardCpu(const ForwardArgs<double>& args) {
  CpuBackend be;
  Forward(be, args);
}
void BackwardCpu(const BackwardArgs<float>& args) {
  CpuBackend be;
  Backward(be, args);
}
void BackwardCpu(const BackwardArgs<double>& args) {
  CpuBackend be;
  Backward(be, args);
}

void SetCpuGemmThreads(int threads) {
  scipy_openblas_set_num_threads(threads > 0 ? threads : 0);
}
int CpuGemmThreads() { return scipy_openblas_get_num_threads(); }

}  // namespace tfcells
