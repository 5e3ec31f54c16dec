// The recurrence driver shared by every cell and every device.
//
// Forward:  per step the input projection x_t·W_x, the recurrent GEMM h_prev·W_h and the cell's
//           fused pointwise kernel (cells.h; GRU with reset_after=False: two recurrent GEMMs and
//           two pointwise kernels).
// Backward: walk the steps backwards doing the pointwise gate backward, the GEMM that carries
//           dh to the previous step and dx_t = dG_t·W_xᵀ; then each requested weight gradient
//           is one GEMM over all T*B rows (dW_x = xᵀ·dG, dW_h = h_prevᵀ·dG) and db a column
//           sum. Each is skipped, and its buffer never touched, when its GradBit is clear.
//           h_prev is the forward's y a step behind, h0 first (PrevStates), or where y cannot
//           serve (go_backwards, 16-bit storage) a cache the forward keeps. SimpleRNN's one
//           activated gate, its new state, is y's row of the step (CallPlan::GatesFromY).
// Input projection and dx: a step at a time inside the loop (those of projection_steps steps
//           back to back: x_t·W_x ahead of the recurrence, dx_t behind it), or one GEMM over
//           all T*B rows before (after) it: the backend's kInputProjection says which (plan.h).
// Dropout (Keras' implementation=1, optional): gate g reads x ⊙ mx_g and h_prev ⊙ mh_g, so the
//           products above run gate by gate on masked copies (W[:, g] a column block), and the
//           gradients reaching x and h_prev are masked the same way.
//
// The driver is written against a Backend that provides:
//   kInputProjection                  InputProjection::kPerStep or kWholeSequence
//   Gemm(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc)   row-major C = op(A)op(B) + βC
//   StepOperand(trans, k, n, w, ld)   op(W) [k, n] (W, or Wᵀ of W [n, k]) prepared once for
//                                     the GEMM of every step (the CPU packs it into panels)
//   StepGemm(m, a, lda, operand, beta, c, ldc)                        C = A·op(W) + βC
//   StepGemm(..., block, u)           the same for the units u of each block of C's columns
//   ForEach(rows, cols, functor)                                      functor(b, j) for all b, j
//   ColumnSum(rows, cols, a, lda, out)                                out[j] = Σ_r a[r, j]
//   TrueFlag()                        a `true` in the device's memory, the mask of no mask
//   ForShards(rows, units, steps, work, fn)
//                                     the time loop: fn(backend, b0, b1, u, s, wait) runs step s
//                                     of one shard, batch rows [b0, b1) and the units u (Units)
//                                     of every gate block, over a partition of the rows (the
//                                     recurrence never mixes rows: no synchronisation), or with
//                                     work.units_may_split of the units, each shard then calling
//                                     wait() before it reads another's results of step s - 1
//   kUnitAlign                        units split on multiples of this (as dx's columns)
//   Scratch(planned, offset)          a shard's scratch: its own (work.part_scratch_bytes,
//                                     from `offset` elements on) or the plan's, `planned`
//   ProjectionSteps<T>(planned, weights)
//                                     how many steps' products by W_x run back to back, at
//                                     most the plan's projection_steps (W_x and W_h: `weights`
//                                     elements)
// and the caller provides every buffer (outputs, cache, workspace) at the sizes its CallPlan
// (plan.h) gives, so nothing is allocated here; a buffer smaller than that is refused.
#pragma once

#include <algorithm>
#include <array>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cells.h"
#include "common.h"
#include "plan.h"
#include "storage.h"

