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

#if defined(__AVX512BF16__) || defined(__AMX_BF16__)
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

// AMX tiles (the amx level): a block of 32 rows of A in pairs (two A tiles of 16 rows x 16
// pairs) against one panel of 32 columns (two B tiles of 16 pairs x 16 columns: the pair panels
// are already the layout TDPBF16PS reads) into four C tiles of 16 x 16 floats. k runs in chunks
// of 16 pairs, so the pair panels and A's rounded rows are zero-padded to a multiple of that.
inline constexpr Index kTileRows = 16, kTilePairs = 16, kTileCols = 16;
inline constexpr Index kTileBlockRows = 2 * kTileRows, kTileBlockCols = 2 * kTileCols;

// Whether this level multiplies bfloat16 pairs on AMX tiles (only the amx level's flags have
// them; step_gemm::AmxTiles exists only there).
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define TFCELLS_AMX_TILES 1
static_assert(kNativeBf16Dot, "the amx level has AVX512_BF16 and 64-byte vectors");
#else
#define TFCELLS_AMX_TILES 0
#endif
inline constexpr bool kAmxTiles = TFCELLS_AMX_TILES;

// The tile program of one block: out[32, 32] = A[32, k2p] · panel[k2p, 32] (A's rows `lda`
// pairs apart, the panel's rows 32 pairs). Tiles is AmxTiles, or EmulatedTiles for the
// self-test on any CPU.
template <typename Tiles>
void TileBlock(Tiles& tiles, Index k2p, const Pair* a, Index lda, const Pair* panel,
               float* out) {
  constexpr Index kPanelBytes = kTileBlockCols * sizeof(Pair);
  tiles.ZeroAccumulators();
  for (Index kk = 0; kk < k2p; kk += kTilePairs) {
    const Pair* b = panel + kk * kTileBlockCols;
    tiles.MultiplyAccumulate(a + kk, a + kTileRows * lda + kk, lda * Index(sizeof(Pair)), b,
                             b + kTileCols, kPanelBytes);
  }
  tiles.StoreAccumulators(out, kTileBlockCols * Index(sizeof(float)));
}

// The tiles as Intel's pseudo-code of TDPBF16PS defines them: eight registers of 16 rows of
// 64 bytes, and per element of C, for each pair in order, C += a.lo * b.lo, then C += a.hi * b.hi
// (denormals are not flushed here, as the instruction flushes them). For the self-test, which
// checks the tile program bit for bit on CPUs without AMX.
struct EmulatedTiles {
  std::uint32_t tile[8][kTileRows][kTileCols];

  void ZeroAccumulators() { std::memset(tile, 0, 4 * sizeof(tile[0])); }
  void MultiplyAccumulate(const Pair* a0, const Pair* a1, Index a_stride, const Pair* b0,
                          const Pair* b1, Index b_stride) {
    Load(4, a0, a_stride), Load(5, a1, a_stride), Load(6, b0, b_stride), Load(7, b1, b_stride);
    Dot(0, 4, 6), Dot(1, 4, 7), Dot(2, 5, 6), Dot(3, 5, 7);
  }
  void StoreAccumulators(float* out, Index stride) const {
    char* base = reinterpret_cast<char*>(out);
    const Index half = kTileRows * stride;
    Store(0, base, stride), Store(1, base + 64, stride);
    Store(2, base + half, stride), Store(3, base + half + 64, stride);
  }

 private:
  void Load(int t, const void* p, Index stride) {
    for (Index r = 0; r < kTileRows; ++r)
      std::memcpy(tile[t][r], static_cast<const char*>(p) + r * stride, sizeof(tile[t][r]));
  }
  void Store(int t, char* p, Index stride) const {
    for (Index r = 0; r < kTileRows; ++r)
      std::memcpy(p + r * stride, tile[t][r], sizeof(tile[t][r]));
  }
  void Dot(int c, int a, int b) {
    using storage_bits::FloatOf;
    for (Index m = 0; m < kTileRows; ++m)
      for (Index n = 0; n < kTileCols; ++n) {
        float acc = FloatOf(tile[c][m][n]);
        for (Index k = 0; k < kTilePairs; ++k) {
          const Pair x = tile[a][m][k], y = tile[b][k][n];
          acc += FloatOf(x << 16) * FloatOf(y << 16);
          acc += FloatOf(x & 0xFFFF0000u) * FloatOf(y & 0xFFFF0000u);
        }
        std::memcpy(&tile[c][m][n], &acc, sizeof(acc));
      }
  }
};

