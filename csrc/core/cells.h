// Each cell in one place: the pointwise math (one functor per direction and phase, called once
// per batch row b and unit j), and at the end of this file one struct per cell holding its
// CellInfo and one step of its forward and backward recurrence, written against the driver's
// step context (rnn.h). Every device runs these same functors; only the loop around them
// (csrc/core/cpu, csrc/cuda) differs.
//
// Gate layouts follow Keras: LSTM columns [i | f | c | o], GRU columns [z | r | h], each H wide.
// A masked row (mask false) keeps the previous state and passes its gradients straight through.
//
// The functors read every operand unconditionally, before any select: a read under a condition
// vectorises into a masked load (with them, the LSTM's forward pointwise step measured 1.4x
// slower on Zen 1). For the same reason the bias and dy are never null: the driver substitutes zeros.
#pragma once

#include "activations.h"
#include "common.h"

namespace tfcells {
TFCELLS_ISA_BEGIN

// A pointwise functor touches several rows that are not in cache: the forward writes the
// training cache and y (and reads x·W_x, written steps before), the backward reads that cache
// back and writes every step's gate gradients. Each is a stream of only H elements per row,
// several per row: too short for the hardware prefetchers to pick up, and the loads stalled
// (perf). So each functor names those lines in Prefetch(b, j) (columns j .. j +
// kPrefetchColumns - 1 of row b, one cache line of each view), and the CPU loop (cpu_backend.h,
// ForEachRow) asks for the next row's lines while it computes a row; the GPU has no use for it.
template <typename T>
constexpr Index kCacheLineColumns = Index{64} / Index{sizeof(T)};

// Whether row b takes this step. Kept as a comparison of T values, not a bool, so that the
// selects below vectorise on the CPU; every functor computes both outcomes and selects, which
// keeps the loops branch-free (and a NaN in the unused outcome never leaks through a select).
// `mask` is never null: the driver substitutes an all-true row (ld 0) when there is no mask.
template <typename T>
TFCELLS_HD bool RowActive(const StepMatrix<const bool>& mask, Index b) {
  const T keep = mask(b, 0) ? T(1) : T(0);
  return keep != T(0);
}

// An optional dropout mask: absent means 1.
template <typename T>
TFCELLS_HD T ScaleAt(const StepMatrix<const T>& m, Index b, Index j) {
  return m ? m(b, j) : T(1);
}

// The bias gradient's running sums (rnn.h: one row per batch row, summed over the steps),
// added to in the pass that computes each gate gradient rather than in a pass of their own;
// null where the call wants no bias gradient.
template <typename T>
TFCELLS_HD void AddToSum(const StepMatrix<T>& sums, Index b, Index j, T v) {
  if (sums) sums(b, j) += v;
}

// ----------------------------------------------------------------------------------- LSTM
template <typename T>
struct LstmForwardPoint {
  StepMatrix<T> gates;            // in: x·W_x at this step; out: activated i, f, c, o
  StepMatrix<const T> rec;        // h_prev·W_h
  const T* bias;                  // [4H] (zeros when the call has none)
  StepMatrix<const T> h_prev, c_prev;
  StepMatrix<const bool> mask;
  StepMatrix<T> h, c;             // new state
  StepMatrix<T> h_next_cache;     // copy of h for the next step's h_prev cache (or null)
  Index H;

