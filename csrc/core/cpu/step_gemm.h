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
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "../common.h"
#include "../storage.h"
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

// C[ROWS, cols] = acc + βC, for cols <= VECS * lanes. Always inlined: a call would take the
// accumulators' address and keep them in memory through the kernel's loop (measured at half
// speed).
template <typename T, int ROWS, int VECS>
[[gnu::always_inline]] inline void StoreBlock(typename Vector<T>::type (&acc)[ROWS][VECS], T beta,
                                              T* c, Index ldc, Index cols) {
  constexpr Index L = kLanes<T>, P = VECS * L;
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
  StoreBlock<T, ROWS, VECS>(acc, beta, c, ldc, cols);
}

// bfloat16 pairs: one 32-bit word holds the bfloat16 of rows 2i (low half) and 2i + 1 (high
// half) of a column, as AVX512_BF16's dot product (vdpbf16ps) reads its operands.
using Pair = std::uint32_t;
inline Pair PairOf(float lo, float hi) {
  return Pair(FromFloat<bfloat16>(lo).bits) | (Pair(FromFloat<bfloat16>(hi).bits) << 16);
}

// Whether this level multiplies bfloat16 pairs with the instruction (what makes them pay).
inline constexpr bool kNativeBf16Dot =
#if defined(__AVX512BF16__)
    kVectorBytes == 64;
#else
    false;
#endif

// acc += a.hi * b.hi, then acc += a.lo * b.lo, per lane: vdpbf16ps' definition. The product of
// two bfloat16 is exact in float32, so without the instruction two float additions of exact
// products round exactly as it does (but for subnormals, which the instruction flushes).
inline typename Vector<float>::type DotPairs(typename Vector<float>::type acc, Pair a,
                                             typename Vector<Pair>::type b) {
  using VF = typename Vector<float>::type;
#if defined(__AVX512BF16__)  // the intrinsic exists only where its flags are on
  if constexpr (kNativeBf16Dot) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(int(a)), (__m512bh)b);
  }
#endif
  const float a_lo = storage_bits::FloatOf(a << 16), a_hi = storage_bits::FloatOf(a & 0xFFFF0000u);
  acc += a_hi * (VF)(b & 0xFFFF0000u);
  acc += a_lo * (VF)(b << 16);
  return acc;
}

// MicroKernel on bfloat16 pairs: C[ROWS, cols] = A · panel + βC, with A [ROWS, k2] and the
// panel [k2, VECS * lanes] in pairs (k2: half of k, rounded up).
template <int ROWS, int VECS>
void MicroKernelPairs(Index k2, const Pair* a, const Pair* panel, float beta, float* c,
                      Index ldc, Index cols) {
  using VF = typename Vector<float>::type;
  constexpr Index L = kLanes<float>, P = VECS * L;
  VF acc[ROWS][VECS];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECS; ++v) acc[r][v] = VF{};
  for (Index kk = 0; kk < k2; ++kk) {
    typename Vector<Pair>::type b[VECS];
    for (int v = 0; v < VECS; ++v) b[v] = Load(panel + kk * P + v * L);
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
      const Pair a_rk = a[r * k2 + kk];
      for (int v = 0; v < VECS; ++v) acc[r][v] = DotPairs(acc[r][v], a_rk, b[v]);
    }
  }
  StoreBlock<float, ROWS, VECS>(acc, beta, c, ldc, cols);
}

// f(std::integral_constant<int, rows>) for a block of 1..MAX_ROWS rows: one kernel instance per
// height.
template <int MAX_ROWS, typename F>
void WithRows(Index rows, const F& f) {
  if constexpr (MAX_ROWS > 1) {
    if (rows < MAX_ROWS) return WithRows<MAX_ROWS - 1>(rows, f);
  }
  f(std::integral_constant<int, MAX_ROWS>{});
}

}  // namespace step_gemm

// op(W) [k, n] packed once: panel p holds columns [p*P, p*P + P) (P = kPanelCols, zero-padded
// past n), row after row. ROWS and VECS: the micro-kernel's blocking (other values than the
// level's only for timing them).
//
// With `pairs` (float only: a call that stores its sequences in bfloat16) W is packed as
// bfloat16 pairs of rows instead, and each step rounds A's rows to bfloat16 pairs too: the
// products are those of bfloat16 values, accumulated in float32 (AVX512_BF16's dot product).
template <typename T, int ROWS = cpu_tuning::kStepRows, int VECS = cpu_tuning::kStepPanelVectors>
class PackedOperand {
 public:
  static constexpr Index kPanelCols = VECS * step_gemm::kLanes<T>;

