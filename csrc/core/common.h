// Shared vocabulary of the framework-free core: sizes, sequence layouts, gradient masks.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#if defined(__CUDACC__)
#define TFCELLS_HD __host__ __device__ __forceinline__
#else
#define TFCELLS_HD inline
#endif

// Code whose machine instructions depend on the target ISA (activations, cell functors, the
// driver, the CPU kernels) sits in this inline namespace. The CPU library compiles that code once
// per ISA level under another name (-DTFCELLS_ISA=isa_avx2, ...), so the linker never merges two
// ISA variants of one inline function. Plain data types (Dims, StepMatrix, call arguments) and
// the functions compiled once stay outside it.
#ifndef TFCELLS_ISA
#define TFCELLS_ISA isa_default
#endif
#define TFCELLS_ISA_BEGIN inline namespace TFCELLS_ISA {
#define TFCELLS_ISA_END }

namespace tfcells {

using Index = std::int64_t;

// Which gradients the backward pass must produce. A bit that is clear means the gradient is
// neither computed nor written (its output pointer may be null).
enum GradBit : int {
  kGradX = 1 << 0,
  kGradH0 = 1 << 1,
  kGradC0 = 1 << 2,  // LSTM only
  kGradKernel = 1 << 3,
  kGradRecurrentKernel = 1 << 4,
  kGradBias = 1 << 5,
  kGradAll = (1 << 6) - 1,
};

// Each gradient: its bit, the forward input it belongs to and the gradient op's output that
// carries it. The one source of these names: the op registrations, the kernels and the Python
// gradient function (through the pybind11 module) all read this table.
struct GradientInfo {
  GradBit bit;
  const char* input;
  const char* output;
};
inline constexpr GradientInfo kGradients[] = {
    {kGradX, "x", "dx"},
    {kGradH0, "h0", "dh0"},
    {kGradC0, "c0", "dc0"},
    {kGradKernel, "kernel", "dkernel"},
    {kGradRecurrentKernel, "recurrent_kernel", "drecurrent_kernel"},
    {kGradBias, "bias", "dbias"},
};

enum class CellKind { kLstm, kGruResetAfter, kGruResetBefore, kSimpleRnn };
inline constexpr CellKind kCellKinds[] = {CellKind::kLstm, CellKind::kGruResetAfter,
                                          CellKind::kGruResetBefore, CellKind::kSimpleRnn};

// What a cell's state carries besides h from one step to the next, and what its training
// cache keeps per step in `aux` ([.., H]).
enum class Aux {
  kNone,       // nothing (SimpleRNN)
  kCacheOnly,  // kept for the backward pass only (GRU reset_after: the recurrent candidate term)
  kState,      // needed by the forward pass too (LSTM: the cell state; GRU reset_after=False:
               // r * h_prev, the candidate GEMM's operand)
};

// The sizes and layouts that tell the cells apart; each cell's struct in cells.h holds its own
// (its kInfo) beside its step functions.
struct CellInfo {
  const char* name;             // as the pybind11 modules and Python name it
  int gates;                    // gate blocks of width H in the kernels' columns
  int bias_rows;                // GRU reset_after keeps an input and a recurrent bias
  bool cell_state;              // has c0 / c_last (LSTM)
  Aux aux;
  bool split_candidate;         // the candidate's recurrent GEMM runs apart, on r * h_prev
  bool recurrent_gate_grads;    // the recurrent side's gate gradients differ from the input
                                // side's (GRU reset_after: r scales the candidate's)
  bool pointwise_reads_h_prev;  // the backward pointwise step reads h_prev (GRU: dz); else
                                // only dW_h reads the h_prev cache
  int shared_bias_gates;        // with two bias rows, the leading gates whose gradient is the
                                // same in both (GRU reset_after: z and r reach both unscaled)
  bool gate_is_state;           // the one activated gate is the new state (SimpleRNN): the
                                // backward pass can read it from y (CallPlan::GatesFromY)
};

// How the input projection x_t·W_x and dx_t = dG_t·W_xᵀ run: a step at a time inside the time
// loop (the CPU: rows still in cache, on the packed step GEMM), or as one GEMM over all T*B
// rows (a GPU: one large GEMM fills the device). The backend decides; the plan sizes for it.
enum class InputProjection { kPerStep, kWholeSequence };

// A sized buffer: the plan checks every caller-provided buffer against what it needs.
template <typename T>
struct Span {
  T* data = nullptr;
  Index size = 0;
};

// Problem sizes and how the sequence tensors are laid out.
//   time_major:   x is [T, B, I], y is [T, B, H]; otherwise [B, T, I] and [B, T, H].
//   go_backwards: processing step s reads input time T-1-s; y is in processing order.
// Every per-step tensor of the training cache is laid out like x (indexed by input time), so
// each weight gradient is a single GEMM over all T*B rows with no transposes.
struct Dims {
  Index T = 0, B = 0, I = 0, H = 0;
  bool time_major = false;
  bool go_backwards = false;