  TFCELLS_HD void operator()(Index b, Index j) const {
    const bool active = RowActive<T>(mask, b);
    const T i = Sigmoid(gates(b, j) + rec(b, j) + bias[j]);
    const T f = Sigmoid(gates(b, H + j) + rec(b, H + j) + bias[H + j]);
    const T g = Tanh(gates(b, 2 * H + j) + rec(b, 2 * H + j) + bias[2 * H + j]);
    const T o = Sigmoid(gates(b, 3 * H + j) + rec(b, 3 * H + j) + bias[3 * H + j]);
    const T c_old = c_prev(b, j), h_old = h_prev(b, j);
    const T c_step = f * c_old + i * g;
    const T c_new = active ? c_step : c_old;
    const T h_new = active ? o * Tanh(c_step) : h_old;
    gates(b, j) = i;
    gates(b, H + j) = f;
    gates(b, 2 * H + j) = g;
    gates(b, 3 * H + j) = o;
    c(b, j) = c_new;
    h(b, j) = h_new;
    if (h_next_cache) h_next_cache(b, j) = h_new;
  }
  static constexpr Index kPrefetchColumns = kCacheLineColumns<T>;
  TFCELLS_HD void Prefetch(Index b, Index j) const {
    for (Index g = 0; g < 4; ++g) PrefetchLine(gates, b, g * H + j);
    PrefetchLine(c, b, j);
    PrefetchLine(h, b, j);
  }
};

template <typename T>
struct LstmBackwardPoint {
  StepMatrix<const T> gates, c, c_prev, dy;
  StepMatrix<const bool> mask;
  StepMatrix<T> dgates;  // out: gradient of the gate pre-activations
  StepMatrix<T> dh, dc;  // in: gradient w.r.t. this step's h, c; out: the part of the
                         // gradient w.r.t. h_prev, c_prev that bypasses the recurrent GEMM
  StepMatrix<T> db;      // bias gradient sums (AddToSum)
  Index H;

  TFCELLS_HD void operator()(Index b, Index j) const {
    const bool active = RowActive<T>(mask, b);
    const T dh_total = dh(b, j) + dy(b, j);
    const T i = gates(b, j), f = gates(b, H + j), g = gates(b, 2 * H + j),
            o = gates(b, 3 * H + j);
    const T tc = Tanh(c(b, j));
    const T dc_in = dc(b, j), c_old = c_prev(b, j);
    const T dc_total = dc_in + dh_total * o * TanhGradFromOutput(tc);
    const T di = active ? dc_total * g * SigmoidGradFromOutput(i) : T(0);
    const T df = active ? dc_total * c_old * SigmoidGradFromOutput(f) : T(0);
    const T dg = active ? dc_total * i * TanhGradFromOutput(g) : T(0);
    const T d_o = active ? dh_total * tc * SigmoidGradFromOutput(o) : T(0);
    dgates(b, j) = di;
    dgates(b, H + j) = df;
    dgates(b, 2 * H + j) = dg;
    dgates(b, 3 * H + j) = d_o;
    AddToSum(db, b, j, di);
    AddToSum(db, b, H + j, df);
    AddToSum(db, b, 2 * H + j, dg);
    AddToSum(db, b, 3 * H + j, d_o);
    // A masked row passes dh and dc straight to the previous step.
    dc(b, j) = active ? dc_total * f : dc_in;
    dh(b, j) = active ? T(0) : dh_total;
  }
  static constexpr Index kPrefetchColumns = kCacheLineColumns<T>;
  TFCELLS_HD void Prefetch(Index b, Index j) const {
    for (Index g = 0; g < 4; ++g) {
      PrefetchLine(gates, b, g * H + j);
      PrefetchLine(dgates, b, g * H + j);
    }
    PrefetchLine(c, b, j);
    PrefetchLine(c_prev, b, j);
    PrefetchLine(dy, b, j);
  }
};

// ------------------------------------------------------------------ GRU, reset_after=True
// bias is [2, 3H]: row 0 is added to x·W_x, row 1 to h·W_h (inside the reset product).
template <typename T>
struct GruResetAfterForwardPoint {
  StepMatrix<T> gates;      // in: x·W_x; out: z, r, hh
  StepMatrix<const T> rec;  // h_prev·W_h
  const T* bias;            // [2, 3H] (zeros when the call has none)
  StepMatrix<const T> h_prev;
  StepMatrix<const bool> mask;
  StepMatrix<T> h;
  StepMatrix<T> rec_h_cache;   // out: recurrent candidate term (h_prev·W_hh + b), or null
  StepMatrix<T> h_next_cache;
  Index H;