namespace tfcells {

// The forward inputs, as both passes read them. Optional ones may be null. T: the compute type,
// which the weights, the dropout masks and the training cache have; S: the storage type of the
// sequences and states (storage.h: bfloat16 or float16 with T = float; otherwise S = T).
template <typename T, typename S = T>
struct InputPointers {
  const S* x = nullptr;                 // [B,T,I] ([T,B,I] if time_major)
  const S* h0 = nullptr;                // [B,H]
  const S* c0 = nullptr;                // [B,H], LSTM only
  const T* kernel = nullptr;            // [I, G*H]
  const T* recurrent_kernel = nullptr;  // [H, G*H]
  const T* bias = nullptr;              // optional: [bias_rows, G*H]
  const bool* mask = nullptr;           // optional: [B,T] ([T,B] if time_major)
  // Optional dropout, as Keras applies it while training: at every step gate g reads
  // x ⊙ input_dropout[g] and h_prev ⊙ recurrent_dropout[g] ([G,B,I] and [G,B,H]: one mask
  // row per batch entry for all steps, holding 0 or 1/(1-rate)).
  const T* input_dropout = nullptr;
  const T* recurrent_dropout = nullptr;
};

template <typename T, typename S = T>
struct ForwardArgs {
  const CallPlan* plan = nullptr;
  InputPointers<T, S> in;
  S* y = nullptr;       // [B,T,H] ([T,B,H]), in processing order
  S* h_last = nullptr;  // [B,H]
  S* c_last = nullptr;  // [B,H], LSTM only
  // Training cache (plan.Cache()), laid out like x; empty for inference.
  Span<T> gates, aux, h_prev;
  Span<T> workspace;  // plan.forward_layout().total elements
};

template <typename T, typename S = T>
struct BackwardArgs {
  const CallPlan* plan = nullptr;
  InputPointers<T, S> in;
  Span<const T> gates, aux, h_prev;  // the forward's training cache
  const S* y = nullptr;  // the forward's output, where the plan reads h_prev from it (NeedsY)
  const S* dy = nullptr;       // optional: gradient w.r.t. y
  const S* dh_last = nullptr;  // optional
  const S* dc_last = nullptr;  // optional, LSTM only
  // The gradients plan.grad_mask() names; the others' pointers may be null and are not touched.
  S *dx = nullptr, *dh0 = nullptr, *dc0 = nullptr;
  T *dkernel = nullptr, *drecurrent_kernel = nullptr, *dbias = nullptr;
  Span<T> workspace;  // plan.backward_layout().total elements
};

// Points the gradient of `bit` at `data` (of the gradient's type: S for dx, dh0, dc0, else T).
template <typename T, typename S>
void SetGradient(BackwardArgs<T, S>& a, GradBit bit, void* data) {
  switch (bit) {
    case kGradX: a.dx = static_cast<S*>(data); break;
    case kGradH0: a.dh0 = static_cast<S*>(data); break;
    case kGradC0: a.dc0 = static_cast<S*>(data); break;
    case kGradKernel: a.dkernel = static_cast<T*>(data); break;
    case kGradRecurrentKernel: a.drecurrent_kernel = static_cast<T*>(data); break;
    default: a.dbias = static_cast<T*>(data); break;
  }
}

// Whether a gradient has the storage type (the sequences' and states') or the compute type.
inline bool IsStateGradient(GradBit bit) {
  return bit == kGradX || bit == kGradH0 || bit == kGradC0;
}

// The units [begin, end) of every H-wide gate block that one shard of a step computes: all of
// them, unless the backend splits each step's units across its threads (ForShards).
struct Units {
  Index begin = 0, end = 0;
  Index Count() const { return end - begin; }
};

// What one step of a time loop multiplies, for the backend's choice of how to split the loop
// (ForShards): its flops over all rows, the bytes of the weights it reads, and whether its units
// may be split across threads (each gate's products and pointwise loop then read no other
// unit's results of the step).
struct StepWork {
  double flops = 0;
  Index weight_bytes = 0;
  bool units_may_split = false;
  // Scratch that each part of a split step needs for its own (dropout's masked copies of the
  // left operands, which every part reads whole): the backend's Scratch(planned, offset).
  Index part_scratch_bytes = 0;
};

TFCELLS_ISA_BEGIN

// StepOperand/StepGemm for a backend whose Gemm reads the operand where it lies (cuBLAS), and
// whose time loop is one shard (a GPU parallelises inside each step): a base class, Derived
// being the backend.
template <typename Derived>
struct InPlaceStepOperands {
  static constexpr Index kUnitAlign = 1;  // (units never split)
  template <typename F>
  void ForShards(Index rows, Index units, Index steps, const StepWork&, const F& fn) {
    for (Index s = 0; s < steps; ++s)
      fn(static_cast<Derived&>(*this), Index(0), rows, Units{0, units}, s, [] {});
  }
  template <typename T>
  struct Operand {
    bool trans;
    Index k, n;
    const T* w;
    Index ld;
  };
  template <typename T>
  Operand<T> StepOperand(bool trans, Index k, Index n, const T* w, Index ld) const {
    return {trans, k, n, w, ld};
  }
  template <typename T>
  void StepGemm(Index m, const T* a, Index lda, const Operand<T>& w, T beta, T* c, Index ldc) {
    static_cast<Derived&>(*this).Gemm(false, w.trans, m, w.n, w.k, a, lda, w.w, w.ld, beta, c,
                                      ldc);
  }
  // A shard's scratch: the plan's.
  template <typename T>
  T* Scratch(T* planned, Index /*offset*/) const {
    return planned;
  }
  // The plan's projection_steps, whatever the weights.
  template <typename T>
  Index ProjectionSteps(Index planned, Index /*weights*/) const {
    return planned;
  }
  // The same for the units `u` of each `block`-wide column block of op(W) only.
  template <typename T>
  void StepGemm(Index m, const T* a, Index lda, const Operand<T>& w, T beta, T* c, Index ldc,
                Index block, Units u) {
    if (u.Count() == block) return StepGemm(m, a, lda, w, beta, c, ldc);
    for (Index j = u.begin; j < w.n; j += block)  // column j of Wᵀ is row j of W
      static_cast<Derived&>(*this).Gemm(false, w.trans, m, u.Count(), w.k, a, lda,
                                        w.trans ? w.w + j * w.ld : w.w + j, w.ld, beta, c + j,
                                        ldc);
  }
};

namespace detail {

template <typename T>
struct CopyPoint {
  StepMatrix<T> dst;
  StepMatrix<const T> src;
  TFCELLS_HD void operator()(Index b, Index j) const { dst(b, j) = src(b, j); }
};

template <typename T>
struct ZeroOrCopyPoint {
  StepMatrix<T> dst;
  StepMatrix<const T> src;  // null: zeros
  TFCELLS_HD void operator()(Index b, Index j) const { dst(b, j) = src ? src(b, j) : T(0); }
};

// The same matrix from batch row b0 on (a shard's view).
template <typename T>
TFCELLS_HD StepMatrix<T> FromRow(StepMatrix<T> m, Index b0) {
  return m ? StepMatrix<T>(m.data + b0 * m.ld, m.ld) : m;
}

// dst = src ⊙ scale (or dst += src ⊙ scale) for one step's rows: the rows of a dropout mask
// from the shard's first row on (all of a sequence's rows: MaskedRows).
template <typename T>
struct ScaleRowsPoint {
  StepMatrix<T> dst;
  StepMatrix<const T> src, scale;
  bool accumulate;
  TFCELLS_HD void operator()(Index r, Index j) const {
    const T v = src(r, j) * scale(r, j);
    dst(r, j) = accumulate ? dst(r, j) + v : v;
  }
};

// f(b, begin + j): a pointwise functor run over one shard's units.
template <typename F>
struct UnitsFrom {
  F f;
  Index begin;
  TFCELLS_HD void operator()(Index b, Index j) const { f(b, begin + j); }
};

// f(b, j) for the n rows and the units `u` of [0, H).
template <typename Backend, typename F>
void ForEachUnit(Backend& sb, Index n, Index H, Units u, const F& f) {
  if (u.Count() == H) return sb.ForEach(n, H, f);
  sb.ForEach(n, u.Count(), UnitsFrom<F>{f, u.begin});
}

// C[:, gate blocks] = A·W for one step's n rows. Without dropout masks, one StepGemm with the
// whole operand; with them (mask(g): gate g's rows of width `width`), gate g multiplies its
// masked copy A ⊙ mask(g) (in `scratch`) by its own column block, gate_operands[g].
// Only the units `u` of each gate block are computed.
template <typename T, typename Backend, typename Operand, typename MaskOf>
void GateProducts(Backend& sb, Index n, Index width, StepMatrix<const T> a, const Operand& whole,
                  const Operand* gate_operands, int gates, Index H, Units u,
                  const MaskOf& mask, T* scratch, T* c, Index ldc) {
  if (!gate_operands) return sb.StepGemm(n, a.data, a.ld, whole, T(0), c, ldc, H, u);
  const StepMatrix<T> dropped = Plain(scratch, width);
  for (int g = 0; g < gates; ++g) {
    sb.ForEach(n, width, ScaleRowsPoint<T>{dropped, a, mask(g), false});
    sb.StepGemm(n, dropped.data, width, gate_operands[g], T(0), c + g * H, ldc, H, u);
  }
}

// Their transpose: C (+)= dG·Wᵀ, or with dropout masks Σ_g (dG_g·W_gᵀ) ⊙ mask(g) through
// `scratch` (gate g read A ⊙ mask(g), so its gradient w.r.t. A is masked the same way).
// Only the columns `u` of C are computed.
template <typename T, typename Backend, typename Operand, typename MaskOf>
void GateProductsGrad(Backend& sb, Index n, Index width, const T* dg, Index ld_dg,
                      const Operand& whole, const Operand* gate_operands, int gates, Index H,
                      Units u, const MaskOf& mask, T* scratch, StepMatrix<T> c,
                      bool accumulate) {
  if (!gate_operands)
    return sb.StepGemm(n, dg, ld_dg, whole, accumulate ? T(1) : T(0), c.data, c.ld, width, u);
  for (int g = 0; g < gates; ++g) {  // (the shards' columns of scratch are disjoint)
    sb.StepGemm(n, dg + g * H, ld_dg, gate_operands[g], T(0), scratch, width, width, u);
    ForEachUnit(sb, n, width, u,
                ScaleRowsPoint<T>{c, Plain<const T>(scratch, width), mask(g),
                                  accumulate || g > 0});
  }
}

// The mask column of time t; without a mask, every row reads the same `true`.
template <typename Backend>
StepMatrix<const bool> MaskAt(Backend& be, const bool* mask, const Dims& d, Index t) {
  return mask ? AtStep(mask, d, t, 1) : StepMatrix<const bool>(be.TrueFlag(), 0);
}

// Gate g's rows of a [G, B, width] dropout mask from batch row b0 on (null: no mask).
template <typename T>
StepMatrix<const T> DropoutRows(const T* masks, const Dims& d, Index width, int g, Index b0) {
  return masks ? StepMatrix<const T>(masks + (g * d.B + b0) * width, width)
               : StepMatrix<const T>();
}

inline void Require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("tfcells: " + what);
}

// A caller's buffer must hold what the plan sizes for it (caught in every build: the check is
// once per call).
template <typename T>
void RequireSize(const Span<T>& buffer, Index want, const char* name) {
  Require(buffer.size >= want && (want == 0 || buffer.data != nullptr),
          std::string(name) + " holds " + std::to_string(buffer.size) +
              " elements, but the call plan needs " + std::to_string(want));
}

// What both passes check before anything runs: a plan made for this backend, no optional input
// the plan does not know of (the workspace has no scratch for it), and the training cache at the
// plan's sizes.
template <typename Backend, typename Args>
void RequireBuffers(const Args& a) {
  Require(a.plan != nullptr, "no call plan");
  const CallOptions& o = a.plan->options();
  Require(o.input_projection == Backend::kInputProjection,
          "the call plan was made for another backend's input projection");
  Require((o.has_mask || !a.in.mask) && (o.has_bias || !a.in.bias) &&
              (o.has_input_dropout || !a.in.input_dropout) &&
              (o.has_recurrent_dropout || !a.in.recurrent_dropout),
          "an optional input is given that the call plan was made without");
  const CacheSizes cache = a.plan->Cache();
  RequireSize(a.gates, cache.gates, "the gates cache");
  RequireSize(a.aux, cache.aux, "the aux cache");
  RequireSize(a.h_prev, cache.h_prev, "the h_prev cache");
}

// The workspace segment s (null when empty).
template <typename T>
T* Carve(const Span<T>& workspace, const Segment& s) {
  return s.size ? workspace.data + s.offset : nullptr;
}

// The per-step products of one direction (x·W_x, h_prev·W_h, or their transposes), prepared
// once per sequence: the whole operand, or with dropout masks one operand per gate (W's column
// block g, multiplied by gate g's masked rows).
template <typename Operand, int kGates>
struct GateOperands {
  Operand whole;
  std::array<Operand, kGates> gate{};
  bool per_gate = false;
  int gates = kGates;

