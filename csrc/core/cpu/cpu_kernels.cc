// The CPU kernels of one ISA level: compiled once per level with -DTFCELLS_ISA=<namespace> and
// that level's flags (cmake/cpu_levels.cmake). Nothing here may run at load (no static
// initialisers: the build refuses them), and nothing outside the level's namespace is defined
// here but CpuKernelsOf_<namespace>().
#include <cblas.h>

#include <algorithm>

#include "cpu_backend.h"
#include "cpu_dispatch.h"

namespace tfcells {
TFCELLS_ISA_BEGIN
namespace {

CBLAS_TRANSPOSE Op(bool trans) { return trans ? CblasTrans : CblasNoTrans; }

void Blas(bool ta, bool tb, Index m, Index n, Index k, const float* a, Index lda,
          const float* b, Index ldb, float beta, float* c, Index ldc) {
  scipy_cblas_sgemm(CblasRowMajor, Op(ta), Op(tb), m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
}
void Blas(bool ta, bool tb, Index m, Index n, Index k, const double* a, Index lda,
          const double* b, Index ldb, double beta, double* c, Index ldc) {
  scipy_cblas_dgemm(CblasRowMajor, Op(ta), Op(tb), m, n, k, 1.0, a, lda, b, ldb, beta, c, ldc);
}

template <typename T>
void SplitGemm(CpuBackend& be, bool ta, bool tb, Index m, Index n, Index k, const T* a,
               Index lda, const T* b, Index ldb, T beta, T* c, Index ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // BLAS rejects k == 0 (its leading dimensions would be 0): C = beta * C
    for (Index i = 0; i < m; ++i)
      for (Index j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (be.bf16_gemms) {
#if TFCELLS_AMX_TILES
      using Tiles = step_gemm::AmxTiles;
#else
      using Tiles = step_gemm::VectorPairs;
#endif
      return be.PairGemm<Tiles>(ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc);
    }
  }
  int tasks = be.GemmTasks(2.0 * m * n * k, be.max_tasks);
  // Split the larger side of C into contiguous blocks, one per task.
  const bool by_rows = m >= n;
  const Index extent = by_rows ? m : n;
  const Index align = by_rows ? cpu_tuning::kSplitRowAlign : cpu_tuning::kSplitColAlign;
  const Index block = CpuBackend::AlignedBlocks(extent, align, &tasks);
  if (tasks <= 1) {
    Blas(ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  (*be.runner)(tasks, [&](int task) {
    const Index begin = task * block, size = std::min(block, extent - begin);
    if (by_rows)  // rows of C are rows of op(A)
      Blas(ta, tb, size, n, k, ta ? a + begin : a + begin * lda, lda, b, ldb, beta,
           c + begin * ldc, ldc);
    else  // columns of C are columns of op(B)
      Blas(ta, tb, m, size, k, a, lda, tb ? b + begin * ldb : b + begin, ldb, beta, c + begin,
           ldc);
  });
}

template <typename S>
CpuBackend MakeBackend(const CpuOptions& options) {
  CpuBackend be;
  be.runner = options.runner;
  be.max_tasks = options.max_tasks;
  be.l2_cache_bytes = options.l2_cache_bytes;
  be.split_units = options.split_units;
  be.pin_shards = options.pin_shards;
  if (options.min_parallel_elements > 0) be.min_parallel_elements = options.min_parallel_elements;
  be.row_copies = CpuBackend::ResolveRowCopies(options.row_copies);
  // kAuto arrives resolved (CpuRunOptions).
  be.bf16_products =
      std::is_same_v<S, bfloat16> && options.products == StepProducts::kBFloat16;
  be.bf16_gemms = be.bf16_products;
  return be;
}

template <typename T, typename S>
void RunForward(const ForwardArgs<T, S>& args, const CpuOptions& options) {
  CpuBackend be = MakeBackend<S>(options);
  Forward(be, args);
}
template <typename T, typename S>
void RunBackward(const BackwardArgs<T, S>& args, const CpuOptions& options) {
  CpuBackend be = MakeBackend<S>(options);
  Backward(be, args);
}

}  // namespace

void CpuBackend::Gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, const float* a,
                      Index lda, const float* b, Index ldb, float beta, float* c, Index ldc) {
  SplitGemm(*this, trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

void CpuBackend::Gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, const double* a,
                      Index lda, const double* b, Index ldb, double beta, double* c,
                      Index ldc) {
  SplitGemm(*this, trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

void CpuBackend::CallingThreadGemm(bool trans_a, bool trans_b, Index m, Index n, Index k,
                                   const float* a, Index lda, const float* b, Index ldb,
                                   float beta, float* c, Index ldc) {
  Blas(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc);
}
void CpuBackend::CallingThreadGemm(bool trans_a, bool trans_b, Index m, Index n, Index k,
                                   const double* a, Index lda, const double* b, Index ldb,
                                   double beta, double* c, Index ldc) {
  Blas(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

TFCELLS_ISA_END

const CpuKernels& TFCELLS_LEVEL_NAME(CpuKernelsOf_, TFCELLS_ISA)() {
  static constexpr CpuKernels kKernels = {
      &RunForward<float, float>,   &RunForward<double, double>,
      &RunForward<float, bfloat16>, &RunForward<float, float16>,
      &RunBackward<float, float>,  &RunBackward<double, double>,
      &RunBackward<float, bfloat16>, &RunBackward<float, float16>,
      step_gemm::kNativeBf16Dot, step_gemm::kAmxTiles};
  return kKernels;
}

}  // namespace tfcells