  TFCELLS_HD void operator()(Index b, Index j) const {
    const bool active = RowActive<T>(mask, b);
    const Index G = 3 * H;
    const T z = Sigmoid(gates(b, j) + bias[j] + rec(b, j) + bias[G + j]);
    const T r = Sigmoid(gates(b, H + j) + bias[H + j] + rec(b, H + j) +
                        bias[G + H + j]);
    const T rec_h = rec(b, 2 * H + j) + bias[G + 2 * H + j];
    const T hh = Tanh(gates(b, 2 * H + j) + bias[2 * H + j] + r * rec_h);
    const T h_old = h_prev(b, j);
    const T h_new = active ? z * h_old + (T(1) - z) * hh : h_old;
    gates(b, j) = z;
    gates(b, H + j) = r;
    gates(b, 2 * H + j) = hh;
    if (rec_h_cache) rec_h_cache(b, j) = rec_h;
    h(b, j) = h_new;
    if (h_next_cache) h_next_cache(b, j) = h_new;
  }
  static constexpr Index kPrefetchColumns = kCacheLineColumns<T>;
  TFCELLS_HD void Prefetch(Index b, Index j) const {
    for (Index g = 0; g < 3; ++g) PrefetchLine(gates, b, g * H + j);
    PrefetchLine(rec_h_cache, b, j);
    PrefetchLine(h, b, j);
  }
};

template <typename T>
struct GruResetAfterBackwardPoint {
  StepMatrix<const T> gates, rec_h, h_prev, dy;
  StepMatrix<const bool> mask;
  StepMatrix<T> dgates_x;    // out: gradient of the input-side pre-activations (or null:
                             // nothing reads them but the bias sums)
  StepMatrix<T> dgates_rec;  // out: gradient of the recurrent-side pre-activations
  StepMatrix<T> dh;          // in: dL/dh; out: the part of dL/dh_prev outside the GEMM
  StepMatrix<T> db_x;    // bias gradient sums of bias row 0 (AddToSum)
  StepMatrix<T> db_rec;  // of bias row 1, the candidate's columns only: its z and r columns
                         // are db_x's (CellInfo::shared_bias_gates)
  Index H;

  TFCELLS_HD void operator()(Index b, Index j) const {
    const bool active = RowActive<T>(mask, b);
    const T dh_total = dh(b, j) + dy(b, j);
    const T z = gates(b, j), r = gates(b, H + j), hh = gates(b, 2 * H + j);
    const T h_old = h_prev(b, j), rec_h_old = rec_h(b, j);
    const T dhh = active ? dh_total * (T(1) - z) * TanhGradFromOutput(hh) : T(0);
    const T dz = active ? dh_total * (h_old - hh) * SigmoidGradFromOutput(z) : T(0);
    const T dr = active ? dhh * rec_h_old * SigmoidGradFromOutput(r) : T(0);
    const T dhh_rec = dhh * r;
    if (dgates_x) {
      dgates_x(b, j) = dz;
      dgates_x(b, H + j) = dr;
      dgates_x(b, 2 * H + j) = dhh;
    }
    dgates_rec(b, j) = dz;
    dgates_rec(b, H + j) = dr;
    dgates_rec(b, 2 * H + j) = dhh_rec;
    dh(b, j) = active ? dh_total * z : dh_total;
    AddToSum(db_x, b, j, dz);
    AddToSum(db_x, b, H + j, dr);
    AddToSum(db_x, b, 2 * H + j, dhh);
    AddToSum(db_rec, b, 2 * H + j, dhh_rec);
  }
  static constexpr Index kPrefetchColumns = kCacheLineColumns<T>;
  TFCELLS_HD void Prefetch(Index b, Index j) const {
    for (Index g = 0; g < 3; ++g) {
      PrefetchLine(gates, b, g * H + j);
      PrefetchLine(dgates_x, b, g * H + j);
      PrefetchLine(dgates_rec, b, g * H + j);
    }
    PrefetchLine(rec_h, b, j);
    PrefetchLine(h_prev, b, j);
    PrefetchLine(dy, b, j);
  }
};

// ----------------------------------------------------------------- GRU, reset_after=False
// The candidate's recurrent GEMM takes (r * h_prev), so each step has two GEMMs with a
// pointwise phase before each. bias is [3H], added to x·W_x.
template <typename T>
struct GruResetBeforeForwardGates {  // phase 1: z, r and r * h_prev
  StepMatrix<T> gates;          // in: x·W_x; out: z, r (columns 0..2H)
  StepMatrix<const T> rec_zr;   // h_prev·W_h[:, :2H]
  const T* bias;
  StepMatrix<const T> h_prev;
  StepMatrix<const T> h_dropout;  // the candidate's recurrent dropout mask, or null
  StepMatrix<T> reset_h;          // out: r * h_prev (⊙ h_dropout)
  Index H;