  // W [w_rows, ld] with `gates_used` column blocks of width H from its first column, as
  // op(W) = W (trans false) or Wᵀ. `used`: whether any step reads it (else prepared empty).
  template <typename Backend, typename T>
  GateOperands(Backend& be, bool trans, Index w_rows, Index H, int gates_used, const T* w,
               Index ld, bool dropout, bool used)
      : whole(trans ? be.StepOperand(true, gates_used * H, used && !dropout ? w_rows : 0, w, ld)
                    : be.StepOperand(false, w_rows, used && !dropout ? gates_used * H : 0, w,
                                     ld)),
        per_gate(dropout && used),
        gates(gates_used) {
    if (per_gate)
      for (int g = 0; g < gates; ++g)
        gate[g] = trans ? be.StepOperand(true, H, w_rows, w + g * H, ld)
                        : be.StepOperand(false, w_rows, H, w + g * H, ld);
  }
  const Operand* PerGate() const { return per_gate ? gate.data() : nullptr; }
};

// One step of the forward pass for one shard of batch rows: the views a cell's Forward reads
// (cells.h) and the products it runs.
template <typename T, typename Backend, typename Operands, typename Operand>
struct ForwardStep {
  using Value = T;
  Backend& sb;
  const Operands& w_h;    // the product gates' recurrent operands
  const Operand& w_cand;  // split_candidate: the candidate's recurrent operand
  StepMatrix<const T> h_dropout_rows[kMaxGates] = {};  // per gate, from the shard's first row
  T* dropped_h = nullptr;  // scratch for h_prev ⊙ one gate's mask
  Index n = 0, H = 0, GH = 0;
  Units units = {};          // the shard's units
  StepMatrix<T> gates = {};  // in: x·W_x at this step; out: activated gates
  T* rec = nullptr;        // the shard's [n, G*H] products (ld G*H)
  const T* bias = nullptr;
  StepMatrix<const T> h_prev = {}, aux_prev = {};
  StepMatrix<T> h = {}, aux = {}, h_next_cache = {};
  StepMatrix<const bool> mask = {};
  StepMatrix<const T> candidate_dropout = {};

  StepMatrix<const T> Rec(Index col = 0) const { return {rec + col, GH}; }
  template <typename F>
  void ForEach(const F& f) const {
    ForEachUnit(sb, n, H, units, f);
  }
  void Recurrent(T* out) const {
    GateProducts(sb, n, H, h_prev, w_h.whole, w_h.PerGate(), w_h.gates, H, units,
                 [&](int g) { return h_dropout_rows[g]; }, dropped_h, out, GH);
  }
  void Candidate(StepMatrix<const T> a, T* out) const {
    sb.StepGemm(n, a.data, a.ld, w_cand, T(0), out, GH);
  }
};

// One step of the backward pass for one shard of batch rows.
template <typename T, typename Backend, typename Operands, typename Operand>
struct BackwardStep {
  using Value = T;
  Backend& sb;
  const Operands& w_h_t;    // the product gates' recurrent operands, transposed
  const Operand& w_cand_t;  // split_candidate: the candidate's, transposed
  StepMatrix<const T> h_dropout_rows[kMaxGates] = {};
  T* step_product = nullptr;  // scratch for one gate's share of dh_prev
  Index n = 0, H = 0;
  Units units = {};  // the shard's units
  StepMatrix<const T> gates = {}, aux = {}, aux_prev = {}, h_prev = {}, dy = {};
  StepMatrix<const bool> mask = {};
  StepMatrix<T> dgates = {}, dgates_rec = {}, dh = {}, dc = {}, d_reset = {};
  StepMatrix<T> db = {}, db_rec = {};  // the bias gradient's sums: rows 0 and 1 (or null)
  StepMatrix<const T> candidate_dropout = {};

