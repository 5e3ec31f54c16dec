// CUDA backend of the recurrence driver (csrc/core/rnn.h): cuBLAS GEMMs and one templated
// grid-stride kernel that runs csrc/core/cells.h' functors. No cell math lives here.
//
// Errors are latched: the first failed launch or cuBLAS call records a message, and every
// later call of the backend returns at once, so the driver's loop runs out without enqueuing
// more work. The entry points (cuda_rnn.h) hand the message to their caller.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <string>
#include <type_traits>

#include "../core/rnn.h"
#include "constants.h"
#include "cublas_loader.h"
#include "cuda_rnn.h"
#include "gemm_mapping.h"

namespace tfcells {
namespace cuda_detail {

using cuda_constants::kMax32BitElements;
using cuda_constants::kMaxPointwiseBlocks;
using cuda_constants::kPointwiseThreads;
using cuda_constants::kSumCols;
using cuda_constants::kSumRowLanes;

// functor(b, j) for every b < rows, j < cols, j fastest (consecutive threads, consecutive j).
template <typename F>
__global__ void __launch_bounds__(kPointwiseThreads)
    ForEachKernel(Index rows, Index cols, F f) {
  const Index n = rows * cols;
  if (static_cast<unsigned long long>(n) <= kMax32BitElements) {  // 32-bit index arithmetic
    const unsigned n32 = static_cast<unsigned>(n), cols32 = static_cast<unsigned>(cols);
    const unsigned stride = gridDim.x * blockDim.x;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n32; i += stride) {
      const unsigned b = i / cols32;
      f(Index(b), Index(i - b * cols32));
    }
  } else {
    const Index stride = Index(gridDim.x) * blockDim.x;
    for (Index i = Index(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
      const Index b = i / cols;
      f(b, i - b * cols);
    }
  }
}

// out[j] = Σ_r a[r, j]: a block owns kSumCols columns, its kSumRowLanes warps' lanes stride
// over the rows (coalesced reads), then a column's partial sums are added in shared memory.
// Deterministic, no atomics, one write per column.

template <typename T>
__global__ void __launch_bounds__(kSumCols* kSumRowLanes)
    ColumnSumKernel(Index rows, Index cols, const T* a, Index lda, T* out) {
  __shared__ T partial[kSumRowLanes][kSumCols];
  const Index j = Index(blockIdx.x) * kSumCols + threadIdx.x;
  T sum = T(0);
  if (j < cols)
    for (Index r = threadIdx.y; r < rows; r += kSumRowLanes) sum += a[r * lda + j];
  partial[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && j < cols) {
    T total = T(0);
    for (int y = 0; y < kSumRowLanes; ++y) total += partial[y][threadIdx.x];
    out[j] = total;
  }
}

// The `true` that stands for "no mask" (the driver reads it with a leading dimension of 0).
static __device__ bool kTrueFlag = true;

// C = beta * C for an [m, n] matrix: a GEMM with k == 0, which cuBLAS is not given.
template <typename T>
struct ScalePoint {
  StepMatrix<T> c;
  T beta;
  TFCELLS_HD void operator()(Index b, Index j) const {
    c(b, j) = beta == T(0) ? T(0) : beta * c(b, j);
  }
};

}  // namespace cuda_detail

class CudaBackend : public InPlaceStepOperands<CudaBackend> {
 public:
  static constexpr InputProjection kInputProjection = kCudaInputProjection;

  // products: what float32 GEMMs multiply (gemm_mapping.h's ProductsFor); float64 GEMMs
  // always multiply in float64.
  CudaBackend(cudaStream_t stream, const CudaOptions& options, GpuProducts products)
      : stream_(stream), options_(options), products_(products) {
    api_ = cublas::Load(&error_);
    if (api_ == nullptr) return;
    int device = 0;
    if (!Check(cudaGetDevice(&device), "cudaGetDevice")) return;
    handle_ = cublas::ThreadHandle(*api_, device, stream_, &error_);
    if (handle_ == nullptr) return;
    // Once per call, in this order: cublasSetStream resets the workspace to cuBLAS' own.
    if (!CheckBlas(api_->set_stream(handle_, stream_), "cublasSetStream")) return;
    if (options_.blas_workspace != nullptr &&
        !CheckBlas(api_->set_workspace(handle_, options_.blas_workspace,
                                       options_.blas_workspace_bytes),
                   "cublasSetWorkspace"))
      return;
    // Read by cublasSgemm only; 16-bit products name their compute type in each call.
    const bool tf32 = products_ == GpuProducts::kTf32;
    if (!CheckBlas(api_->set_math_mode(handle_, tf32 ? cublas::kTf32TensorOpMath
                                                     : cublas::kDefaultMath),
                   "cublasSetMathMode"))
      return;
    void* flag = nullptr;
    if (Check(cudaGetSymbolAddress(&flag, cuda_detail::kTrueFlag), "cudaGetSymbolAddress"))
      true_flag_ = static_cast<const bool*>(flag);
  }

  const std::string& error() const { return error_; }
  bool failed() const { return !error_.empty(); }