  TFCELLS_HD void operator()(Index b, Index j) const {
    const T z = Sigmoid(gates(b, j) + rec_zr(b, j) + bias[j]);
    const T r = Sigmoid(gates(b, H + j) + rec_zr(b, H + j) + bias[H + j]);
    gates(b, j) = z;
    gates(b, H + j) = r;
    reset_h(b, j) = r * (h_prev(b, j) * ScaleAt(h_dropout, b, j));
  }
  static constexpr Index kPrefetchColumns = kCacheLineColumns<T>;
  TFCELLS_HD void Prefetch(Index b, Index j) const {
    PrefetchLine(gates, b, j);
    PrefetchLine(gates, b, H + j);
    PrefetchLine(reset_h, b, j);
  }
};

template <typename T>
struct GruResetBeforeForwardState {  // phase 2: candidate and new state
  StepMatrix<T> gates;            // in: z, r, x·W_x (h part); out: hh in the h part
  StepMatrix<const T> rec_h;      // (r * h_prev)·W_h[:, 2H:]
  const T* bias;
  StepMatrix<const T> h_prev;
  StepMatrix<const bool> mask;
  StepMatrix<T> h, h_next_cache;
  Index H;

  TFCELLS_HD void operator()(Index b, Index j) const {
    const bool active = RowActive<T>(mask, b);
    const T z = gates(b, j);
    const T hh = Tanh(gates(b, 2 * H + j) + rec_h(b, j) + bias[2 * H + j]);
    const T h_old = h_prev(b, j);
    const T h_new = active ? z * h_old + (T(1) - z) * hh : h_old;
    gates(b, 2 * H + j) = hh;
    h(b, j) = h_new;
    if (h_next_cache) h_next_cache(b, j) = h_new;
  }
  static constexpr Index kPrefetchColumns = kCacheLineColumns<T>;
  TFCELLS_HD void Prefetch(Index b, Index j) const {
    PrefetchLine(gates, b, 2 * H + j);
    PrefetchLine(h, b, j);
  }
};

template <typename T>
struct GruResetBeforeBackwardState {  // phase 1: dz, dhh
  StepMatrix<const T> gates, h_prev, dy;
  StepMatrix<const bool> mask;
  StepMatrix<T> dgates;  // out: z and h columns
  StepMatrix<T> dh;      // in: dL/dh; out: the direct part of dL/dh_prev
  StepMatrix<T> db;      // bias gradient sums (AddToSum)
  Index H;

  TFCELLS_HD void operator()(Index b, Index j) const {
    const bool active = RowActive<T>(mask, b);
    const T dh_total = dh(b, j) + dy(b, j);
    const T z = gates(b, j), hh = gates(b, 2 * H + j), h_old = h_prev(b, j);
    const T dz = active ? dh_total * (h_old - hh) * SigmoidGradFromOutput(z) : T(0);
    const T dhh = active ? dh_total * (T(1) - z) * TanhGradFromOutput(hh) : T(0);
    dgates(b, j) = dz;
    dgates(b, 2 * H + j) = dhh;
    dh(b, j) = active ? dh_total * z : dh_total;
    AddToSum(db, b, j, dz);
    AddToSum(db, b, 2 * H + j, dhh);
  }
  static constexpr Index kPrefetchColumns = kCacheLineColumns<T>;
  TFCELLS_HD void Prefetch(Index b, Index j) const {
    PrefetchLine(gates, b, j);
    PrefetchLine(gates, b, 2 * H + j);
    PrefetchLine(h_prev, b, j);
    PrefetchLine(dy, b, j);
    PrefetchLine(dgates, b, j);
    PrefetchLine(dgates, b, 2 * H + j);
  }
};

template <typename T>
struct GruResetBeforeBackwardGates {  // phase 2: dr, from d(r * h_prev)
  StepMatrix<const T> gates, h_prev, h_dropout, d_reset_h;  // h_dropout: as in the forward
  StepMatrix<const bool> mask;
  StepMatrix<T> dgates;  // out: r column
  StepMatrix<T> dh;      // accumulates d(r * h_prev) * r (⊙ h_dropout)
  StepMatrix<T> db;      // bias gradient sums (AddToSum)
  Index H;