  PackedOperand() = default;
  // op(W) = W [k, n] (trans false) or Wᵀ with W [n, k] (trans true); ld: W's row stride.
  PackedOperand(bool trans, Index k, Index n, const T* w, Index ld, bool pairs = false)
      : k_(k), n_(n), pairs_(pairs && std::is_same_v<T, float>) {
    auto at = [&](Index kk, Index col) { return trans ? w[col * ld + kk] : w[kk * ld + col]; };
    if (pairs_) {
      const Index k2 = (k + 1) / 2;
      pair_panels_.reset(new step_gemm::Pair[Panels() * k2 * kPanelCols]);
      for (Index p = 0; p < Panels(); ++p) {
        step_gemm::Pair* dst = pair_panels_.get() + p * k2 * kPanelCols;
        const Index c0 = p * kPanelCols, cols = std::min(kPanelCols, n - c0);
        for (Index kk = 0; kk < k2; ++kk)
          for (Index c = 0; c < kPanelCols; ++c) {
            const bool in = c < cols;
            const float lo = in ? float(at(2 * kk, c0 + c)) : 0.0f;
            const float hi = in && 2 * kk + 1 < k ? float(at(2 * kk + 1, c0 + c)) : 0.0f;
            dst[kk * kPanelCols + c] = step_gemm::PairOf(lo, hi);
          }
      }
      return;
    }
    panels_.reset(new T[Panels() * k * kPanelCols]);
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
    // Row blocks of near-equal height (64 rows, ROWS = 12: 11,11,11,11,10,10, not 12,...,4): a
    // short block keeps too few accumulators busy to hide the multiply-add latency.
    const Index blocks = (m + ROWS - 1) / ROWS, height = m / blocks, taller = m % blocks;
    if (pairs_) {
      if constexpr (std::is_same_v<T, float>)
        MultiplyPairs(blocks, height, taller, a, lda, beta, c, ldc, p0, p1);
      return;
    }
    for (Index p = p0; p < p1; ++p) {
      const T* panel = panels_.get() + p * k_ * kPanelCols;
      const Index j = p * kPanelCols, cols = std::min(kPanelCols, n_ - j);
      for (Index blk = 0, i = 0; blk < blocks; ++blk) {
        const Index rows = height + (blk < taller ? 1 : 0);
        step_gemm::WithRows<ROWS>(rows, [&](auto r) {
          step_gemm::MicroKernel<T, decltype(r)::value, VECS>(k_, a + i * lda, lda, panel, beta,
                                                              c + i * ldc + j, ldc, cols);
        });
        i += rows;
      }
    }
  }

 private:
  // A row block is rounded to pairs once, then multiplied by every panel in [p0, p1).
  void MultiplyPairs(Index blocks, Index height, Index taller, const float* a, Index lda,
                     float beta, float* c, Index ldc, Index p0, Index p1) const {
    const Index k2 = (k_ + 1) / 2;
    std::unique_ptr<step_gemm::Pair[]> rows_in_pairs(new step_gemm::Pair[ROWS * k2]);
    for (Index blk = 0, i = 0; blk < blocks; ++blk) {
      const Index rows = height + (blk < taller ? 1 : 0);
      for (Index r = 0; r < rows; ++r) {
        const float* a_row = a + (i + r) * lda;
        for (Index kk = 0; kk < k2; ++kk)
          rows_in_pairs[r * k2 + kk] =
              step_gemm::PairOf(a_row[2 * kk], 2 * kk + 1 < k_ ? a_row[2 * kk + 1] : 0.0f);
      }
      for (Index p = p0; p < p1; ++p) {
        const Index j = p * kPanelCols, cols = std::min(kPanelCols, n_ - j);
        const step_gemm::Pair* panel = pair_panels_.get() + p * k2 * kPanelCols;
        step_gemm::WithRows<ROWS>(rows, [&](auto r) {
          step_gemm::MicroKernelPairs<decltype(r)::value, VECS>(k2, rows_in_pairs.get(), panel,
                                                                beta, c + i * ldc + j, ldc, cols);
        });
      }
      i += rows;
    }
  }

  Index k_ = 0, n_ = 0;
  bool pairs_ = false;
  std::unique_ptr<T[]> panels_;  // uninitialised: every element is written once
  std::unique_ptr<step_gemm::Pair[]> pair_panels_;
};

TFCELLS_ISA_END
}  // namespace tfcells
