// The recurrence driver shared by every cell and every device.
//
// Forward:  one GEMM x·W_x for all T*B rows, then per step one recurrent GEMM h_prev·W_h and
//           one fused pointwise kernel (GRU with reset_after=False: two of each).
// Backward: walk the steps backwards doing the pointwise gate backward and the GEMM that
//           carries dh to the previous step; then each requested weight/input gradient is one
//           GEMM over all T*B rows (dW_x = xᵀ·dG, dW_h = h_prevᵀ·dG, dx = dG·W_xᵀ) and db a
//           column sum. Each is skipped, and its buffer never touched, when its GradBit is clear.
//
// The driver is written against a Backend that provides:
//   Gemm(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc)   row-major C = op(A)op(B) + βC
//   StepOperand(trans, k, n, w, ld)   op(W) [k, n] (W, or Wᵀ of W [n, k]) prepared once for
//                                     the GEMM of every step (the CPU packs it into panels)
//   StepGemm(m, a, lda, operand, beta, c, ldc)                        C = A·op(W) + βC
//   ForEach(rows, cols, functor)                                      functor(b, j) for all b, j
//   ColumnSum(rows, cols, a, lda, out)                                out[j] = Σ_r a[r, j]
//   TrueFlag()                        a `true` in the device's memory, the mask of no mask
//   ForRowShards(rows, step_flops, fn)  fn(backend, b0, b1) over a partition of the batch rows;
//                                     each shard runs the whole time loop for its rows (the
//                                     recurrence never mixes rows), so shards need no per-step
//                                     synchronisation
// and the caller provides every buffer (outputs, cache, workspace), so nothing is allocated here.
#pragma once

#include <atomic>
#include <string>
#include <vector>

#include "cells.h"
#include "common.h"