  TFCELLS_HD void operator()(Index b, Index j) const {
    const bool active = RowActive<T>(mask, b);
    const T r = gates(b, H + j), scale = ScaleAt(h_dropout, b, j);
    const T d_reset = d_reset_h(b, j), h_old = h_prev(b, j);
    const T dr = active ? d_reset * (h_old * scale) * SigmoidGradFromOutput(r) : T(0);
    dgates(b, H + j) = dr;
    dh(b, j) += active ? d_reset * r * scale : T(0);
    AddToSum(db, b, H + j, dr);
  }
  static constexpr Index kPrefetchColumns = kCacheLineColumns<T>;
  TFCELLS_HD void Prefetch(Index b, Index j) const {
    PrefetchLine(gates, b, H + j);
    PrefetchLine(h_prev, b, j);
    PrefetchLine(dgates, b, H + j);
  }
};

// ------------------------------------------------------------------------- SimpleRNN (tanh)
template <typename T>
struct SimpleRnnForwardPoint {
  StepMatrix<T> gates;  // in: x·W_x; out: the new state (the cache keeps activations)
  StepMatrix<const T> rec;
  const T* bias;
  StepMatrix<const T> h_prev;
  StepMatrix<const bool> mask;
  StepMatrix<T> h, h_next_cache;
  Index H;

  TFCELLS_HD void operator()(Index b, Index j) const {
    const bool active = RowActive<T>(mask, b);
    const T h_step = Tanh(gates(b, j) + rec(b, j) + bias[j]), h_old = h_prev(b, j);
    const T h_new = active ? h_step : h_old;
    gates(b, j) = h_step;
    h(b, j) = h_new;
    if (h_next_cache) h_next_cache(b, j) = h_new;
  }
  static constexpr Index kPrefetchColumns = kCacheLineColumns<T>;
  TFCELLS_HD void Prefetch(Index b, Index j) const {
    PrefetchLine(gates, b, j);
    PrefetchLine(h, b, j);
  }
};

template <typename T>
struct SimpleRnnBackwardPoint {
  StepMatrix<const T> gates, dy;
  StepMatrix<const bool> mask;
  StepMatrix<T> dgates, dh;
  StepMatrix<T> db;  // bias gradient sums (AddToSum)
  Index H;

  TFCELLS_HD void operator()(Index b, Index j) const {
    const bool active = RowActive<T>(mask, b);
    const T dh_total = dh(b, j) + dy(b, j);
    const T h_step = gates(b, j);
    const T d_pre = active ? dh_total * TanhGradFromOutput(h_step) : T(0);
    dgates(b, j) = d_pre;
    dh(b, j) = active ? T(0) : dh_total;
    AddToSum(db, b, j, d_pre);
  }
  static constexpr Index kPrefetchColumns = kCacheLineColumns<T>;
  TFCELLS_HD void Prefetch(Index b, Index j) const {
    PrefetchLine(gates, b, j);
    PrefetchLine(dgates, b, j);
    PrefetchLine(dy, b, j);
  }
};

// ------------------------------------------------------------------------ the cells' steps
// One step for one shard of batch rows. The step context `s` (rnn.h: ForwardStep,
// BackwardStep) holds this step's views and runs the products:
//   s.Recurrent(out)        out[:, product gates] = h_prev·W_h (per gate with dropout), ld G*H
//   s.Candidate(a, out)     out = a·W_h[:, candidate]  (split_candidate cells)
//   s.CandidateGrad(dg, out) out = dG[:, candidate]·W_h[:, candidate]ᵀ
//   s.ForEach(functor)      functor(b, j) over the shard's rows and H units
// Views a cell does not use are null; aux is the cache (or, for Aux::kState, the state slot).
// The driver then carries dh to the previous step: dh_prev += dG·W_hᵀ over the product gates
// (dG: dgates_rec for cells with recurrent_gate_grads, else dgates).

struct Lstm {
  static constexpr CellInfo kInfo{"lstm", 4, 1, true, Aux::kState, false, false, false, 0,
                                  false};

