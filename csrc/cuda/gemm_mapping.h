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
#include "../core/plan.h"

namespace tfcells {

// What the tensor cores multiply in a float32 GEMM of the CUDA backend (accumulation is
// float32 in every case; cuBLAS rounds the operands on their way in).
enum class GpuProducts { kFloat32, kTf32, kBFloat16, kFloat16 };

// A call with 16-bit storage has accepted that precision: its GEMMs let cuBLAS round the float32
// operands to its own 16-bit type (CUBLAS_COMPUTE_32F_FAST_16F / 16BF), and cuBLAS picks the
// kernel: for the step products on an H200 it picked TF32 tensor-core kernels on the float32
// operands (tools/gpu_profile.py, 2026-12-04), no less precise than 16-bit ones. Other float32
// calls multiply in float32, or in TF32 where the caller allows it. float16's range is the
// float16 contract of mixed precision: an operand beyond 65504 becomes inf, as in any float16
// GEMM, which a loss-scaling optimizer detects and skips.
inline GpuProducts ProductsFor(Storage storage, bool allow_tf32) {
  switch (storage) {
    case Storage::kBFloat16: return GpuProducts::kBFloat16;
    case Storage::kFloat16: return GpuProducts::kFloat16;
    case Storage::kCompute: break;
  }
  return allow_tf32 ? GpuProducts::kTf32 : GpuProducts::kFloat32;
}

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
