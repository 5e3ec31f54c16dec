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
#include <new>
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

// C[ROWS, cols] = A[ROWS, k] · panel[k, VECS * lanes] + βC, for cols <= VECS * lanes. A's
// rows are `lda` elements apart, or with K_MAJOR its k columns are (a packed block of rows:
// ChunkProduct).
template <typename T, int ROWS, int VECS, bool K_MAJOR = false>
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
      const T a_rk = K_MAJOR ? a[kk * lda + r] : a[r * lda + kk];
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

// FromFloat<bfloat16>'s rounding a vector at a time (a scalar PairOf loop ran at 1.3 ns a
// pair): the bfloat16 bits in each lane's low half.
using Bits = typename Vector<std::uint32_t>::type;
inline Bits RoundedBits(Bits u) { return storage_bits::BFloat16BitsOf(u); }
inline Bits BitsAt(const float* p) {
  Bits u;
  std::memcpy(&u, p, sizeof(u));
  return u;
}

// Arrays on 64-byte boundaries: a tile row (64 bytes) across two cache lines loads slowly (a
// 32 x 32 block with k = 256 on AMX: 444 ns from new[]'s 16-byte alignment, 172 ns aligned).
inline constexpr std::size_t kPairAlign = 64;
template <typename E>
struct AlignedDelete {
  void operator()(E* p) const { ::operator delete[](p, std::align_val_t(kPairAlign)); }
};
template <typename E>
using AlignedArray = std::unique_ptr<E[], AlignedDelete<E>>;
template <typename E>
AlignedArray<E> NewAligned(Index n) {
  return AlignedArray<E>(new (std::align_val_t(kPairAlign)) E[n]);
}
using AlignedPairs = AlignedArray<Pair>;
inline AlignedPairs NewAlignedPairs(Index n) { return NewAligned<Pair>(n); }

// out[kk] = PairOf(row[2kk], row[2kk + 1]) for the (k + 1) / 2 pairs of a row of k floats
// (row[k] read as 0 when k is odd).
inline void PairsOfRow(const float* row, Index k, Pair* out) {
  typedef std::uint64_t Wide __attribute__((vector_size(kVectorBytes)));
  typedef std::uint32_t Half __attribute__((vector_size(kVectorBytes / 2)));
  constexpr Index L = kLanes<float>;  // floats per vector: L / 2 pairs
  Index kk = 0;
  for (; 2 * kk + L <= k; kk += L / 2) {
    // Each 64-bit lane holds the rounded lo and hi of one pair: fold hi down beside lo.
    const Wide w = reinterpret_cast<Wide>(RoundedBits(BitsAt(row + 2 * kk)));
    const Half pairs = __builtin_convertvector(w | (w >> 16), Half);
    std::memcpy(out + kk, &pairs, sizeof(pairs));
  }
  for (; 2 * kk < k; ++kk) out[kk] = PairOf(row[2 * kk], 2 * kk + 1 < k ? row[2 * kk + 1] : 0.0f);
}

