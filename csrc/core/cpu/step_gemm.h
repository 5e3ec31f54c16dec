// The per-step recurrent GEMM of the CPU backend: C[m, n] = A[m, k] · op(W) + βC, where op(W)
// (the recurrent kernel or its transpose) is the same for every step of a sequence.
//
// A BLAS call packs W into its panel layout again at every step, and at the recurrence's skinny
// shapes (m = batch rows = 8..256) that packing and its register blocking cost more than the
// arithmetic (README, "How it works", has the measurements). So W is packed once per sequence
// into column panels, and each step runs a register-blocked micro-kernel over them: ROWS rows
// of A against one panel of VECS vector widths of columns (cpu_tuning.h sets both per ISA).
// Each element of C is one multiply-add chain over k in order, whatever the blocking, row
// split or column split: results do not depend on how the work is divided between threads.
#pragma once

#include <algorithm>
#include <cstring>
#include <memory>

#include "../common.h"
#include "cpu_tuning.h"

namespace tfcells {
TFCELLS_ISA_BEGIN
namespace step_gemm {

using cpu_tuning::kVectorBytes;

template <typename T>
struct Vector {
  typedef T type __attribute__((vector_size(kVectorBytes)));
};
template <typename T>
constexpr Index kLanes = kVectorBytes / sizeof(T);
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

// C[ROWS, cols] = A[ROWS, k] · panel[k, VECS * lanes] + βC, for cols <= VECS * lanes.
template <typename T, int ROWS, int VECS>
void MicroKernel(Index k, const T* a, Index lda, const T* panel, T beta, T* c, Index ldc,
                 Index cols) {
  using V = typename Vector<T>::type;
  constexpr Index L = kLanes<T>, P = VECS * L;
  V acc[ROWS][VECS];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECS; ++v) acc[r][v] = V{};
  for (Index kk = 0; kk < k; ++kk) {
    V b[VECS];
    for (int v = 0; v < VECS; ++v) b[v] = Load(panel + kk * P + v * L);
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
      const T a_rk = a[r * lda + kk];
      for (int v = 0; v < VECS; ++v) acc[r][v] += a_rk * b[v];
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    T* c_row = c + r * ldc;
    if (cols == P) {
      for (int v = 0; v < VECS; ++v) {
        if (beta != T(0)) acc[r][v] += beta * Load(c_row + v * L);  // β = 0 never reads C
        Store(c_row + v * L, acc[r][v]);
      }
    } else {  // the last, partial panel
      T row[P];
      for (int v = 0; v < VECS; ++v) Store(row + v * L, acc[r][v]);
      for (Index j = 0; j < cols; ++j)
        c_row[j] = beta != T(0) ? row[j] + beta * c_row[j] : row[j];
    }
  }
}

// MicroKernel for a block of 1..MAX_ROWS rows: one kernel instance per height.
template <typename T, int MAX_ROWS, int VECS>
void Rows(Index rows, Index k, const T* a, Index lda, const T* panel, T beta, T* c, Index ldc,
          Index cols) {
  if constexpr (MAX_ROWS > 1) {
    if (rows < MAX_ROWS)
      return Rows<T, MAX_ROWS - 1, VECS>(rows, k, a, lda, panel, beta, c, ldc, cols);
  }
  MicroKernel<T, MAX_ROWS, VECS>(k, a, lda, panel, beta, c, ldc, cols);
}

}  // namespace step_gemm

// op(W) [k, n] packed once: panel p holds columns [p*P, p*P + P) (P = kPanelCols, zero-padded
// past n), row after row. ROWS and VECS: the micro-kernel's blocking (other values than the
// level's only for timing them).
template <typename T, int ROWS = cpu_tuning::kStepRows, int VECS = cpu_tuning::kStepPanelVectors>
class PackedOperand {
 public:
  static constexpr Index kPanelCols = VECS * step_gemm::kLanes<T>;

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
    constexpr Index kRows = ROWS;
    for (Index p = p0; p < p1; ++p) {
      const T* panel = panels_.get() + p * k_ * kPanelCols;
      const Index j = p * kPanelCols, cols = std::min(kPanelCols, n_ - j);
      // Row blocks of near-equal height (64 rows, ROWS = 12: 11,11,11,11,10,10, not 12,...,4): a
      // short block keeps too few accumulators busy to hide the multiply-add latency.
      const Index blocks = (m + kRows - 1) / kRows, height = m / blocks, taller = m % blocks;
      for (Index blk = 0, i = 0; blk < blocks; ++blk) {
        const Index rows = height + (blk < taller ? 1 : 0);
        step_gemm::Rows<T, ROWS, VECS>(rows, k_, a + i * lda, lda, panel, beta, c + i * ldc + j,
                                       ldc, cols);
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