#if TFCELLS_AMX_TILES
// The same program on the tile registers: C in tmm0-3, A in tmm4-5, B in tmm6-7, all 16 rows of
// 64 bytes. The configuration is per thread: loaded for one multiplication, released after it
// (a released thread saves no tile state on context switches). The process has asked Linux for
// the tile state before this level is chosen (cpu_isa.cc).
struct AmxTiles {
  AmxTiles() {
    alignas(64) std::uint8_t config[64] = {};
    config[0] = 1;  // palette 1
    for (int t = 0; t < 8; ++t) {
      config[16 + 2 * t] = 64;  // bytes per row (16-bit little-endian field)
      config[48 + t] = kTileRows;
    }
    _tile_loadconfig(config);
  }
  ~AmxTiles() { _tile_release(); }
  AmxTiles(const AmxTiles&) = delete;
  AmxTiles& operator=(const AmxTiles&) = delete;

  // The intrinsics are asm statements naming their registers: one statement each.
  void ZeroAccumulators() {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  void MultiplyAccumulate(const Pair* a0, const Pair* a1, Index a_stride, const Pair* b0,
                          const Pair* b1, Index b_stride) {
    _tile_loadd(4, a0, a_stride);
    _tile_loadd(5, a1, a_stride);
    _tile_loadd(6, b0, b_stride);
    _tile_loadd(7, b1, b_stride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  void StoreAccumulators(float* out, Index stride) const {
    char* base = reinterpret_cast<char*>(out);
    const Index half = kTileRows * stride;
    _tile_stored(0, base, stride);
    _tile_stored(1, base + 64, stride);
    _tile_stored(2, base + half, stride);
    _tile_stored(3, base + half + 64, stride);
  }
};
#endif

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
      const Index k2 = PairRows(), k2p = PaddedPairRows();
      pair_panels_.reset(new step_gemm::Pair[Panels() * k2p * kPanelCols]);
      for (Index p = 0; p < Panels(); ++p) {
        step_gemm::Pair* dst = pair_panels_.get() + p * k2p * kPanelCols;
        const Index c0 = p * kPanelCols, cols = std::min(kPanelCols, n - c0);
        for (Index kk = 0; kk < k2p; ++kk)
          for (Index c = 0; c < kPanelCols; ++c) {
            const bool in = c < cols && kk < k2;
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
      if constexpr (std::is_same_v<T, float>) {
#if TFCELLS_AMX_TILES
        MultiplyPairTiles<step_gemm::AmxTiles>(m, a, lda, beta, c, ldc, p0, p1);
#else
        MultiplyPairs(blocks, height, taller, a, lda, beta, c, ldc, p0, p1);
#endif
      }
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

  // The pair products on tiles (pairs only): what Multiply runs at the amx level, public so that
  // the self-test can run the same program on EmulatedTiles. A block of 32 rows is rounded to
  // pairs once (the rows past m as zeros), then multiplied by every panel in [p0, p1), each
  // into a 32 x 32 scratch block that is added to C.
  // a_trans: row i of A is column i of `a` (a[kk * lda + i]); c_trans: C is stored transposed
  // (C[i, j] at c[j * ldc + i]). Both for whole-sequence GEMMs (CpuBackend::PairGemm).
  template <typename Tiles>
  void MultiplyPairTiles(Index m, const float* a, Index lda, float beta, float* c, Index ldc,
                         Index p0, Index p1, bool a_trans = false, bool c_trans = false) const {
    static_assert(kPanelCols == step_gemm::kTileBlockCols, "a panel is two B tiles wide");
    constexpr Index kRows = step_gemm::kTileBlockRows;
    const Index k2p = PaddedPairRows();
    const Index row_step = c_trans ? 1 : ldc, col_step = c_trans ? ldc : 1;
    RowBuffer buffer(kRows * k2p);
    step_gemm::Pair* rows_in_pairs = buffer.data();
    alignas(64) float block[kRows * kPanelCols];
    Tiles tiles;
    for (Index i = 0; i < m; i += kRows) {
      const Index rows = std::min(kRows, m - i);
      RoundRows(a_trans ? a + i : a + i * lda, lda, rows, k2p, rows_in_pairs, a_trans);
      std::fill(rows_in_pairs + rows * k2p, rows_in_pairs + kRows * k2p, step_gemm::Pair(0));
      for (Index p = p0; p < p1; ++p) {
        const Index j = p * kPanelCols, cols = std::min(kPanelCols, n_ - j);
        step_gemm::TileBlock(tiles, k2p, rows_in_pairs, k2p,
                             pair_panels_.get() + p * k2p * kPanelCols, block);
        for (Index r = 0; r < rows; ++r) {
          float* c_row = c + (i + r) * row_step + j * col_step;
          const float* b_row = block + r * kPanelCols;
          for (Index jj = 0; jj < cols; ++jj) {
            float& out = c_row[jj * col_step];
            out = beta != 0.0f ? b_row[jj] + beta * out : b_row[jj];
          }
        }
      }
    }
  }

 private:
  Index PairRows() const { return (k_ + 1) / 2; }
  // Pair rows of each packed panel: k's pairs, zero-padded to whole tiles.
  Index PaddedPairRows() const {
    return (PairRows() + step_gemm::kTilePairs - 1) / step_gemm::kTilePairs *
           step_gemm::kTilePairs;
  }

  // Rows rounded to pairs: on the stack up to 64 KiB (k up to 1024 on tiles), else on the heap.
  // (Not a thread_local buffer: level code may register no destructors, and its weak symbols
  // are renamed per level.)
  class RowBuffer {
   public:
    explicit RowBuffer(Index size)
        : heap_(size > kOnStack ? new step_gemm::Pair[size] : nullptr) {}
    step_gemm::Pair* data() { return heap_ ? heap_.get() : stack_; }

   private:
    static constexpr Index kOnStack = 16384;
    step_gemm::Pair stack_[kOnStack];  // uninitialised: rows are written before they are read
    std::unique_ptr<step_gemm::Pair[]> heap_;
  };

  // rows rows of A (lda apart; with a_trans columns, lda apart) as pairs, `stride` pairs apart,
  // zero past k.
  void RoundRows(const float* a, Index lda, Index rows, Index stride, step_gemm::Pair* out,
                 bool a_trans = false) const {
    const Index k2 = PairRows();
    if (a_trans) {  // a row of `a` at a time: each holds element kk of every row of A
      for (Index kk = 0; kk < k2; ++kk) {
        const float* lo = a + 2 * kk * lda;
        const float* hi = 2 * kk + 1 < k_ ? lo + lda : nullptr;
        for (Index r = 0; r < rows; ++r)
          out[r * stride + kk] = step_gemm::PairOf(lo[r], hi ? hi[r] : 0.0f);
      }
    } else {
      for (Index r = 0; r < rows; ++r) {
        const float* a_row = a + r * lda;
        for (Index kk = 0; kk < k2; ++kk)
          out[r * stride + kk] =
              step_gemm::PairOf(a_row[2 * kk], 2 * kk + 1 < k_ ? a_row[2 * kk + 1] : 0.0f);
      }
    }
    for (Index r = 0; r < rows; ++r)
      std::fill(out + r * stride + k2, out + (r + 1) * stride, step_gemm::Pair(0));
  }

  // A row block is rounded to pairs once, then multiplied by every panel in [p0, p1).
  void MultiplyPairs(Index blocks, Index height, Index taller, const float* a, Index lda,
                     float beta, float* c, Index ldc, Index p0, Index p1) const {
    const Index k2 = PairRows(), k2p = PaddedPairRows();
    RowBuffer buffer(ROWS * k2);
    step_gemm::Pair* rows_in_pairs = buffer.data();
    for (Index blk = 0, i = 0; blk < blocks; ++blk) {
      const Index rows = height + (blk < taller ? 1 : 0);
      RoundRows(a + i * lda, lda, rows, k2, rows_in_pairs);
      for (Index p = p0; p < p1; ++p) {
        const Index j = p * kPanelCols, cols = std::min(kPanelCols, n_ - j);
        const step_gemm::Pair* panel = pair_panels_.get() + p * k2p * kPanelCols;
        step_gemm::WithRows<ROWS>(rows, [&](auto r) {
          step_gemm::MicroKernelPairs<decltype(r)::value, VECS>(k2, rows_in_pairs, panel, beta,
                                                                c + i * ldc + j, ldc, cols);
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

// A PackedOperand of pairs in the tiles' 32-column panels (at the amx level the level's own).
using TilePairOperand = PackedOperand<float, cpu_tuning::kStepRows,
                                      step_gemm::kTileBlockCols / step_gemm::kLanes<float>>;

TFCELLS_ISA_END
}  // namespace tfcells