// out[i] = PairOf(lo[i], hi[i]) for i < n (hi null: zeros).
inline void PairsOfRows(const float* lo, const float* hi, Index n, Pair* out) {
  constexpr Index L = kLanes<float>;
  Index i = 0;
  for (; i + L <= n; i += L) {
    const Bits high = hi ? RoundedBits(BitsAt(hi + i)) << 16 : Bits{};
    const Bits pairs = RoundedBits(BitsAt(lo + i)) | high;
    std::memcpy(out + i, &pairs, sizeof(pairs));
  }
  for (; i < n; ++i) out[i] = PairOf(lo[i], hi ? hi[i] : 0.0f);
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
void MicroKernelPairs(Index k2, const Pair* a, Index lda, const Pair* panel, float beta,
                      float* c, Index ldc, Index cols) {
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
      const Pair a_rk = a[r * lda + kk];
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

// The tile program of one block: C[32, 32] = C0 + A[32, k2p] · panel[k2p, 32] (A's rows `lda`
// pairs apart, the panel's rows 32 pairs, C's rows ldc floats apart), where C0 is C as it was
// (accumulate) or zero. Tiles is AmxTiles, or EmulatedTiles for the self-test on any CPU.
template <typename Tiles>
void TileBlock(Tiles& tiles, Index k2p, const Pair* a, Index lda, const Pair* panel, float* c,
               Index ldc, bool accumulate) {
  constexpr Index kPanelBytes = kTileBlockCols * sizeof(Pair);
  const Index c_stride = ldc * Index(sizeof(float));
  if (accumulate) {
    tiles.LoadAccumulators(c, c_stride);
  } else {
    tiles.ZeroAccumulators();
  }
  for (Index kk = 0; kk < k2p; kk += kTilePairs) {
    const Pair* b = panel + kk * kTileBlockCols;
    tiles.MultiplyAccumulate(a + kk, a + kTileRows * lda + kk, lda * Index(sizeof(Pair)), b,
                             b + kTileCols, kPanelBytes);
  }
  tiles.StoreAccumulators(c, c_stride);
}

// C[rows, cols] = βC + A[32, k2p] · panel for one block (rows, cols <= 32): the accumulators
// start from βC and add the pair products in order, so a block's result does not depend on its
// size. A whole block with β 0 or 1 runs in C itself, the others through a scratch block.
template <typename Tiles>
void TileProduct(Tiles& tiles, Index k2p, const Pair* a, const Pair* panel, Index rows,
                 Index cols, float beta, float* c, Index ldc) {
  constexpr Index kRows = kTileBlockRows, kCols = kTileBlockCols;
  if (rows == kRows && cols == kCols && (beta == 0.0f || beta == 1.0f))
    return TileBlock(tiles, k2p, a, k2p, panel, c, ldc, beta != 0.0f);
  alignas(64) float block[kRows * kCols];
  for (Index r = 0; r < kRows; ++r)
    for (Index j = 0; j < kCols; ++j)  // β = 0 never reads C
      block[r * kCols + j] =
          r < rows && j < cols && beta != 0.0f ? beta * c[r * ldc + j] : 0.0f;
  TileBlock(tiles, k2p, a, k2p, panel, block, kCols, true);
  for (Index r = 0; r < rows; ++r)
    for (Index j = 0; j < cols; ++j) c[r * ldc + j] = block[r * kCols + j];
}

// Not tiles: the whole-sequence pair GEMM (PackedOperand::MultiplyPairTilesInSlabs) on the step
// products' vector kernel, MicroKernelPairs, where the level has no AMX (Zen 4's AVX512_BF16:
// vdpbf16ps twice float32's rate).
struct VectorPairs {};

// The tiles as Intel's pseudo-code of TDPBF16PS defines them: eight registers of 16 rows of
// 64 bytes, and per element of C, for each pair in order, C += a.lo * b.lo, then C += a.hi * b.hi
// (denormals are not flushed here, as the instruction flushes them). For the self-test, which
// checks the tile program bit for bit on CPUs without AMX.
struct EmulatedTiles {
  std::uint32_t tile[8][kTileRows][kTileCols];

  void ZeroAccumulators() { std::memset(tile, 0, 4 * sizeof(tile[0])); }
  void LoadAccumulators(const float* in, Index stride) {
    const char* base = reinterpret_cast<const char*>(in);
    const Index half = kTileRows * stride;
    Load(0, base, stride), Load(1, base + 64, stride);
    Load(2, base + half, stride), Load(3, base + half + 64, stride);
  }
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
    // Constant, not written on the stack: GCC 12 once dropped two of the stores of a local
    // configuration before LDTILECFG (which then faulted), as if the instruction did not read it.
    alignas(64) static constexpr std::uint8_t kConfig[64] = {
        1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,            // palette 1
        64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0,    // bytes per row, tiles 0-7
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,            // (tiles 8-15: none)
        16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0};  // rows, tiles 0-7
    static_assert(kTileRows == 16, "kConfig's rows");
    _tile_loadconfig(kConfig);
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
  void LoadAccumulators(const float* in, Index stride) {
    const char* base = reinterpret_cast<const char*>(in);
    const Index half = kTileRows * stride;
    _tile_loadd(0, base, stride);
    _tile_loadd(1, base + 64, stride);
    _tile_loadd(2, base + half, stride);
    _tile_loadd(3, base + half + 64, stride);
  }
  void MultiplyAccumulate(const Pair* a0, const Pair* a1, Index a_stride, const Pair* b0,
                          const Pair* b1, Index b_stride) {
    _tile_loadd(4, a0, a_stride);
    _tile_loadd(6, b0, b_stride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, b1, b_stride);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, a1, a_stride);
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

// A chunk of a weight gradient's rows, both operands packed by the caller
// (CpuBackend::MaskedGemms): C[m, n] = Aᵀ·B + βC over k rows, with Aᵀ's rows in blocks of
// kChunkRows, each k-major ([k][kChunkRows], `a_stride` elements from one block to the next),
// and B in panels of kChunkCols columns ([k][kChunkCols], `b_stride` apart, zero past n). A
// panel (k = 128 rows: 16 KiB in float32) stays in L1 while every block of A streams past it.
// Each element of C is one chain over the chunk's rows in order, then βC added.
inline constexpr int kChunkRows = cpu_tuning::kStepRows;
template <typename T>
inline constexpr Index kChunkCols = cpu_tuning::kStepPanelVectors * kLanes<T>;
template <typename T>
void ChunkProduct(Index m, Index n, Index k, const T* a_blocks, Index a_stride,
                  const T* b_panels, Index b_stride, T beta, T* c, Index ldc) {
  constexpr Index P = kChunkCols<T>;
  for (Index j = 0; j < n; j += P) {
    const T* panel = b_panels + j / P * b_stride;
    for (Index i = 0; i < m; i += kChunkRows) {
      WithRows<kChunkRows>(std::min<Index>(kChunkRows, m - i), [&](auto r) {
        MicroKernel<T, decltype(r)::value, cpu_tuning::kStepPanelVectors, true>(
            k, a_blocks + i / kChunkRows * a_stride, kChunkRows, panel, beta, c + i * ldc + j,
            ldc, std::min(P, n - j));
      });
    }
  }
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
    if constexpr (std::is_same_v<T, float>) {
      if (pairs_) {
        PackPairs(trans, w, ld, [](Index count, const auto& fn) { fn(Index(0), count); });
        return;
      }
    }
    panels_.reset(new T[Panels() * k * kPanelCols]);
    for (Index p = 0; p < Panels(); ++p) {
      T* dst = panels_.get() + p * k * kPanelCols;
      const Index c0 = p * kPanelCols, cols = std::min(kPanelCols, n - c0);
      if (cols < kPanelCols) std::fill(dst, dst + k * kPanelCols, T(0));
      if (trans) {  // column c0 + c of Wᵀ is row c0 + c of W
        // A cache line of each of W's rows at a time, into a block of the panel that stays in
        // L1 (a whole row at a time writes every line of the panel: 4x slower, 1 MiB float32).
        constexpr Index kLine = 64 / sizeof(T);
        for (Index k0 = 0; k0 < k; k0 += kLine) {
          const Index k1 = std::min(k, k0 + kLine);
          for (Index c = 0; c < cols; ++c) {
            const T* src = w + (c0 + c) * ld;
            for (Index kk = k0; kk < k1; ++kk) dst[kk * kPanelCols + c] = src[kk];
          }
        }
      } else if (cols == kPanelCols) {  // a fixed length: vector moves, not a memmove call each
        for (Index kk = 0; kk < k; ++kk) {
          const T* const src = w + kk * ld + c0;
          T* const out = dst + kk * kPanelCols;
#pragma omp simd
          for (Index c = 0; c < kPanelCols; ++c) out[c] = src[c];
        }
      } else {
        for (Index kk = 0; kk < k; ++kk)
          std::copy(w + kk * ld + c0, w + kk * ld + c0 + cols, dst + kk * kPanelCols);
      }
    }
  }

  // Pairs only: the same, with the packing split by split(count, fn), which runs fn(begin, end)
  // over ranges covering [0, count), possibly in parallel (CpuBackend::PairGemm).
  template <typename Split>
  PackedOperand(bool trans, Index k, Index n, const float* w, Index ld, const Split& split)
      : k_(k), n_(n), pairs_(true) {
    static_assert(std::is_same_v<T, float>, "pairs of float32 only");
    PackPairs(trans, w, ld, split);
  }

  Index k() const { return k_; }
  Index n() const { return n_; }
  Index Panels() const { return (n_ + kPanelCols - 1) / kPanelCols; }

  // C[m, columns of panels [p0, p1)] = A[m, k] · op(W) + βC. copy_rows: each block of A's rows
  // is copied first (CpuBackend::CopiesRows; pairs are always copied, as they are rounded).
  void Multiply(Index m, const T* a, Index lda, T beta, T* c, Index ldc, Index p0, Index p1,
                bool copy_rows = false) const {
    if (pairs_) {
      if constexpr (std::is_same_v<T, float>) {
#if TFCELLS_AMX_TILES
        if constexpr (kPanelCols == step_gemm::kTileBlockCols)  // (other widths: for timings)
          return MultiplyPairTiles<step_gemm::AmxTiles>(m, a, lda, beta, c, ldc, p0, p1);
#endif
        MultiplyPairs(m, a, lda, beta, c, ldc, p0, p1);
      }
      return;
    }
    if (copy_rows) return MultiplyCopiedRows(m, a, lda, beta, c, ldc, p0, p1);
    for (Index p = p0; p < p1; ++p) {
      const T* panel = panels_.get() + p * k_ * kPanelCols;
      const Index j = p * kPanelCols, cols = std::min(kPanelCols, n_ - j);
      ForRowBlocks(m, [&](Index i, Index rows) {
        step_gemm::WithRows<ROWS>(rows, [&](auto r) {
          step_gemm::MicroKernel<T, decltype(r)::value, VECS>(k_, a + i * lda, lda, panel, beta,
                                                              c + i * ldc + j, ldc, cols);
        });
      });
    }
  }

  // The pair products on tiles (pairs only): what Multiply runs at the amx level, public so that
  // the self-test can run the same program on EmulatedTiles. A block of 32 rows is rounded to
  // pairs once (the rows past m as zeros), then multiplied by every panel in [p0, p1)
  // (step_gemm::TileProduct: C = βC + A·op(W), βC first).
  template <typename Tiles>
  void MultiplyPairTiles(Index m, const float* a, Index lda, float beta, float* c, Index ldc,
                         Index p0, Index p1) const {
    static_assert(kPanelCols == step_gemm::kTileBlockCols, "a panel is two B tiles wide");
    constexpr Index kRows = step_gemm::kTileBlockRows;
    const Index k2p = PaddedPairRows();
    RowBuffer<step_gemm::Pair> buffer(kRows * k2p);
    step_gemm::Pair* rows_in_pairs = buffer.data();
    Tiles tiles;
    for (Index i = 0; i < m; i += kRows) {
      const Index rows = std::min(kRows, m - i);
      RoundRows(a + i * lda, lda, false, rows, 0, k2p, rows_in_pairs);
      std::fill(rows_in_pairs + rows * k2p, rows_in_pairs + kRows * k2p, step_gemm::Pair(0));
      for (Index p = p0; p < p1; ++p) {
        const Index j = p * kPanelCols;
        step_gemm::TileProduct(tiles, k2p, rows_in_pairs,
                               pair_panels_.get() + p * k2p * kPanelCols, rows,
                               std::min(kPanelCols, n_ - j), beta, c + i * ldc + j, ldc);
      }
    }
  }

  // The same for a whole-sequence GEMM (CpuBackend::PairGemm: k = T·B rows): k runs in slabs of
  // kSlabPairs pairs, so that a slab of every row block of A (32 KiB a block) stays in L2 and a
  // slab of a panel (32 KiB) in L1 while every block of C adds it in place.
  // a_trans: row i of A is column i of `a` (a[kk * lda + i]).
  // Tiles = step_gemm::VectorPairs: each block's slab product on MicroKernelPairs instead, in
  // blocks of at most ROWS rows; its sums start from zero and add C (βC for the first slab) last.
  static constexpr Index kSlabPairs = 256;
  template <typename Tiles>
  void MultiplyPairTilesInSlabs(Index m, const float* a, Index lda, bool a_trans, float beta,
                                float* c, Index ldc) const {
    static_assert(kPanelCols == step_gemm::kTileBlockCols, "a panel is two B tiles wide");
    constexpr Index kRows = step_gemm::kTileBlockRows;
    static_assert(kSlabPairs % step_gemm::kTilePairs == 0, "slabs of whole tiles");
    const Index k2p = PaddedPairRows(), blocks = (m + kRows - 1) / kRows;
    const step_gemm::AlignedPairs buffer =
        step_gemm::NewAlignedPairs(blocks * kRows * std::min(kSlabPairs, k2p));
    [[maybe_unused]] Tiles tiles;  // (VectorPairs: none)
    for (Index s0 = 0; s0 < k2p; s0 += kSlabPairs) {
      const Index pairs = std::min(kSlabPairs, k2p - s0);
      for (Index blk = 0; blk < blocks; ++blk) {
        const Index i = blk * kRows, rows = std::min(kRows, m - i);
        step_gemm::Pair* out = buffer.get() + blk * kRows * pairs;
        RoundRows(a_trans ? a + i : a + i * lda, lda, a_trans, rows, s0, pairs, out);
        std::fill(out + rows * pairs, out + kRows * pairs, step_gemm::Pair(0));
      }
      for (Index p = 0; p < Panels(); ++p) {
        const Index j = p * kPanelCols;
        const step_gemm::Pair* panel = pair_panels_.get() + (p * k2p + s0) * kPanelCols;
        for (Index blk = 0; blk < blocks; ++blk) {
          const Index i = blk * kRows, rows = std::min(kRows, m - i);
          const step_gemm::Pair* rows_in_pairs = buffer.get() + blk * kRows * pairs;
          const float block_beta = s0 == 0 ? beta : 1.0f;
          if constexpr (std::is_same_v<Tiles, step_gemm::VectorPairs>) {
            ForRowBlocks(rows, [&](Index r0, Index part_rows) {
              step_gemm::WithRows<ROWS>(part_rows, [&](auto r) {
                step_gemm::MicroKernelPairs<decltype(r)::value, VECS>(
                    pairs, rows_in_pairs + r0 * pairs, pairs, panel, block_beta,
                    c + (i + r0) * ldc + j, ldc, std::min(kPanelCols, n_ - j));
              });
            });
          } else {
            step_gemm::TileProduct(tiles, pairs, rows_in_pairs, panel, rows,
                                   std::min(kPanelCols, n_ - j), block_beta, c + i * ldc + j,
                                   ldc);
          }
        }
      }
    }
  }

 private:
  // op(W) as pair panels, zero-padded to whole tiles of pairs and to whole panels; the pair rows
  // split by split(count, fn), which runs fn(kk0, kk1) over ranges covering [0, count).
  template <typename Split>
  void PackPairs(bool trans, const float* w, Index ld, const Split& split) {
    const Index k2 = PairRows(), k2p = PaddedPairRows(), panels = Panels();
    pair_panels_ = step_gemm::NewAlignedPairs(panels * k2p * kPanelCols);
    step_gemm::Pair* const packed = pair_panels_.get();
    auto row_of = [&](Index p, Index kk) { return packed + (p * k2p + kk) * kPanelCols; };
    for (Index p = 0; p < panels; ++p)  // the padding pairs
      std::fill(row_of(p, k2), row_of(p, k2p), step_gemm::Pair(0));
    split(k2, [&](Index kk0, Index kk1) {
      // A pair of W's rows at a time, across every panel: each row read once, in order.
      for (Index kk = kk0; kk < kk1; ++kk) {
        const bool has_hi = 2 * kk + 1 < k_;
        for (Index p = 0; p < panels; ++p) {
          const Index c0 = p * kPanelCols, cols = std::min(kPanelCols, n_ - c0);
          step_gemm::Pair* row = row_of(p, kk);
          if (trans) {
            for (Index c = 0; c < cols; ++c)
              row[c] = step_gemm::PairOf(w[(c0 + c) * ld + 2 * kk],
                                         has_hi ? w[(c0 + c) * ld + 2 * kk + 1] : 0.0f);
          } else {
            const float* lo = w + 2 * kk * ld + c0;
            step_gemm::PairsOfRows(lo, has_hi ? lo + ld : nullptr, cols, row);
          }
          std::fill(row + cols, row + kPanelCols, step_gemm::Pair(0));
        }
      }
    });
  }

  Index PairRows() const { return (k_ + 1) / 2; }
  // Pair rows of each packed panel: k's pairs, zero-padded to whole tiles.
  Index PaddedPairRows() const {
    return (PairRows() + step_gemm::kTilePairs - 1) / step_gemm::kTilePairs *
           step_gemm::kTilePairs;
  }

  // f(i, rows) for each block of rows [i, i + rows) of m, in order: blocks of near-equal height,
  // at most ROWS (64 rows, ROWS = 12: 11,11,11,11,10,10, not 12,...,4), as a short block keeps
  // too few accumulators busy to hide the multiply-add latency.
  template <typename F>
  static void ForRowBlocks(Index m, const F& f) {
    if (m <= 0) return;
    const Index blocks = (m + ROWS - 1) / ROWS, height = m / blocks, taller = m % blocks;
    for (Index blk = 0, i = 0; blk < blocks; ++blk) {
      const Index rows = height + (blk < taller ? 1 : 0);
      f(i, rows);
      i += rows;
    }
  }

  // Elements between the rows of a buffer of rows `width` elements long: whole cache lines and
  // one more, so that consecutive rows start in different L1 sets whatever the width.
  template <typename E>
  static Index PaddedRowStride(Index width) {
    constexpr Index kLine = 64 / Index(sizeof(E));
    return (width + kLine - 1) / kLine * kLine + kLine;
  }

  // Rows copied or rounded to pairs: on the stack up to 64 KiB (k up to 1024 on tiles), else on
  // the heap. (Not a thread_local buffer: level code may register no destructors, and its weak
  // symbols are renamed per level.)
  template <typename E>
  class RowBuffer {
   public:
    explicit RowBuffer(Index size)
        : heap_(size > kOnStack ? step_gemm::NewAligned<E>(size) : nullptr) {}
    E* data() { return heap_ ? heap_.get() : stack_; }

   private:
    static constexpr Index kOnStack = 65536 / sizeof(E);
    // Uninitialised: rows are written before they are read.
    alignas(step_gemm::kPairAlign) E stack_[kOnStack];
    step_gemm::AlignedArray<E> heap_;
  };

  // Pairs [kk0, kk0 + pairs) of `rows` rows of A (lda apart; with a_trans columns, lda apart),
  // `pairs` apart in `out`, zero past k.
  void RoundRows(const float* a, Index lda, bool a_trans, Index rows, Index kk0, Index pairs,
                 step_gemm::Pair* out) const {
    const Index k_end = std::min(k_, 2 * (kk0 + pairs));
    const Index k2 = std::max<Index>(0, (k_end - 2 * kk0 + 1) / 2);
    if (a_trans) {  // two rows of `a` at a time: each holds element kk of every row of A
      constexpr Index kChunk = step_gemm::kTileBlockRows;
      step_gemm::Pair chunk[kChunk];
      for (Index r0 = 0; r0 < rows; r0 += kChunk) {
        const Index n = std::min(kChunk, rows - r0);
        for (Index kk = 0; kk < k2; ++kk) {
          const float* lo = a + 2 * (kk0 + kk) * lda + r0;
          step_gemm::PairsOfRows(lo, 2 * (kk0 + kk) + 1 < k_end ? lo + lda : nullptr, n, chunk);
          for (Index r = 0; r < n; ++r) out[(r0 + r) * pairs + kk] = chunk[r];
        }
      }
    } else {
      for (Index r = 0; r < rows; ++r)
        step_gemm::PairsOfRow(a + r * lda + 2 * kk0, k_end - 2 * kk0, out + r * pairs);
    }
    for (Index r = 0; r < rows; ++r)
      std::fill(out + r * pairs + k2, out + (r + 1) * pairs, step_gemm::Pair(0));
  }

  // A row block is rounded to pairs once, then multiplied by every panel in [p0, p1). The
  // rounded rows are one cache line more than whole lines apart, as MultiplyCopiedRows' copies:
  // at k = 2048 rows k/2 pairs apart would sit 4 KiB apart, in one L1 set (Zen 4: 2-3 % slower).
  void MultiplyPairs(Index m, const float* a, Index lda, float beta, float* c, Index ldc,
                     Index p0, Index p1) const {
    const Index k2 = PairRows(), k2p = PaddedPairRows();
    const Index ld = PaddedRowStride<step_gemm::Pair>(k2);
    RowBuffer<step_gemm::Pair> buffer(ROWS * ld);
    step_gemm::Pair* rows_in_pairs = buffer.data();
    ForRowBlocks(m, [&](Index i, Index rows) {
      RoundRows(a + i * lda, lda, false, rows, 0, ld, rows_in_pairs);
      for (Index p = p0; p < p1; ++p) {
        const Index j = p * kPanelCols, cols = std::min(kPanelCols, n_ - j);
        const step_gemm::Pair* panel = pair_panels_.get() + p * k2p * kPanelCols;
        step_gemm::WithRows<ROWS>(rows, [&](auto r) {
          step_gemm::MicroKernelPairs<decltype(r)::value, VECS>(k2, rows_in_pairs, ld, panel,
                                                                beta, c + i * ldc + j, ldc, cols);
        });
      }
    });
  }

  // A block of rows is copied to a buffer, one cache line more than whole lines apart (so that
  // consecutive rows start in different L1 sets), then multiplied by every panel in [p0, p1).
  void MultiplyCopiedRows(Index m, const T* a, Index lda, T beta, T* c, Index ldc, Index p0,
                          Index p1) const {
    const Index ld = PaddedRowStride<T>(k_);
    RowBuffer<T> buffer(ROWS * ld);
    T* const rows_copied = buffer.data();
    ForRowBlocks(m, [&](Index i, Index rows) {
      for (Index r = 0; r < rows; ++r)
        std::copy(a + (i + r) * lda, a + (i + r) * lda + k_, rows_copied + r * ld);
      for (Index p = p0; p < p1; ++p) {
        const T* panel = panels_.get() + p * k_ * kPanelCols;
        const Index j = p * kPanelCols, cols = std::min(kPanelCols, n_ - j);
        step_gemm::WithRows<ROWS>(rows, [&](auto r) {
          step_gemm::MicroKernel<T, decltype(r)::value, VECS>(k_, rows_copied, ld, panel, beta,
                                                              c + i * ldc + j, ldc, cols);
        });
      }
    });
  }

  Index k_ = 0, n_ = 0;
  bool pairs_ = false;
  std::unique_ptr<T[]> panels_;  // uninitialised: every element is written once
  step_gemm::AlignedPairs pair_panels_;
};

// A PackedOperand of pairs in the tiles' 32-column panels (at the amx level the level's own).
using TilePairOperand = PackedOperand<float, cpu_tuning::kStepRows,
                                      step_gemm::kTileBlockCols / step_gemm::kLanes<float>>;

TFCELLS_ISA_END
}  // namespace tfcells