  template <typename F>
  void ForEach(const F& f) const {
    ForEachUnit(sb, n, H, units, f);
  }
  // dh_prev += dG·W_hᵀ over the product gates, for the shard's units of dh_prev.
  void Carry(StepMatrix<const T> dg) const {
    GateProductsGrad(sb, n, H, dg.data, dg.ld, w_h_t.whole, w_h_t.PerGate(), w_h_t.gates, H,
                     units, [&](int g) { return h_dropout_rows[g]; }, step_product, dh, true);
  }
  void CandidateGrad(StepMatrix<const T> dg, StepMatrix<T> out) const {
    sb.StepGemm(n, dg.data, dg.ld, w_cand_t, T(0), out.data, out.ld);
  }
};

// How many steps' products by W_x run back to back, forward (x_t·W_x ahead of the recurrence)
// and backward (dx_t behind it): the plan's projection_steps where the backend takes them.
template <typename T, typename Backend>
Index ProjectionGroup(const Backend& be, const CallPlan& plan) {
  const Dims& d = plan.dims();
  const Index GH = plan.info().gates * d.H;
  return be.template ProjectionSteps<T>(plan.options().projection_steps, (d.I + d.H) * GH);
}

// A shard's views of the call's buffers: from batch row b0 on.
template <typename T>
struct ShardViews {
  const Dims& d;
  Index b0;

  // A sequence buffer at input time t (or processing step t of y, dy).
  template <typename U>
  StepMatrix<U> At(U* seq, Index t, Index width) const {
    return FromRow(AtStep(seq, d, t, width), b0);
  }
  // A [B, width] buffer (null stays null).
  template <typename U>
  StepMatrix<U> Plain(U* buf, Index width) const {
    return buf ? tfcells::Plain(buf + b0 * width, width) : StepMatrix<U>();
  }
  // Each gate's rows of a [G, B, width] dropout mask (null: no mask).
  void DropoutMasks(const T* masks, Index width, int gates, StepMatrix<const T>* out) const {
    for (int g = 0; g < gates; ++g) out[g] = DropoutRows(masks, d, width, g, b0);
  }
};

// Row r of a sequence buffer A [rows, width] scaled by gate g's dropout mask, element by element:
// row r belongs to batch entry (r / div) % B (div = T batch-major, 1 time-major). The left
// operand of a dropout weight gradient, dW[:, g] = (A ⊙ mask_g)ᵀ·dG_g, which the backend's
// MaskedGemms packs where its products read it; MaskRows writes it out whole.
template <typename T>
struct MaskedRows {
  const T* a;
  const T* mask;  // gate g's [B, width] mask
  Index width, div, B;
  // A as the states entering each step read from y (PrevStates): row r is y's row r - step (the
  // same batch entry a step earlier; step = B time-major, 1 batch-major), or at t = 0 the
  // entry's row of `first` (h0). Null: row r of a itself.
  const T* first = nullptr;
  Index step = 0, T_steps = 0;

  struct Row {  // one row: its values and its batch entry's mask row
    const T* a;
    const T* mask;
    TFCELLS_HD T operator()(Index j) const { return a[j] * mask[j]; }
  };
  // Row r, for a loop over its elements (found once: inside a simd loop the compiler would
  // find it again for every element).
  TFCELLS_HD Row RowAt(Index r) const {
    const Index b = (r / div) % B;
    const T* row = !first                      ? a + r * width
                   : (r / step) % T_steps == 0 ? first + b * width
                                               : a + (r - step) * width;
    return {row, mask + b * width};
  }
  TFCELLS_HD T operator()(Index r, Index j) const { return RowAt(r)(j); }
};

template <typename T>
MaskedRows<T> MaskedRowsOf(const Dims& d, Index width, const T* a, const T* masks, int g) {
  return {a, masks + g * d.B * width, width, d.time_major ? 1 : d.T, d.B};
}

// The states entering each step, h_prev, in input-time layout: the training cache's, or where
// the plan keeps none (CallPlan::HPrevFromY), y a step behind with h0 first. At reads one
// step's, Masked all of them under a dropout mask, Products multiplies them into dW_h.
template <typename T>
struct PrevStates {
  const Dims& d;
  const T* cache;  // null: read from y and h0
  const T* y;
  const T* h0;