namespace tfcells {

// Arguments of the forward pass. Pointers marked optional may be null.
template <typename T>
struct ForwardArgs {
  CellKind cell = CellKind::kLstm;
  Dims d;
  const T* x = nullptr;                 // [B,T,I] ([T,B,I] if time_major)
  const T* h0 = nullptr;                // [B,H]
  const T* c0 = nullptr;                // [B,H], LSTM only
  const T* kernel = nullptr;            // [I, G*H]
  const T* recurrent_kernel = nullptr;  // [H, G*H]
  const T* bias = nullptr;              // optional: [G*H]; GRU reset_after: [2, 3H]
  const bool* mask = nullptr;           // optional: [B,T] ([T,B] if time_major)
  T* y = nullptr;                       // [B,T,H] ([T,B,H]), in processing order
  T* h_last = nullptr;                  // [B,H]
  T* c_last = nullptr;                  // [B,H], LSTM only
  // Training cache, laid out like x; all null for inference. Sizes: CacheSizes().
  T* gates = nullptr;   // activated gates [.., G*H]
  T* aux = nullptr;     // LSTM: cell state; GRU: recurrent candidate term or r*h_prev [.., H]
  T* h_prev = nullptr;  // state entering each step [.., H]
  T* workspace = nullptr;  // ForwardWorkspaceSize() elements
};

template <typename T>
struct BackwardArgs {
  CellKind cell = CellKind::kLstm;
  Dims d;
  const T *x = nullptr, *h0 = nullptr, *c0 = nullptr;
  const T *kernel = nullptr, *recurrent_kernel = nullptr, *bias = nullptr;
  const bool* mask = nullptr;
  const T *gates = nullptr, *aux = nullptr, *h_prev = nullptr;  // the forward's cache
  const T* dy = nullptr;       // optional: gradient w.r.t. y
  const T* dh_last = nullptr;  // optional
  const T* dc_last = nullptr;  // optional, LSTM only
  int grad_mask = kGradAll;    // GradBits to produce; the others' pointers may be null
  T *dx = nullptr, *dh0 = nullptr, *dc0 = nullptr;
  T *dkernel = nullptr, *drecurrent_kernel = nullptr, *dbias = nullptr;
  T* workspace = nullptr;  // BackwardWorkspaceSize() elements
};

struct CacheSizes {
  Index gates, aux, h_prev;
};

inline CacheSizes TrainingCacheSizes(CellKind cell, const Dims& d) {
  const Index rows = d.Rows();
  return {rows * GateCount(cell) * d.H, cell == CellKind::kSimpleRnn ? 0 : rows * d.H,
          rows * d.H};
}

inline Index ForwardWorkspaceSize(CellKind cell, const Dims& d, bool training) {
  const Index gh = GateCount(cell) * d.H;
  return (training ? 0 : d.Rows() * gh) + d.B * gh + 2 * d.B * d.H;
}

// Whether the backward pass keeps the gate gradients of all steps (a later GEMM needs them).
inline bool KeepsAllGateGrads(int grad_mask) {
  return grad_mask & (kGradX | kGradKernel | kGradRecurrentKernel | kGradBias);
}

inline Index BackwardWorkspaceSize(CellKind cell, const Dims& d, int grad_mask) {
  const Index gh = GateCount(cell) * d.H;
  const Index steps = KeepsAllGateGrads(grad_mask) ? d.Rows() : d.B;
  const Index rec_steps = (grad_mask & (kGradRecurrentKernel | kGradBias)) ? d.Rows() : d.B;
  const Index dgates_rec = cell == CellKind::kGruResetAfter ? rec_steps * gh : 0;
  return steps * gh + dgates_rec + 3 * d.B * d.H;
}

// How often each piece of gradient work ran in this process: lets tests prove that a skipped
// gradient was never computed.
struct WorkCounters {
  std::atomic<std::int64_t> forward_calls{0}, backward_calls{0}, grad_x{0}, grad_h0{0},
      grad_kernel{0}, grad_recurrent_kernel{0}, grad_bias{0};
};
WorkCounters& Counters();

// Checks the shapes of the forward inputs (mask and bias may be empty vectors when absent;
// c0 is ignored unless cell is LSTM). Returns an empty string when valid, else a message
// naming the argument, the shape it got and the shape expected. On success fills dims.
std::string ValidateShapes(CellKind cell, bool time_major, const std::vector<Index>& x,
                           const std::vector<Index>& h0, const std::vector<Index>& c0,
                           const std::vector<Index>& kernel,
                           const std::vector<Index>& recurrent_kernel,
                           const std::vector<Index>* bias, const std::vector<Index>* mask,
                           Dims* dims);

// StepOperand/StepGemm for a backend whose Gemm reads the operand where it lies (cuBLAS): a
// base class, Derived being the backend.
template <typename Derived>
struct InPlaceStepOperands {
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

// The mask column of time t; without a mask, every row reads the same `true`.
template <typename Backend>
StepMatrix<const bool> MaskAt(Backend& be, const bool* mask, const Dims& d, Index t) {
  return mask ? AtStep(mask, d, t, 1) : StepMatrix<const bool>(be.TrueFlag(), 0);
}

}  // namespace detail

template <typename T, typename Backend>
void Forward(Backend& be, const ForwardArgs<T>& a) {
  const Dims& d = a.d;
  const Index B = d.B, H = d.H, G = GateCount(a.cell), GH = G * H;
  const bool training = a.gates != nullptr;
  Counters().forward_calls++;
  if (B == 0 || H == 0) return;
  if (d.T == 0) {  // empty sequence: the initial state comes back
    be.ForEach(B, H, detail::CopyPoint<T>{Plain(a.h_last, H), Plain(a.h0, H)});
    if (a.cell == CellKind::kLstm)
      be.ForEach(B, H, detail::CopyPoint<T>{Plain(a.c_last, H), Plain(a.c0, H)});
    return;
  }

  T* ws = a.workspace;
  T* gx_all = training ? a.gates : ws;
  if (!training) ws += d.Rows() * GH;
  T* rec = ws;
  ws += B * GH;
  T* state_pingpong = ws;  // inference: LSTM cell state or GRU r*h_prev, two [B,H] slots

  // Input projection for every step at once; biases are added in the pointwise kernels.
  be.Gemm(false, false, d.Rows(), GH, d.I, a.x, d.I, a.kernel, GH, T(0), gx_all, GH);

  if (training) be.ForEach(B, H, detail::CopyPoint<T>{AtStep(a.h_prev, d, d.InputTime(0), H),
                                                      Plain(a.h0, H)});

  // The recurrent kernel as every step's GEMM reads it. GRU with reset_after=False multiplies
  // its z,r columns and its candidate columns separately (the other cells leave w_hh empty).
  const bool split_candidate = a.cell == CellKind::kGruResetBefore;
  const T* candidate_kernel = split_candidate ? a.recurrent_kernel + 2 * H : a.recurrent_kernel;
  const auto w_h = be.StepOperand(false, H, split_candidate ? 2 * H : GH, a.recurrent_kernel, GH);
  const auto w_hh = be.StepOperand(false, H, split_candidate ? H : 0, candidate_kernel, GH);

  // The time loop, for batch rows [b0, b1) (every matrix below is that shard's view).
  auto run_rows = [&](Backend& sb, Index b0, Index b1) {
    const Index n = b1 - b0;
    auto at = [&](auto* seq, Index t, Index width) {
      return detail::FromRow(AtStep(seq, d, t, width), b0);
    };
    auto plain = [&](auto* buf, Index width) { return Plain(buf + b0 * width, width); };
    T* rec_rows = rec + b0 * GH;
    for (Index s = 0; s < d.T; ++s) {
      const Index t = d.InputTime(s);
      const StepMatrix<T> gates = at(gx_all, t, GH);
      const StepMatrix<const T> h_prev =
          s == 0 ? plain(a.h0, H) : StepMatrix<const T>(at(a.y, s - 1, H));
      const StepMatrix<T> h = at(a.y, s, H);
      const StepMatrix<const bool> mask = detail::FromRow(detail::MaskAt(sb, a.mask, d, t), b0);
      const StepMatrix<T> h_next_cache =
          (training && s + 1 < d.T) ? at(a.h_prev, d.InputTime(s + 1), H) : StepMatrix<T>();
      // State kept per step: the cache when training, else alternating slots.
      auto aux_at = [&](Index step) -> StepMatrix<T> {
        return training ? at(a.aux, d.InputTime(step), H)
                        : plain(state_pingpong + (step & 1) * B * H, H);
      };

      switch (a.cell) {
        case CellKind::kLstm: {
          sb.StepGemm(n, h_prev.data, h_prev.ld, w_h, T(0), rec_rows, GH);
          const StepMatrix<const T> c_prev =
              s == 0 ? plain(a.c0, H) : StepMatrix<const T>(aux_at(s - 1));
          sb.ForEach(n, H, LstmForwardPoint<T>{gates, Plain(rec_rows, GH), a.bias, h_prev,
                                               c_prev, mask, h, aux_at(s), h_next_cache, H});
          break;
        }
        case CellKind::kGruResetAfter: {
          sb.StepGemm(n, h_prev.data, h_prev.ld, w_h, T(0), rec_rows, GH);
          sb.ForEach(n, H, GruResetAfterForwardPoint<T>{
                               gates, Plain(rec_rows, GH), a.bias, h_prev, mask, h,
                               training ? aux_at(s) : StepMatrix<T>(), h_next_cache, H});
          break;
        }
        case CellKind::kGruResetBefore: {
          // rec holds h_prev·W_h[:, :2H] as [B, 2H], then (r*h_prev)·W_h[:, 2H:] as [B, H].
          T* rec_zr = rec + b0 * 2 * H;
          T* rec_h = rec + B * 2 * H + b0 * H;
          sb.StepGemm(n, h_prev.data, h_prev.ld, w_h, T(0), rec_zr, 2 * H);
          const StepMatrix<T> reset_h = aux_at(s);
          sb.ForEach(n, H, GruResetBeforeForwardGates<T>{gates, Plain(rec_zr, 2 * H), a.bias,
                                                         h_prev, reset_h, H});
          sb.StepGemm(n, reset_h.data, reset_h.ld, w_hh, T(0), rec_h, H);
          sb.ForEach(n, H, GruResetBeforeForwardState<T>{gates, Plain(rec_h, H), a.bias, h_prev,
                                                         mask, h, h_next_cache, H});
          break;
        }
        case CellKind::kSimpleRnn: {
          sb.StepGemm(n, h_prev.data, h_prev.ld, w_h, T(0), rec_rows, GH);
          sb.ForEach(n, H, SimpleRnnForwardPoint<T>{gates, Plain(rec_rows, GH), a.bias, h_prev,
                                                    mask, h, h_next_cache, H});
          break;
        }
      }
    }
  };
  be.ForRowShards(B, 2.0 * B * H * GH, run_rows);
  be.ForEach(B, H, detail::CopyPoint<T>{Plain(a.h_last, H), AtStep(a.y, d, d.T - 1, H)});
  if (a.cell == CellKind::kLstm) {
    const StepMatrix<T> c_final = training ? AtStep(a.aux, d, d.InputTime(d.T - 1), H)
                                           : Plain(state_pingpong + ((d.T - 1) & 1) * B * H, H);
    be.ForEach(B, H, detail::CopyPoint<T>{Plain(a.c_last, H), c_final});
  }
}

template <typename T, typename Backend>
void Backward(Backend& be, const BackwardArgs<T>& a) {
  const Dims& d = a.d;
  const Index B = d.B, H = d.H, G = GateCount(a.cell), GH = G * H, rows = d.Rows();
  const int m = a.grad_mask;
  Counters().backward_calls++;
  if (d.T == 0 || B == 0 || H == 0) {  // no step ran: the initial state is the final state
    if (m & kGradH0)
      be.ForEach(B, H, detail::ZeroOrCopyPoint<T>{Plain(a.dh0, H), Plain(a.dh_last, H)});
    if (a.cell == CellKind::kLstm && (m & kGradC0))
      be.ForEach(B, H, detail::ZeroOrCopyPoint<T>{Plain(a.dc0, H), Plain(a.dc_last, H)});
    // With no steps, the weight gradients are zero.
    if (m & kGradKernel)
      be.ForEach(d.I, GH, detail::ZeroOrCopyPoint<T>{Plain(a.dkernel, GH), {}});
    if (m & kGradRecurrentKernel)
      be.ForEach(H, GH, detail::ZeroOrCopyPoint<T>{Plain(a.drecurrent_kernel, GH), {}});
    if ((m & kGradBias) && a.bias) {
      const Index bias_rows = a.cell == CellKind::kGruResetAfter ? 2 : 1;
      be.ForEach(bias_rows, GH, detail::ZeroOrCopyPoint<T>{Plain(a.dbias, GH), {}});
    }
    return;
  }

  // Workspace: gate gradients (all steps, or one step's worth), GRU's recurrent-side gate
  // gradients, and three [B,H] carries.
  const bool keep_all = KeepsAllGateGrads(m);
  const bool keep_all_rec = m & (kGradRecurrentKernel | kGradBias);
  T* ws = a.workspace;
  T* dgates_all = ws;
  ws += (keep_all ? rows : B) * GH;
  T* dgates_rec_all = nullptr;
  if (a.cell == CellKind::kGruResetAfter) {
    dgates_rec_all = ws;
    ws += (keep_all_rec ? rows : B) * GH;
  }
  T* dh = ws;
  T* dc = ws + B * H;
  T* d_reset_h = ws + 2 * B * H;

  // The recurrent kernel, transposed, as the GEMM carrying dh to the previous step reads it
  // (only the first processed step carries nothing when dh0 is not wanted). GRU with
  // reset_after=False: its z,r rows and its candidate rows separately.
  const bool split_candidate = a.cell == CellKind::kGruResetBefore;
  const T* candidate_kernel = split_candidate ? a.recurrent_kernel + 2 * H : a.recurrent_kernel;
  const bool carries = d.T > 1 || (m & kGradH0);
  const auto w_h_t = be.StepOperand(true, split_candidate ? 2 * H : GH, carries ? H : 0,
                                    a.recurrent_kernel, GH);
  const auto w_hh_t = be.StepOperand(true, H, split_candidate ? H : 0, candidate_kernel, GH);
  // The backward time loop, for batch rows [b0, b1) (every matrix is that shard's view).
  auto run_rows = [&](Backend& sb, Index b0, Index b1) {
    const Index n = b1 - b0;
    auto at = [&](auto* seq, Index t, Index width) {
      return detail::FromRow(AtStep(seq, d, t, width), b0);
    };
    auto plain = [&](auto* buf, Index width) {
      return buf ? Plain(buf + b0 * width, width) : decltype(Plain(buf, width))();
    };
    const StepMatrix<T> dh_rows = plain(dh, H), dc_rows = plain(dc, H);
    sb.ForEach(n, H, detail::ZeroOrCopyPoint<T>{dh_rows, plain(a.dh_last, H)});
    if (a.cell == CellKind::kLstm)
      sb.ForEach(n, H, detail::ZeroOrCopyPoint<T>{dc_rows, plain(a.dc_last, H)});

    for (Index s = d.T - 1; s >= 0; --s) {
      const Index t = d.InputTime(s);
      const StepMatrix<T> dgates =
          keep_all ? at(dgates_all, t, GH) : plain(dgates_all, GH);
      const StepMatrix<const T> gates = at(a.gates, t, GH);
      const StepMatrix<const T> h_prev = at(a.h_prev, t, H);
      const StepMatrix<const T> dy = at(a.dy, s, H);
      const StepMatrix<const bool> mask = detail::FromRow(detail::MaskAt(sb, a.mask, d, t), b0);
      // The GEMM into dh at s == 0 only serves dh0.
      const bool carry_to_prev = s > 0 || (m & kGradH0);

      switch (a.cell) {
        case CellKind::kLstm: {
          const StepMatrix<const T> c_prev =
              s == 0 ? plain(a.c0, H) : at(a.aux, d.InputTime(s - 1), H);
          sb.ForEach(n, H, LstmBackwardPoint<T>{gates, at(a.aux, t, H), c_prev, dy, mask,
                                                dgates, dh_rows, dc_rows, H});
          if (carry_to_prev)
            sb.StepGemm(n, dgates.data, dgates.ld, w_h_t, T(1), dh_rows.data, H);
          break;
        }
        case CellKind::kGruResetAfter: {
          const StepMatrix<T> dgates_rec =
              keep_all_rec ? at(dgates_rec_all, t, GH) : plain(dgates_rec_all, GH);
          sb.ForEach(n, H, GruResetAfterBackwardPoint<T>{gates, at(a.aux, t, H), h_prev, dy,
                                                         mask, dgates, dgates_rec, dh_rows, H});
          if (carry_to_prev)
            sb.StepGemm(n, dgates_rec.data, dgates_rec.ld, w_h_t, T(1), dh_rows.data, H);
          break;
        }
        case CellKind::kGruResetBefore: {
          const StepMatrix<T> d_reset_rows = plain(d_reset_h, H);
          sb.ForEach(n, H, GruResetBeforeBackwardState<T>{gates, h_prev, dy, mask, dgates,
                                                          dh_rows, H});
          // d(r * h_prev) = dhh · W_hhᵀ
          sb.StepGemm(n, dgates.data + 2 * H, dgates.ld, w_hh_t, T(0), d_reset_rows.data, H);
          sb.ForEach(n, H, GruResetBeforeBackwardGates<T>{gates, h_prev, d_reset_rows, mask,
                                                          dgates, dh_rows, H});
          if (carry_to_prev)
            sb.StepGemm(n, dgates.data, dgates.ld, w_h_t, T(1), dh_rows.data, H);
          break;
        }
        case CellKind::kSimpleRnn: {
          sb.ForEach(n, H, SimpleRnnBackwardPoint<T>{gates, dy, mask, dgates, dh_rows, H});
          if (carry_to_prev)
            sb.StepGemm(n, dgates.data, dgates.ld, w_h_t, T(1), dh_rows.data, H);
          break;
        }
      }
    }
  };
  be.ForRowShards(B, 2.0 * B * H * GH, run_rows);

  auto& counters = Counters();
  if (m & kGradH0) {
    be.ForEach(B, H, detail::CopyPoint<T>{Plain(a.dh0, H), Plain(dh, H)});
    counters.grad_h0++;
  }
  if (a.cell == CellKind::kLstm && (m & kGradC0))
    be.ForEach(B, H, detail::CopyPoint<T>{Plain(a.dc0, H), Plain(dc, H)});
  // Gradients of the input-side pre-activations, and of the recurrent-side ones.
  const T* dg_in = dgates_all;
  const T* dg_rec = a.cell == CellKind::kGruResetAfter ? dgates_rec_all : dgates_all;
  if (m & kGradX) {
    be.Gemm(false, true, rows, d.I, GH, dg_in, GH, a.kernel, GH, T(0), a.dx, d.I);
    counters.grad_x++;
  }
  if (m & kGradKernel) {
    be.Gemm(true, false, d.I, GH, rows, a.x, d.I, dg_in, GH, T(0), a.dkernel, GH);
    counters.grad_kernel++;
  }
  if (m & kGradRecurrentKernel) {
    if (a.cell == CellKind::kGruResetBefore) {  // the candidate's GEMM took r * h_prev
      be.Gemm(true, false, H, 2 * H, rows, a.h_prev, H, dg_rec, GH, T(0),
              a.drecurrent_kernel, GH);
      be.Gemm(true, false, H, H, rows, a.aux, H, dg_rec + 2 * H, GH, T(0),
              a.drecurrent_kernel + 2 * H, GH);
    } else {
      be.Gemm(true, false, H, GH, rows, a.h_prev, H, dg_rec, GH, T(0), a.drecurrent_kernel,
              GH);
    }
    counters.grad_recurrent_kernel++;
  }
  if ((m & kGradBias) && a.bias) {
    be.ColumnSum(rows, GH, dg_in, GH, a.dbias);
    if (a.cell == CellKind::kGruResetAfter) be.ColumnSum(rows, GH, dg_rec, GH, a.dbias + GH);
    counters.grad_bias++;
  }
}

}  // namespace tfcells