  template <typename S>
  static void Forward(const S& s) {
    using T = typename S::Value;
    s.Recurrent(s.rec);
    s.ForEach(LstmForwardPoint<T>{s.gates, s.Rec(), s.bias, s.h_prev, s.aux_prev, s.mask, s.h,
                                  s.aux, s.h_next_cache, s.H});
  }
  template <typename S>
  static void Backward(const S& s) {
    using T = typename S::Value;
    s.ForEach(LstmBackwardPoint<T>{s.gates, s.aux, s.aux_prev, s.dy, s.mask, s.dgates, s.dh,
                                   s.dc, s.db, s.H});
  }
};

struct GruResetAfter {
  static constexpr CellInfo kInfo{"gru", 3, 2, false, Aux::kCacheOnly, false, true, true, 2,
                                  false};

  template <typename S>
  static void Forward(const S& s) {
    using T = typename S::Value;
    s.Recurrent(s.rec);
    s.ForEach(GruResetAfterForwardPoint<T>{s.gates, s.Rec(), s.bias, s.h_prev, s.mask, s.h,
                                           s.aux, s.h_next_cache, s.H});
  }
  template <typename S>
  static void Backward(const S& s) {
    using T = typename S::Value;
    s.ForEach(GruResetAfterBackwardPoint<T>{s.gates, s.aux, s.h_prev, s.dy, s.mask, s.dgates,
                                            s.dgates_rec, s.dh, s.db, s.db_rec, s.H});
  }
};

// Two GEMMs and two pointwise phases per step: z, r and r * h_prev (kept in aux), then the
// candidate's GEMM on r * h_prev and the new state.
struct GruResetBefore {
  static constexpr CellInfo kInfo{"gru_reset_before", 3, 1, false, Aux::kState, true, false,
                                  true, 0, false};

  template <typename S>
  static void Forward(const S& s) {
    using T = typename S::Value;
    const Index H = s.H;
    s.Recurrent(s.rec);  // z, r columns
    s.ForEach(GruResetBeforeForwardGates<T>{s.gates, s.Rec(), s.bias, s.h_prev,
                                            s.candidate_dropout, s.aux, H});
    s.Candidate(s.aux, s.rec + 2 * H);
    s.ForEach(GruResetBeforeForwardState<T>{s.gates, s.Rec(2 * H), s.bias, s.h_prev, s.mask,
                                            s.h, s.h_next_cache, H});
  }
  template <typename S>
  static void Backward(const S& s) {
    using T = typename S::Value;
    const Index H = s.H;
    s.ForEach(GruResetBeforeBackwardState<T>{s.gates, s.h_prev, s.dy, s.mask, s.dgates, s.dh,
                                             s.db, H});
    // d(r * h_prev) = dhh · W_hhᵀ
    s.CandidateGrad(StepMatrix<const T>(s.dgates.data + 2 * H, s.dgates.ld), s.d_reset);
    s.ForEach(GruResetBeforeBackwardGates<T>{s.gates, s.h_prev, s.candidate_dropout, s.d_reset,
                                             s.mask, s.dgates, s.dh, s.db, H});
  }
};

struct SimpleRnn {
  static constexpr CellInfo kInfo{"simple_rnn", 1, 1, false, Aux::kNone, false, false, false, 0,
                                  true};

  template <typename S>
  static void Forward(const S& s) {
    using T = typename S::Value;
    s.Recurrent(s.rec);
    s.ForEach(SimpleRnnForwardPoint<T>{s.gates, s.Rec(), s.bias, s.h_prev, s.mask, s.h,
                                       s.h_next_cache, s.H});
  }
  template <typename S>
  static void Backward(const S& s) {
    using T = typename S::Value;
    s.ForEach(SimpleRnnBackwardPoint<T>{s.gates, s.dy, s.mask, s.dgates, s.dh, s.db, s.H});
  }
};

// The one place a CellKind becomes its struct: f(Lstm{}), f(GruResetAfter{}), ...
template <typename F>
decltype(auto) VisitCell(CellKind kind, F&& f) {
  switch (kind) {
    case CellKind::kGruResetAfter: return f(GruResetAfter{});
    case CellKind::kGruResetBefore: return f(GruResetBefore{});
    case CellKind::kSimpleRnn: return f(SimpleRnn{});
    case CellKind::kLstm: break;
  }
  return f(Lstm{});
}

inline CellInfo Info(CellKind kind) {
  return VisitCell(kind, [](auto cell) { return decltype(cell)::kInfo; });
}

// The most gates of any cell (sizes the per-gate operand arrays).
inline constexpr int kMaxGates = 4;

TFCELLS_ISA_END
}  // namespace tfcells
