// The per-step recurrent GEMM of the CPU backend: C[m, n] = A[m, k] · op(W) + βC, where op(W)
// (the recurrent kernel or its transpose) is the same for every step of a sequence.
//
// A BLAS call packs W into its panel layout again at every step, and at the recurrence's skinny
// shapes (m = batch rows = 8..256) that packing and its poor register blocking cost more than the
// arithmetic: OpenBLAS reaches 48-98 GFLOP/s per core at these shapes on the project's AVX-512
// machine against 103-112 for the kernel below (measured at m = 8..256, k = 256..4096). So W
// is packed once per sequence into column panels, and each step runs a register-blocked
// micro-kernel over them: kRows rows of A against one panel of two vector widths of columns.
// Each element of C is one multiply-add chain over k in order, whatever the blocking, row
// split or column split: results do not depend on how the work is divided between threads.
#pragma once

#include <algorithm>
#include <cstring>
#include <memory>

#include "../common.h"

namespace tfcells {
TFCELLS_ISA_BEGIN
namespace step_gemm {

// Vector width of the target (GCC/Clang vector extensions compile to it) and the rows per
// micro-kernel: 2 * kRows accumulators plus three operands must fit the register file.
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64, kRows = 12;  // 32 zmm registers
#elif defined(__AVX__)
constexpr int kVectorBytes = 32, kRows = 6;  // 16 ymm registers
#else
constexpr int kVectorBytes = 16, kRows = 6;  // 16 xmm registers
#endif

template <typename T>
struct Vector {
  typedef T type __attribute__((vector_size(kVectorBytes)));
};
template <typename T>
constexpr Index kLanes = kVectorBytes / sizeof(T);
template <typename T>
constexpr Index kPanelCols = 2 * kLanes<T>;

template <typename T>
typename Vector<T>::type Load(const T* p) {
  typename Vector<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
void Store(T* p, const typename Vector<T>::type& v) {
  std::memcpy(p, &v, sizeof(v));
}

// C[ROWS, cols] = A[ROWS, k] · panel[k, kPanelCols] + βC, for cols <= kPanelCols.
template <typename T, int ROWS>
void MicroKernel(Index k, const T* a, Index lda, const T* panel, T beta, T* c, Index ldc,
                 Index cols) {
  using V = typename Vector<T>::type;
  constexpr Index L = kLanes<T>;
  V acc_lo[ROWS], acc_hi[ROWS];
  for (int r = 0; r < ROWS; ++r) acc_lo[r] = acc_hi[r] = V{};
  for (Index kk = 0; kk < k; ++kk) {
    const V b_lo = Load(panel + kk * 2 * L), b_hi = Load(panel + kk * 2 * L + L);
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
      const T a_rk = a[r * lda + kk];
      acc_lo[r] += a_rk * b_lo;
      acc_hi[r] += a_rk * b_hi;
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    T* c_row = c + r * ldc;
    if (cols == 2 * L) {
      if (beta != T(0)) {  // β = 0 never reads C: it may hold garbage or NaN
        acc_lo[r] += beta * Load(c_row);
        acc_hi[r] += beta * Load(c_row + L);
      }
      Store(c_row, acc_lo[r]);
      Store(c_row + L, acc_hi[r]);
    } else {  // the last, partial panel
      T row[2 * L];
      Store(row, acc_lo[r]);
      Store(row + L, acc_hi[r]);
      for (Index j = 0; j < cols; ++j)
        c_row[j] = beta != T(0) ? row[j] + beta * c_row[j] : row[j];
    }
  }
}

// MicroKernel for a block of 1..MAX_ROWS rows: one kernel instance per height.
template <typename T, int MAX_ROWS>
void Rows(Index rows, Index k, const T* a, Index lda, const T* panel, T beta, T* c, Index ldc,
          Index cols) {
  if constexpr (MAX_ROWS > 1) {
    if (rows < MAX_ROWS) return Rows<T, MAX_ROWS - 1>(rows, k, a, lda, panel, beta, c, ldc, cols);
  }
  MicroKernel<T, MAX_ROWS>(k, a, lda, panel, beta, c, ldc, cols);
}

}  // namespace step_gemm

// op(W) [k, n] packed once: panel p holds columns [p*P, p*P + P) (P = kPanelCols, zero-padded
// past n), row after row.
template <typename T>
class PackedOperand {
 public:
  static constexpr Index kPanelCols = step_gemm::kPanelCols<T>;

  PackedOperand() = default;
  // op(W) = W [k, n] (trans false) or Wᵀ with W [n, k] (trans true); ld: W's row stride.
  PackedOperand(bool trans, Index k, Index n, const T* w, Index ld)
      : k_(k), n_(n), panels_(new T[Panels() * k * kPanelCols]) {
    for (Index p = 0; p < Panels(); ++p) {
      T* dst = panels_.get() + p * k * kPanelCols;
      const Index c0 = p * kPanelCols, cols = std::min(kPanelCols, n - c0);
      if (cols < kPanelCols) std::fill(dst, dst + k * kPanelCols, T(0));
      if (trans) {  // column c0 + c of Wᵀ is row c0 + c of W: read W's rows contiguously
        for (Index c = 0; c < cols; ++c) {
          const T* src = w + (c0 + c) * ld;
          for (Index kk = 0; kk < k; ++kk) dst[kk * kPanelCols + c] = src[kk];
        }
      } else {
        for (Index kk = 0; kk < k; ++kk)
          std::copy(w + kk * ld + c0, w + kk * ld + c0 + cols, dst + kk * kPanelCols);
      }
    }
  }

  Index k() const { return k_; }
  Index n() const { return n_; }
  Index Panels() const { return (n_ + kPanelCols - 1) / kPanelCols; }

  // C[m, columns of panels [p0, p1)] = A[m, k] · op(W) + βC.
  void Multiply(Index m, const T* a, Index lda, T beta, T* c, Index ldc, Index p0,
                Index p1) const {
    using step_gemm::kRows;
    for (Index p = p0; p < p1; ++p) {
      const T* panel = panels_.get() + p * k_ * kPanelCols;
      const Index j = p * kPanelCols, cols = std::min(kPanelCols, n_ - j);
      // Row blocks of near-equal height (64 rows: 11,11,11,11,10,10, not 12,...,12,4): a
      // short block keeps too few accumulators busy to hide the multiply-add latency.
      const Index blocks = (m + kRows - 1) / kRows, height = m / blocks, taller = m % blocks;
      for (Index blk = 0, i = 0; blk < blocks; ++blk) {
        const Index rows = height + (blk < taller ? 1 : 0);
        step_gemm::Rows<T, kRows>(rows, k_, a + i * lda, lda, panel, beta, c + i * ldc + j, ldc,
                                  cols);
        i += rows;
      }
    }
  }

 private:
  Index k_ = 0, n_ = 0;
  std::unique_ptr<T[]> panels_;  // uninitialised: every element is written once
};

TFCELLS_ISA_END
}  // namespace tfcells