  Index Step() const { return d.time_major ? d.B : 1; }  // rows to the entry's previous step
  template <typename Views>
  StepMatrix<const T> At(const Views& v, Index t) const {
    if (cache) return v.At(cache, t, d.H);
    return t == 0 ? v.Plain(h0, d.H) : v.At(y, t - 1, d.H);
  }
  // All rows under gate g's dropout mask (MaskedGemms' left operand).
  MaskedRows<T> Masked(const T* masks, int g) const {
    MaskedRows<T> m = MaskedRowsOf(d, d.H, cache ? cache : y, masks, g);
    if (!cache) m.first = h0, m.step = Step(), m.T_steps = d.T;
    return m;
  }
  // dW (β = 0) = h_prevᵀ·dG for the n columns of dG (ld ld_dg). From y: h0's product with the
  // first step's rows of dG, then y's rows with dG's rows a step later in one GEMM. Batch-major,
  // dG's row of batch entry b at t = 0 would then meet y's last step of entry b - 1: those rows
  // of the n columns are zeroed first, so this must be their last read.
  template <typename Backend>
  void Products(Backend& be, T* dg, Index ld_dg, Index n, T* dw, Index ldw) const {
    const Index H = d.H, B = d.B, rows = d.Rows();
    if (cache) return be.Gemm(true, false, H, n, rows, cache, H, dg, ld_dg, T(0), dw, ldw);
    const Index first_ld = d.time_major ? ld_dg : d.T * ld_dg;  // dG's rows at t = 0
    be.Gemm(true, false, H, n, B, h0, H, dg, first_ld, T(0), dw, ldw);
    if (d.T == 1) return;
    if (!d.time_major)
      be.ForEach(B - 1, n, ZeroOrCopyPoint<T>{StepMatrix<T>(dg + first_ld, first_ld), {}});
    be.Gemm(true, false, H, n, rows - Step(), y, H, dg + Step() * ld_dg, ld_dg, T(1), dw, ldw);
  }
};

// dst = (or +=) all rows of a sequence buffer scaled by gate g's dropout mask.
template <typename T, typename Backend>
void MaskRows(Backend& be, const Dims& d, Index width, const T* src, const T* masks, int g,
              T* dst, bool accumulate) {
  be.ForEach(d.Rows(), width,
             StoreViewPoint<T, MaskedRows<T>>{Plain(dst, width),
                                              MaskedRowsOf(d, width, src, masks, g), accumulate});
}

template <typename Cell, typename T, typename Backend>
void ForwardPass(Backend& be, const CallPlan& plan, const ForwardArgs<T>& a) {
  constexpr CellInfo info = Cell::kInfo;
  constexpr int G = info.gates;
  const Dims& d = plan.dims();
  const InputPointers<T>& in = a.in;
  const Index B = d.B, H = d.H, GH = G * H;
  const bool training = plan.training();
  if (B == 0 || H == 0) return;
  if (d.T == 0) {  // empty sequence: the initial state comes back
    be.ForEach(B, H, CopyPoint<T>{Plain(a.h_last, H), Plain(in.h0, H)});
    if (info.cell_state) be.ForEach(B, H, CopyPoint<T>{Plain(a.c_last, H), Plain(in.c0, H)});
    return;
  }

  const ForwardLayout& layout = plan.forward_layout();
  T* const recurrent = Carve(a.workspace, layout.recurrent);
  T* const state = Carve(a.workspace, layout.state);
  T* const dropped_x = Carve(a.workspace, layout.dropped_x);
  T* const dropped_h = Carve(a.workspace, layout.dropped_h);
  // The cells' functors read the bias unconditionally (cells.h): an absent one is read as zeros.
  T* const zero_bias = Carve(a.workspace, layout.zero_bias);
  if (zero_bias) be.ForEach(info.bias_rows, GH, ZeroOrCopyPoint<T>{Plain(zero_bias, GH), {}});
  const T* const bias = in.bias ? in.bias : zero_bias;
  Require(bias != nullptr, "the call plan was made with a bias, but none is given");
  const bool per_step = Backend::kInputProjection == InputProjection::kPerStep;
  const bool in_dropout = in.input_dropout != nullptr;
  const bool rec_dropout = in.recurrent_dropout != nullptr;
  // Where each step finds x_t·W_x: the gates cache (training, ProjectsIntoCache), or the
  // workspace (inference and GatesFromY: projection_steps slots in turn, or every step's).
  T* const gates_all = plan.ProjectsIntoCache() ? a.gates.data : nullptr;
  T* const projection = Carve(a.workspace, layout.input_projection);
  const Index ahead = ProjectionGroup<T>(be, plan);

  if (!per_step) {  // x·W_x for all T*B rows before the loop (per gate on masked copies)
    T* const out = gates_all ? gates_all : projection;
    if (!in_dropout) {
      be.Gemm(false, false, d.Rows(), GH, d.I, in.x, d.I, in.kernel, GH, T(0), out, GH);
    } else {
      for (int g = 0; g < G; ++g) {
        MaskRows(be, d, d.I, in.x, in.input_dropout, g, dropped_x, false);
        be.Gemm(false, false, d.Rows(), H, d.I, dropped_x, d.I, in.kernel + g * H, GH, T(0),
                out + g * H, GH);
      }
    }
  }
  using Operand = decltype(be.StepOperand(false, d.I, 0, in.kernel, GH));
  const GateOperands<Operand, G> w_x(be, false, d.I, H, G, in.kernel, GH, in_dropout, per_step);
  // The recurrent kernel as every step's GEMM reads it; a split candidate's columns (the last
  // gate block) run apart, on r * h_prev.
  constexpr int product_gates = info.split_candidate ? G - 1 : G;
  const GateOperands<Operand, G> w_h(be, false, H, H, product_gates, in.recurrent_kernel, GH,
                                     rec_dropout, true);
  const Operand w_cand = be.StepOperand(false, H, info.split_candidate ? H : 0,
                                        in.recurrent_kernel + product_gates * H, GH);

  // The h_prev cache, where the plan keeps one: h0, then each step's h (h_next_cache).
  T* const h_prev_cache = plan.Cache().h_prev ? a.h_prev.data : nullptr;
  if (h_prev_cache)
    be.ForEach(B, H, CopyPoint<T>{AtStep(h_prev_cache, d, d.InputTime(0), H), Plain(in.h0, H)});

  // Step s for batch rows [b0, b1) and the units `u` of each gate block (every matrix below is
  // that shard's view); wait() returns once every shard has finished step s - 1.
  auto run_step = [&](Backend& sb, Index b0, Index b1, Units u, Index s, const auto& wait) {
    const Index n = b1 - b0;
    const ShardViews<T> v{d, b0};
    auto at = [&](auto* seq, Index t, Index width) { return v.At(seq, t, width); };
    auto plain = [&](auto* buf, Index width) { return v.Plain(buf, width); };
    ForwardStep<T, Backend, decltype(w_h), Operand> step{
        sb, w_h, w_cand, {}, sb.Scratch(plain(dropped_h, H).data, B * d.I), n, H, GH, u};
    v.DropoutMasks(in.recurrent_dropout, H, G, step.h_dropout_rows);
    step.rec = recurrent + b0 * GH;
    step.bias = bias;
    step.candidate_dropout = step.h_dropout_rows[G - 1];
    // State kept per step besides h: the cache when training, else alternating slots.
    auto aux_at = [&](Index s) -> StepMatrix<T> {
      if (training && Cell::kInfo.aux != Aux::kNone) return at(a.aux.data, d.InputTime(s), H);
      if (!training && Cell::kInfo.aux == Aux::kState) return plain(state + (s & 1) * B * H, H);
      return {};
    };
    auto projected = [&](Index s2) {
      const Index t2 = d.InputTime(s2);
      return gates_all  ? at(gates_all, t2, GH)
             : per_step ? plain(projection + s2 % ahead * B * GH, GH)
                        : at(projection, t2, GH);
    };
    const Index t = d.InputTime(s);
    step.gates = projected(s);
    // Per step: the shard's x_t·W_x of projection_steps steps at once, at the first of them.
    for (Index s2 = s; per_step && s % ahead == 0 && s2 < std::min(d.T, s + ahead); ++s2) {
      const StepMatrix<T> out = projected(s2);
      GateProducts(sb, n, d.I, at(in.x, d.InputTime(s2), d.I), w_x.whole, w_x.PerGate(), G, H,
                   u, [&](int g) { return DropoutRows(in.input_dropout, d, d.I, g, b0); },
                   sb.Scratch(plain(dropped_x, d.I).data, 0), out.data, out.ld);
    }
    wait();
    step.h_prev = s == 0 ? plain(in.h0, H) : StepMatrix<const T>(at(a.y, s - 1, H));
    step.h = at(a.y, s, H);
    step.mask = FromRow(MaskAt(sb, in.mask, d, t), b0);
    step.h_next_cache = (h_prev_cache && s + 1 < d.T) ? at(h_prev_cache, d.InputTime(s + 1), H)
                                                      : StepMatrix<T>();
    step.aux = aux_at(s);
    step.aux_prev = !Cell::kInfo.cell_state ? StepMatrix<const T>()
                    : s == 0       ? plain(in.c0, H)
                                   : StepMatrix<const T>(aux_at(s - 1));
    Cell::Forward(step);
  };
  // The units of a step may be split across threads, but for a split candidate (whose GEMM
  // reads every unit's r * h_prev) and a backend that projects x before the loop. With dropout
  // each part masks x_t and h_prev whole for itself, in its own scratch.
  const Index step_weights = ((per_step ? d.I : 0) + H) * GH;
  be.ForShards(B, H, d.T,
               StepWork{2.0 * B * step_weights, step_weights * Index(sizeof(T)),
                        !info.split_candidate && per_step,
                        in_dropout || rec_dropout ? B * (d.I + H) * Index(sizeof(T)) : 0},
               run_step);
  be.ForEach(B, H, CopyPoint<T>{Plain(a.h_last, H), AtStep(a.y, d, d.T - 1, H)});
  if (info.cell_state) {
    const StepMatrix<T> c_final = training ? AtStep(a.aux.data, d, d.InputTime(d.T - 1), H)
                                           : Plain(state + ((d.T - 1) & 1) * B * H, H);
    be.ForEach(B, H, CopyPoint<T>{Plain(a.c_last, H), c_final});
  }
}

template <typename Cell, typename T, typename Backend>
void BackwardPass(Backend& be, const CallPlan& plan, const BackwardArgs<T>& a) {
  constexpr CellInfo info = Cell::kInfo;
  constexpr int G = info.gates;
  const Dims& d = plan.dims();
  const InputPointers<T>& in = a.in;
  const Index B = d.B, H = d.H, GH = G * H, rows = d.Rows();
  const int m = plan.grad_mask();
  if (d.T == 0 || B == 0 || H == 0) {  // no step ran: the initial state is the final state
    if (m & kGradH0)
      be.ForEach(B, H, ZeroOrCopyPoint<T>{Plain(a.dh0, H), Plain(a.dh_last, H)});
    if (m & kGradC0)
      be.ForEach(B, H, ZeroOrCopyPoint<T>{Plain(a.dc0, H), Plain(a.dc_last, H)});
    // With no steps (or no units), no gradient reaches x or the weights.
    if (m & kGradX) be.ForEach(rows, d.I, ZeroOrCopyPoint<T>{Plain(a.dx, d.I), {}});
    if (m & kGradKernel) be.ForEach(d.I, GH, ZeroOrCopyPoint<T>{Plain(a.dkernel, GH), {}});
    if (m & kGradRecurrentKernel)
      be.ForEach(H, GH, ZeroOrCopyPoint<T>{Plain(a.drecurrent_kernel, GH), {}});
    if (m & kGradBias) be.ForEach(info.bias_rows, GH, ZeroOrCopyPoint<T>{Plain(a.dbias, GH), {}});
    return;
  }

  const BackwardLayout& layout = plan.backward_layout();
  const bool keep_all = plan.KeepsAllGateGrads();
  const bool keep_all_rec = m & kGradRecurrentKernel;
  T* const dgates_all = Carve(a.workspace, layout.dgates);
  T* const dgates_rec_all = Carve(a.workspace, layout.dgates_rec);
  // db: each batch row's gate gradients summed over the steps in the loop (in cache), then the
  // rows summed in order, so the result does not depend on how the rows are sharded.
  const bool want_db = m & kGradBias;
  T* const bias_sums = Carve(a.workspace, layout.bias_sums);
  T* const dh = Carve(a.workspace, layout.dh);
  T* const dc = Carve(a.workspace, layout.dc);
  T* const d_reset = Carve(a.workspace, layout.d_reset);
  T* const masked_rows = Carve(a.workspace, layout.masked_rows);
  T* const step_product = Carve(a.workspace, layout.step_product);
  T* const step_dx = Carve(a.workspace, layout.step_dx);
  // The states entering each step: the cache's, or y's a step behind (the plan says which).
  const PrevStates<T> prev{d, plan.HPrevFromY() ? nullptr : a.h_prev.data, a.y, in.h0};
  // An absent dy is read as zeros (one row, ld 0), unconditionally, as the forward's bias.
  T* const zero_row = Carve(a.workspace, layout.zero_row);
  be.ForEach(1, H, ZeroOrCopyPoint<T>{Plain(zero_row, H), {}});
  const bool per_step = Backend::kInputProjection == InputProjection::kPerStep;
  const bool in_dropout = in.input_dropout != nullptr;
  const bool rec_dropout = in.recurrent_dropout != nullptr;

  // The recurrent kernel, transposed, as the GEMM carrying dh to the previous step reads it
  // (only the first processed step carries nothing when dh0 is not wanted).
  const bool carries = d.T > 1 || (m & kGradH0);
  constexpr int product_gates = info.split_candidate ? G - 1 : G;
  using Operand = decltype(be.StepOperand(true, H, 0, in.recurrent_kernel, GH));
  const GateOperands<Operand, G> w_h_t(be, true, H, H, product_gates, in.recurrent_kernel, GH,
                                       rec_dropout, carries);
  const Operand w_cand_t = be.StepOperand(true, H, info.split_candidate ? H : 0,
                                          in.recurrent_kernel + product_gates * H, GH);
  const bool want_dx = m & kGradX;
  const GateOperands<Operand, G> w_x_t(be, true, d.I, H, G, in.kernel, GH, in_dropout,
                                       want_dx && per_step);

  // The gate gradients of processing step s: every step's where a GEMM after the loop reads
  // them, else rotating slots: two (a shard may write step s's while another still reads step
  // s + 1's), or with per-step dx one more than the projection_steps steps whose dx runs at once.
  const Index ahead = ProjectionGroup<T>(be, plan);
  auto dgates_at = [&](T* all, bool keep, Index s) {
    if (!all || keep) return AtStep(all, d, d.InputTime(s), GH);
    const Index slots = want_dx && per_step && all == dgates_all ? ahead + 1 : 2;
    return Plain(all + s % slots * B * GH, GH);
  };
  // Part k = 0..T of the backward loop, for batch rows [b0, b1) and the units `u` (every
  // matrix is that shard's view): first what processing step s + 1 (s = T - 1 - k) has left,
  // which reads every unit's gate gradients of that step (wait(): every shard has finished part
  // k - 1): the carry dh_prev += dG·W_hᵀ and dx_t = dG_t·W_xᵀ, for the shard's units of dh_prev
  // and its share of dx's columns, and db's sums; then the pointwise backward of step s.
  const bool gates_from_y = plan.GatesFromY();
  auto run_step = [&](Backend& sb, Index b0, Index b1, Units u, Index k, const auto& wait) {
    const Index n = b1 - b0, s = d.T - 1 - k;
    const ShardViews<T> v{d, b0};
    auto at = [&](auto* seq, Index t, Index width) { return v.At(seq, t, width); };
    auto plain = [&](auto* buf, Index width) { return v.Plain(buf, width); };
    auto shard = [&](StepMatrix<T> m) { return FromRow(m, b0); };
    BackwardStep<T, Backend, decltype(w_h_t), Operand> step{
        sb, w_h_t, w_cand_t, {}, plain(step_product, H).data, n, H, u};
    v.DropoutMasks(in.recurrent_dropout, H, G, step.h_dropout_rows);
    step.candidate_dropout = step.h_dropout_rows[G - 1];
    step.dh = plain(dh, H);
    step.dc = plain(dc, H);
    step.d_reset = plain(d_reset, H);
    wait();
    if (k > 0) {
      const StepMatrix<T> dg = shard(dgates_at(dgates_all, keep_all, s + 1));
      const StepMatrix<T> dg_rec = shard(dgates_at(dgates_rec_all, keep_all_rec, s + 1));
      // At the first processed step (s + 1 == 0) the carry only serves dh0.
      if (s + 1 > 0 || (m & kGradH0)) step.Carry(Cell::kInfo.recurrent_gate_grads ? dg_rec : dg);
      // Per step: dx_t = dG_t·W_xᵀ of the projection_steps steps from s + 1 on, at the last
      // of them to be processed (s + 1); the columns in proportion to u's units.
      auto column = [&](Index unit) {
        return unit == H ? d.I : d.I * unit / H / Backend::kUnitAlign * Backend::kUnitAlign;
      };
      for (Index s2 = s + 1; want_dx && per_step && (s + 1) % ahead == 0 &&
                             s2 < std::min(d.T, s + 1 + ahead);
           ++s2) {
        const StepMatrix<T> dg2 = shard(dgates_at(dgates_all, keep_all, s2));
        GateProductsGrad(sb, n, d.I, dg2.data, dg2.ld, w_x_t.whole, w_x_t.PerGate(), G, H,
                         Units{column(u.begin), column(u.end)},
                         [&](int g) { return DropoutRows(in.input_dropout, d, d.I, g, b0); },
                         plain(step_dx, d.I).data, at(a.dx, d.InputTime(s2), d.I), false);
      }
    }
    if (s < 0) return;
    if (k == 0) {
      step.ForEach(ZeroOrCopyPoint<T>{step.dh, plain(a.dh_last, H)});
      if (Cell::kInfo.cell_state) step.ForEach(ZeroOrCopyPoint<T>{step.dc, plain(a.dc_last, H)});
      for (Index r = 0; want_db && r < Cell::kInfo.bias_rows; ++r)
        for (int g = r > 0 ? Cell::kInfo.shared_bias_gates : 0; g < G; ++g)
          step.ForEach(ZeroOrCopyPoint<T>{plain(bias_sums + r * B * GH + g * H, GH), {}});
    }
    const Index t = d.InputTime(s);
    step.dgates = shard(dgates_at(dgates_all, keep_all, s));
    step.dgates_rec = shard(dgates_at(dgates_rec_all, keep_all_rec, s));
    // (GatesFromY: y's row of processing step s, the state the gate became)
    step.gates = gates_from_y ? StepMatrix<const T>(at(a.y, s, H)) : at(a.gates.data, t, GH);
    step.aux = at(a.aux.data, t, H);
    step.aux_prev = Cell::kInfo.cell_state
                        ? (s == 0 ? plain(in.c0, H) : at(a.aux.data, d.InputTime(s - 1), H))
                        : StepMatrix<const T>();
    if (plan.ReadsHPrev()) step.h_prev = prev.At(v, t);  // (else the cell never reads it)
    step.dy = a.dy ? at(a.dy, s, H) : StepMatrix<const T>(zero_row, 0);
    step.mask = FromRow(MaskAt(sb, in.mask, d, t), b0);
    // db: the cell's pointwise pass adds the shard's units of every gate's gradients to the
    // batch rows' sums as it computes them.
    if (want_db) {
      step.db = plain(bias_sums, GH);
      if (Cell::kInfo.bias_rows > 1) step.db_rec = plain(bias_sums + B * GH, GH);
    }
    Cell::Backward(step);
  };
  // The units of a step may be split across threads, but for a split candidate (whose second
  // pointwise phase reads every unit's first).
  const Index step_weights = ((want_dx && per_step ? d.I : 0) + H) * GH;
  be.ForShards(B, H, d.T + 1,
               StepWork{2.0 * B * step_weights, step_weights * Index(sizeof(T)),
                        !info.split_candidate},
               run_step);

  if (m & kGradH0) {
    be.ForEach(B, H, CopyPoint<T>{Plain(a.dh0, H), Plain(dh, H)});
    CountWork(kGradH0Work);
  }
  if (m & kGradC0) be.ForEach(B, H, CopyPoint<T>{Plain(a.dc0, H), Plain(dc, H)});
  // Gradients of the input-side pre-activations, and of the recurrent-side ones.
  const T* dg_in = dgates_all;
  T* const dg_rec = info.recurrent_gate_grads ? dgates_rec_all : dgates_all;
  if (want_dx) {
    if (!per_step) {  // dx = dG·W_xᵀ over all rows, or Σ_g (dG_g·W_gᵀ) ⊙ mx_g
      if (!in_dropout) {
        be.Gemm(false, true, rows, d.I, GH, dg_in, GH, in.kernel, GH, T(0), a.dx, d.I);
      } else {
        for (int g = 0; g < G; ++g) {
          be.Gemm(false, true, rows, d.I, H, dg_in + g * H, GH, in.kernel + g * H, GH, T(0),
                  masked_rows, d.I);
          MaskRows(be, d, d.I, static_cast<const T*>(masked_rows), in.input_dropout, g, a.dx,
                   g > 0);
        }
      }
    }
    CountWork(kGradXWork);
  }
  // The weight gradients. With dropout, gate g's columns multiply its masked rows,
  // dW_x[:, g] = (x ⊙ mx_g)ᵀ·dG_g and dW_h[:, g] = (h_prev ⊙ mh_g)ᵀ·dG_g, all in one call, so
  // that a backend may read each row of x, h_prev and dG once for every gate and both products.
  const bool want_dw_x = m & kGradKernel, want_dw_h = m & kGradRecurrentKernel;
  const bool dw_x_by_gate = want_dw_x && in_dropout, dw_h_by_gate = want_dw_h && rec_dropout;
  if (dw_x_by_gate || dw_h_by_gate) {
    auto x_rows = [&](int g) { return MaskedRowsOf(d, d.I, in.x, in.input_dropout, g); };
    auto h_rows = [&](int g) { return prev.Masked(in.recurrent_dropout, g); };
    be.MaskedGemms(H, rows,
                   MaskedProducts<T, decltype(x_rows)>{d.I, dw_x_by_gate ? G : 0, x_rows, dg_in,
                                                       GH, a.dkernel, GH},
                   MaskedProducts<T, decltype(h_rows)>{H, dw_h_by_gate ? product_gates : 0,
                                                       h_rows, dg_rec, GH,
                                                       a.drecurrent_kernel, GH},
                   masked_rows);
  }
  if (want_dw_x && !dw_x_by_gate)
    be.Gemm(true, false, d.I, GH, rows, in.x, d.I, dg_in, GH, T(0), a.dkernel, GH);
  if (want_dw_h && !dw_h_by_gate)  // (after every other read of dG: from y it zeroes rows)
    prev.Products(be, dg_rec, GH, product_gates * H, a.drecurrent_kernel, GH);
  if (want_dw_h && info.split_candidate)  // the candidate's GEMM took r * h_prev (⊙ mh), in aux
    be.Gemm(true, false, H, H, rows, a.aux.data, H, dg_rec + product_gates * H, GH, T(0),
            a.drecurrent_kernel + product_gates * H, GH);
  if (want_dw_x) CountWork(kGradKernelWork);
  if (want_dw_h) CountWork(kGradRecurrentKernelWork);
  if (want_db) {
    be.ColumnSum(B, GH, bias_sums, GH, a.dbias);
    if (info.bias_rows > 1) {  // row 1: its own columns summed, the shared gates' copied
      const Index shared = info.shared_bias_gates * H;
      be.ColumnSum(B, GH - shared, bias_sums + B * GH + shared, GH, a.dbias + GH + shared);
      be.ForEach(1, shared, CopyPoint<T>{Plain(a.dbias + GH, shared), Plain(a.dbias, shared)});
    }
    CountWork(kGradBiasWork);
  }
}

// The storage type's tag in CallOptions.
template <typename S>
constexpr Storage StorageOf() {
  if constexpr (std::is_same_v<S, bfloat16>) return Storage::kBFloat16;
  if constexpr (std::is_same_v<S, float16>) return Storage::kFloat16;
  return Storage::kCompute;
}

// dst = src widened to the compute type, or rounded to the storage type.
template <typename To, typename From>
struct ConvertPoint {
  StepMatrix<To> dst;
  StepMatrix<const From> src;
  TFCELLS_HD void operator()(Index r, Index j) const {
    if constexpr (std::is_same_v<To, float>) {
      dst(r, j) = ToFloat(src(r, j));
    } else {
      dst(r, j) = FromFloat<To>(src(r, j));
    }
  }
};

// Converts the [rows, cols] matrix src into dst and returns dst; null (nothing converted) when
// there is no src or no dst (an absent input, an empty tensor, a gradient not asked for).
template <typename To, typename From, typename Backend>
To* Converted(Backend& be, Index rows, Index cols, const From* src, To* dst) {
  if (src == nullptr || dst == nullptr) return nullptr;
  be.ForEach(rows, cols, ConvertPoint<To, From>{Plain(dst, cols), Plain(src, cols)});
  return dst;
}

// The inputs in the compute type: x, h0 and c0 widened into their staged copies (each only
// where the plan stages it), the others as they are.
template <typename T, typename S, typename Backend>
InputPointers<T> WidenedInputs(Backend& be, const Dims& d, const InputPointers<T, S>& in,
                               const Span<T>& workspace, const StagedTensors& st) {
  return {Converted(be, d.Rows(), d.I, in.x, Carve(workspace, st.x)),
          Converted(be, d.B, d.H, in.h0, Carve(workspace, st.h0)),
          Converted(be, d.B, d.H, in.c0, Carve(workspace, st.c0)),
          in.kernel, in.recurrent_kernel, in.bias, in.mask, in.input_dropout,
          in.recurrent_dropout};
}

// 16-bit storage: the pass runs in the compute type on staged copies (the plan's
// StagedTensors): the tensors it reads widened first, the ones it writes rounded last.
template <typename T, typename S, typename Backend>
void StagedForward(Backend& be, const CallPlan& plan, const ForwardArgs<T, S>& a) {
  const Dims& d = plan.dims();
  const StagedTensors& st = plan.forward_layout().staged;
  const Index rows = d.Rows(), B = d.B, H = d.H;
  ForwardArgs<T> w;
  w.plan = a.plan;
  w.in = WidenedInputs(be, d, a.in, a.workspace, st);
  w.y = Carve(a.workspace, st.y);
  w.h_last = Carve(a.workspace, st.h_last);
  w.c_last = Carve(a.workspace, st.c_last);
  w.gates = a.gates, w.aux = a.aux, w.h_prev = a.h_prev;
  w.workspace = a.workspace;  // the pass carves its own segments, disjoint from the staged ones
  VisitCell(plan.cell(), [&](auto cell) { ForwardPass<decltype(cell)>(be, plan, w); });
  Converted(be, rows, H, static_cast<const T*>(w.y), a.y);
  Converted(be, B, H, static_cast<const T*>(w.h_last), a.h_last);
  Converted(be, B, H, static_cast<const T*>(w.c_last), a.c_last);
}

template <typename T, typename S, typename Backend>
void StagedBackward(Backend& be, const CallPlan& plan, const BackwardArgs<T, S>& a) {
  const Dims& d = plan.dims();
  const StagedTensors& st = plan.backward_layout().staged;
  const Index rows = d.Rows(), B = d.B, H = d.H;
  BackwardArgs<T> w;
  w.plan = a.plan;
  w.in = WidenedInputs(be, d, a.in, a.workspace, st);  // no h0: it reads the h_prev cache
  w.gates = a.gates, w.aux = a.aux, w.h_prev = a.h_prev;
  w.dy = Converted(be, rows, H, a.dy, Carve(a.workspace, st.dy));
  w.dh_last = Converted(be, B, H, a.dh_last, Carve(a.workspace, st.dh_last));
  w.dc_last = Converted(be, B, H, a.dc_last, Carve(a.workspace, st.dc_last));
  w.dx = Carve(a.workspace, st.dx);
  w.dh0 = Carve(a.workspace, st.dh0);
  w.dc0 = Carve(a.workspace, st.dc0);
  w.dkernel = a.dkernel, w.drecurrent_kernel = a.drecurrent_kernel, w.dbias = a.dbias;
  w.workspace = a.workspace;
  VisitCell(plan.cell(), [&](auto cell) { BackwardPass<decltype(cell)>(be, plan, w); });
  Converted(be, rows, d.I, static_cast<const T*>(w.dx), a.dx);
  Converted(be, B, H, static_cast<const T*>(w.dh0), a.dh0);
  Converted(be, B, H, static_cast<const T*>(w.dc0), a.dc0);
}

}  // namespace detail