  // Input time read at processing step s.
  TFCELLS_HD Index InputTime(Index s) const { return go_backwards ? T - 1 - s : s; }
  // First row of time t, and the distance in rows between consecutive batch entries.
  TFCELLS_HD Index StepRow(Index t) const { return time_major ? t * B : t; }
  TFCELLS_HD Index BatchStride() const { return time_major ? 1 : T; }
  Index Rows() const { return T * B; }
};

// A [B, width] matrix at one time step inside a sequence buffer (or a plain [B, width] matrix).
template <typename T>
struct StepMatrix {
  T* data = nullptr;
  Index ld = 0;  // elements between consecutive batch rows

  StepMatrix() = default;
  TFCELLS_HD StepMatrix(T* d, Index l) : data(d), ld(l) {}
  template <typename U>  // T* -> const T*
  TFCELLS_HD StepMatrix(const StepMatrix<U>& o) : data(o.data), ld(o.ld) {}

  TFCELLS_HD T& operator()(Index b, Index j) const { return data[b * ld + j]; }
  TFCELLS_HD explicit operator bool() const { return data != nullptr; }
};

// Asks the CPU for the cache line holding m(b, j), for reading (const T) or writing; a no-op on
// the GPU and for a null view. Only a hint: it never faults and changes no result.
template <typename T>
TFCELLS_HD void PrefetchLine(const StepMatrix<T>& m, Index b, Index j) {
#if !defined(__CUDA_ARCH__)
  if (m) __builtin_prefetch(&m(b, j), std::is_const<T>::value ? 0 : 1, 3);
#endif
}

// dst(r, j) = view(r, j), or += with `accumulate`: a matrix given element by element (a
// functor), written out.
template <typename T, typename View>
struct StoreViewPoint {
  StepMatrix<T> dst;
  View view;
  bool accumulate = false;
  TFCELLS_HD void operator()(Index r, Index j) const {
    const T v = view(r, j);
    dst(r, j) = accumulate ? dst(r, j) + v : v;
  }
};

template <typename T>
TFCELLS_HD StepMatrix<T> AtStep(T* seq, const Dims& d, Index t, Index width) {
  if (seq == nullptr) return {nullptr, 0};
  return {seq + d.StepRow(t) * width, d.BatchStride() * width};
}

template <typename T>
TFCELLS_HD StepMatrix<T> Plain(T* m, Index width) {
  return {m, width};
}

// One operand's dropout weight gradients, gate by gate (Backend::MaskedGemms): for g < gates,
// C[:, g·n, (g+1)·n) = A_gᵀ·B[:, g·n, (g+1)·n) over k rows, where rows(g) gives A_g [k, m] row by
// row (rnn.h's MaskedRows: x or h_prev under gate g's mask).
template <typename T, typename RowsOf>
struct MaskedProducts {
  Index m = 0;
  int gates = 0;  // 0: not wanted
  RowsOf rows;
  const T* b = nullptr;
  Index ldb = 0;
  T* c = nullptr;
  Index ldc = 0;
};

// MaskedGemms as a backend without its own runs it (and the CPU's where it cannot pack): a gate
// at a time, x's product and then h_prev's, each masked operand A_g written out whole into
// `scratch` (k * m elements), then one GEMM. The two products of a gate follow each other, so
// that a backend may prepare B's gate columns once for both (the CPU's bfloat16 pair path keeps
// them packed).
template <typename Backend, typename T, typename XRows, typename HRows>
void MaskedGemmsByGate(Backend& be, Index n, Index k, const MaskedProducts<T, XRows>& x,
                       const MaskedProducts<T, HRows>& h, T* scratch) {
  auto product = [&](const auto& p, int g) {
    const auto rows = p.rows(g);
    be.ForEach(k, p.m, StoreViewPoint<T, decltype(rows)>{Plain(scratch, p.m), rows});
    be.Gemm(true, false, p.m, n, k, scratch, p.m, p.b + g * n, p.ldb, T(0), p.c + g * n, p.ldc);
  };
  for (int g = 0; g < x.gates || g < h.gates; ++g) {
    if (g < x.gates) product(x, g);
    if (g < h.gates) product(h, g);
  }
}

}  // namespace tfcells