  void Gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, const float* a, Index lda,
            const float* b, Index ldb, float beta, float* c, Index ldc) {
    GemmImpl(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc);
  }
  void Gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, const double* a, Index lda,
            const double* b, Index ldb, double beta, double* c, Index ldc) {
    GemmImpl(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc);
  }

  // The dropout weight gradients: each gate's masked operand written out whole, then one GEMM.
  template <typename T, typename XRows, typename HRows>
  void MaskedGemms(Index n, Index k, const MaskedProducts<T, XRows>& x,
                   const MaskedProducts<T, HRows>& h, T* scratch) {
    MaskedGemmsByGate(*this, n, k, x, h, scratch);
  }

  // (The time loop: one shard, InPlaceStepOperands::ForShards; the GPU parallelises inside
  // each step.)

  // A `true` in device memory (of the current device), the mask row of "no mask".
  const bool* TrueFlag() const { return true_flag_; }

  template <typename F>
  void ForEach(Index rows, Index cols, const F& f) {
    if (failed() || rows <= 0 || cols <= 0) return;
    const Index blocks = std::min<Index>((rows * cols + cuda_detail::kPointwiseThreads - 1) /
                                             cuda_detail::kPointwiseThreads,
                                         cuda_detail::kMaxPointwiseBlocks);
    cuda_detail::ForEachKernel<<<static_cast<unsigned>(blocks), cuda_detail::kPointwiseThreads,
                                 0, stream_>>>(rows, cols, f);
    Check(cudaGetLastError(), "pointwise kernel launch");
  }

  template <typename T>
  void ColumnSum(Index rows, Index cols, const T* a, Index lda, T* out) {
    if (failed() || cols <= 0) return;
    const Index blocks = (cols + cuda_detail::kSumCols - 1) / cuda_detail::kSumCols;
    cuda_detail::ColumnSumKernel<T>
        <<<static_cast<unsigned>(blocks), dim3(cuda_detail::kSumCols, cuda_detail::kSumRowLanes),
           0, stream_>>>(rows, cols, a, lda, out);
    Check(cudaGetLastError(), "bias-gradient reduction launch");
  }

 private:
  bool Check(cudaError_t status, const char* what) {
    if (status == cudaSuccess) return true;
    if (error_.empty())
      error_ = std::string(what) + " failed: " + cudaGetErrorName(status) + ": " +
               cudaGetErrorString(status);
    return false;
  }

  bool CheckBlas(cublas::Status status, const char* what) {
    if (status == cublas::kSuccess) return true;
    if (error_.empty()) error_ = std::string(what) + " failed: " + cublas::StatusString(*api_, status);
    return false;
  }

  // Row-major to column-major: gemm_mapping.h.
  template <typename T>
  void GemmImpl(bool trans_a, bool trans_b, Index m, Index n, Index k, const T* a, Index lda,
                const T* b, Index ldb, T beta, T* c, Index ldc) {
    if (failed() || m <= 0 || n <= 0) return;
    if (k <= 0) {  // empty product; cuBLAS would reject the leading dimensions
      ForEach(m, n, cuda_detail::ScalePoint<T>{StepMatrix<T>(c, ldc), beta});
      return;
    }
    ColumnMajorGemm<T> g;
    const std::string bad = ToColumnMajor(trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, &g);
    if (!bad.empty()) {
      error_ = bad;
      return;
    }
    const T one = T(1);
    const int op_first = g.trans_first ? cublas::kOpT : cublas::kOpN;
    const int op_second = g.trans_second ? cublas::kOpT : cublas::kOpN;
    if constexpr (std::is_same<T, float>::value) {
      const bool bf16 = products_ == GpuProducts::kBFloat16;
      if (bf16 || products_ == GpuProducts::kFloat16) {
        // float32 in and out; cuBLAS may round the operands to 16 bits (gemm_mapping.h).
        const int compute = bf16 ? cublas::kCompute32FFast16BF : cublas::kCompute32FFast16F;
        CheckBlas(api_->gemm_ex(handle_, op_first, op_second, g.m, g.n, g.k, &one, g.first,
                                cublas::kRealFloat32, g.ld_first, g.second, cublas::kRealFloat32,
                                g.ld_second, &beta, g.c, cublas::kRealFloat32, g.ldc, compute,
                                cublas::kGemmDefault),
                  "cublasGemmEx");
        return;
      }
      CheckBlas(api_->sgemm(handle_, op_first, op_second, g.m, g.n, g.k, &one, g.first,
                            g.ld_first, g.second, g.ld_second, &beta, g.c, g.ldc),
                "cublasSgemm");
    } else {
      CheckBlas(api_->dgemm(handle_, op_first, op_second, g.m, g.n, g.k, &one, g.first,
                            g.ld_first, g.second, g.ld_second, &beta, g.c, g.ldc),
                "cublasDgemm");
    }
  }

  cudaStream_t stream_;
  CudaOptions options_;
  GpuProducts products_;
  const cublas::Api* api_ = nullptr;
  cublas::Handle handle_ = nullptr;
  const bool* true_flag_ = nullptr;
  std::string error_;
};

}  // namespace tfcells