template <typename T, typename S, typename Backend>
void Forward(Backend& be, const ForwardArgs<T, S>& a) {
  detail::RequireBuffers<Backend>(a);
  const CallPlan& plan = *a.plan;
  detail::Require(plan.options().storage == detail::StorageOf<S>(),
                  "the call plan was made for another storage type");
  detail::RequireSize(a.workspace, plan.forward_layout().total, "the forward workspace");
  CountWork(kForwardCalls);
  if constexpr (std::is_same_v<T, S>) {
    VisitCell(plan.cell(), [&](auto cell) { detail::ForwardPass<decltype(cell)>(be, plan, a); });
  } else {
    detail::StagedForward(be, plan, a);
  }
}

template <typename T, typename S, typename Backend>
void Backward(Backend& be, const BackwardArgs<T, S>& a) {
  detail::RequireBuffers<Backend>(a);
  const CallPlan& plan = *a.plan;
  detail::Require(plan.training(), "a backward pass needs a training call plan");
  detail::Require(a.y != nullptr || !plan.NeedsY() || plan.dims().Rows() * plan.dims().H == 0,
                  "the backward pass needs the forward's y (the plan reads states from it)");
  detail::Require(plan.options().storage == detail::StorageOf<S>(),
                  "the call plan was made for another storage type");
  detail::RequireSize(a.workspace, plan.backward_layout().total, "the backward workspace");
  CountWork(kBackwardCalls);
  if constexpr (std::is_same_v<T, S>) {
    VisitCell(plan.cell(), [&](auto cell) { detail::BackwardPass<decltype(cell)>(be, plan, a); });
  } else {
    detail::StagedBackward(be, plan, a);
  }
}

TFCELLS_ISA_END

}  // namespace tfcells
