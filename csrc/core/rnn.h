// The recurrence driver shared by every cell and every device.
//
// Forward:  per step the input projection x_t·W_x, the recurrent GEMM h_prev·W_h and one
//           fused pointwise kernel (GRU with reset_after=False: two recurrent GEMMs and two
//           pointwise kernels).
// Backward: walk the steps backwards doing the pointwise gate backward, the GEMM that carries
//           dh to the previous step and dx_t = dG_t·W_xᵀ; then each requested weight gradient
//           is one GEMM over all T*B rows (dW_x = xᵀ·dG, dW_h = h_prevᵀ·dG) and db a column
//           sum. Each is skipped, and its buffer never touched, when its GradBit is clear.
// Dropout (Keras' implementation=1, optional): gate g reads x ⊙ mx_g and h_prev ⊙ mh_g, so the
//           products above run gate by gate on masked copies (W[:, g] a column block), and the
//           gradients reaching x and h_prev are masked the same way.
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

#include <algorithm>
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
  // Optional dropout, as Keras applies it while training: at every step gate g reads
  // x ⊙ input_dropout[g] and h_prev ⊙ recurrent_dropout[g] ([G,B,I] and [G,B,H]: one mask
  // row per batch entry for all steps, holding 0 or 1/(1-rate)).
  const T* input_dropout = nullptr;
  const T* recurrent_dropout = nullptr;
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
  const T *input_dropout = nullptr, *recurrent_dropout = nullptr;  // as in ForwardArgs
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

// Which optional dropout masks a call has (they need scratch of their own).
struct DropoutInputs {
  bool input = false, recurrent = false;
};

inline Index ForwardWorkspaceSize(CellKind cell, const Dims& d, bool training,
                                  DropoutInputs dropout = {}) {
  const Index gh = GateCount(cell) * d.H;
  return (training ? 0 : d.B * gh) + d.B * gh + 2 * d.B * d.H +
         (dropout.input ? d.B * d.I : 0) + (dropout.recurrent ? d.B * d.H : 0);
}

// Whether the backward pass keeps the gate gradients of all steps (a weight GEMM after the
// loop needs them; dx and the bias sums are computed inside the loop).
inline bool KeepsAllGateGrads(int grad_mask) {
  return grad_mask & (kGradKernel | kGradRecurrentKernel);
}

// Bias rows: GRU with reset_after keeps an input and a recurrent bias.
inline Index BiasRows(CellKind cell) { return cell == CellKind::kGruResetAfter ? 2 : 1; }

inline Index BackwardWorkspaceSize(CellKind cell, const Dims& d, int grad_mask,
                                   DropoutInputs dropout = {}) {
  const Index gh = GateCount(cell) * d.H;
  const Index steps = KeepsAllGateGrads(grad_mask) ? d.Rows() : d.B;
  const Index rec_steps = (grad_mask & kGradRecurrentKernel) ? d.Rows() : d.B;
  const Index dgates_rec = cell == CellKind::kGruResetAfter ? rec_steps * gh : 0;
  // The bias gradient, summed per batch row over the steps inside the loop.
  const Index bias_sums = (grad_mask & kGradBias) ? BiasRows(cell) * d.B * gh : 0;
  // Dropout: masked copies of x or of the h_prev cache for the weight GEMMs (one gate at a
  // time), and one step's masked product.
  const Index masked_x = dropout.input && (grad_mask & kGradKernel) ? d.I : 0;
  const Index masked_h = dropout.recurrent && (grad_mask & kGradRecurrentKernel) ? d.H : 0;
  return steps * gh + dgates_rec + bias_sums + 3 * d.B * d.H +
         d.Rows() * std::max(masked_x, masked_h) +
         (dropout.recurrent ? d.B * d.H : 0) +
         (dropout.input && (grad_mask & kGradX) ? d.B * d.I : 0);
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
// Checks the dropout masks' shapes against valid dims (either may be null: absent).
std::string ValidateDropoutShapes(CellKind cell, const Dims& d,
                                  const std::vector<Index>* input_dropout,
                                  const std::vector<Index>* recurrent_dropout);

TFCELLS_ISA_BEGIN

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

// dst = src ⊙ scale (or dst += src ⊙ scale), where row r of src reads the dropout-mask row of
// its batch entry, (r / div) % B: div = T for all rows batch-major, 1 time-major or for one
// step's rows (scale then starts at the shard's first row).
template <typename T>
struct ScaleRowsPoint {
  StepMatrix<T> dst;
  StepMatrix<const T> src, scale;
  Index div, B;
  bool accumulate;
  TFCELLS_HD void operator()(Index r, Index j) const {
    const T v = src(r, j) * scale((r / div) % B, j);
    dst(r, j) = accumulate ? dst(r, j) + v : v;
  }
};

// C[:, gate blocks] = A·W for one step's n rows. Without dropout masks, one StepGemm with the
// whole operand; with them (mask(g): gate g's rows of width `width`), gate g multiplies its
// masked copy A ⊙ mask(g) (in `scratch`) by its own column block, gate_operands[g].
template <typename T, typename Backend, typename Operand, typename MaskOf>
void GateProducts(Backend& sb, Index n, Index width, StepMatrix<const T> a, const Operand& whole,
                  const Operand* gate_operands, int gates, Index H, const MaskOf& mask,
                  T* scratch, T* c, Index ldc) {
  if (!gate_operands) return sb.StepGemm(n, a.data, a.ld, whole, T(0), c, ldc);
  const StepMatrix<T> dropped = Plain(scratch, width);
  for (int g = 0; g < gates; ++g) {
    sb.ForEach(n, width, ScaleRowsPoint<T>{dropped, a, mask(g), 1, n, false});
    sb.StepGemm(n, dropped.data, width, gate_operands[g], T(0), c + g * H, ldc);
  }
}

// Their transpose: C (+)= dG·Wᵀ, or with dropout masks Σ_g (dG_g·W_gᵀ) ⊙ mask(g) through
// `scratch` (gate g read A ⊙ mask(g), so its gradient w.r.t. A is masked the same way).
template <typename T, typename Backend, typename Operand, typename MaskOf>
void GateProductsGrad(Backend& sb, Index n, Index width, const T* dg, Index ld_dg,
                      const Operand& whole, const Operand* gate_operands, int gates, Index H,
                      const MaskOf& mask, T* scratch, StepMatrix<T> c, bool accumulate) {
  if (!gate_operands)
    return sb.StepGemm(n, dg, ld_dg, whole, accumulate ? T(1) : T(0), c.data, c.ld);
  for (int g = 0; g < gates; ++g) {
    sb.StepGemm(n, dg + g * H, ld_dg, gate_operands[g], T(0), scratch, width);
    sb.ForEach(n, width, ScaleRowsPoint<T>{c, Plain<const T>(scratch, width), mask(g), 1, n,
                                           accumulate || g > 0});
  }
}

// dst += src.
template <typename T>
struct AccumulatePoint {
  StepMatrix<T> dst;
  StepMatrix<const T> src;
  TFCELLS_HD void operator()(Index b, Index j) const { dst(b, j) += src(b, j); }
};

// The mask column of time t; without a mask, every row reads the same `true`.
template <typename Backend>
StepMatrix<const bool> MaskAt(Backend& be, const bool* mask, const Dims& d, Index t) {
  return mask ? AtStep(mask, d, t, 1) : StepMatrix<const bool>(be.TrueFlag(), 0);
}

}  // namespace detail

// Gate g's rows of a [G, B, width] dropout mask from batch row b0 on (null: no mask).
template <typename T>
StepMatrix<const T> DropoutRows(const T* masks, const Dims& d, Index width, int g, Index b0) {
  return masks ? StepMatrix<const T>(masks + (g * d.B + b0) * width, width)
               : StepMatrix<const T>();
}

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
  T* gx_step = ws;  // inference: one step's input projection (training: the gates cache)
  if (!training) ws += B * GH;
  T* rec = ws;
  ws += B * GH;
  T* state_pingpong = ws;  // inference: LSTM cell state or GRU r*h_prev, two [B,H] slots
  ws += 2 * B * H;
  T* dropped_x = ws;  // input dropout: x ⊙ one gate's mask, one step
  if (a.input_dropout) ws += B * d.I;
  T* dropped_h = ws;  // recurrent dropout: h_prev ⊙ one gate's mask, one step

  // The input projection runs inside the time loop, a step at a time, on the packed step
  // GEMM: the same FLOPs as one GEMM over all T*B rows, at the packed kernel's rate (109
  // against OpenBLAS' 99 GFLOP/s per core here) and into rows the pointwise kernel then finds
  // in cache. Biases are added in the pointwise kernels.
  const bool in_dropout = a.input_dropout != nullptr;
  const auto w_x = be.StepOperand(false, d.I, in_dropout ? 0 : GH, a.kernel, GH);
  decltype(be.StepOperand(false, d.I, 0, a.kernel, GH)) w_x_gate[4];
  if (in_dropout)
    for (int g = 0; g < G; ++g) w_x_gate[g] = be.StepOperand(false, d.I, H, a.kernel + g * H, GH);

  if (training) be.ForEach(B, H, detail::CopyPoint<T>{AtStep(a.h_prev, d, d.InputTime(0), H),
                                                      Plain(a.h0, H)});

  // The recurrent kernel as every step's GEMM reads it. GRU with reset_after=False multiplies
  // its z,r columns and its candidate columns separately (the other cells leave w_hh empty).
  const bool split_candidate = a.cell == CellKind::kGruResetBefore;
  const T* candidate_kernel = split_candidate ? a.recurrent_kernel + 2 * H : a.recurrent_kernel;
  // Gates whose product h_prev·W_h runs before the pointwise kernel (reset_after=False: z, r).
  const int product_gates = split_candidate ? 2 : G;
  const bool rec_dropout = a.recurrent_dropout != nullptr;
  const auto w_h = be.StepOperand(false, H, rec_dropout ? 0 : product_gates * H,
                                  a.recurrent_kernel, GH);
  const auto w_hh = be.StepOperand(false, H, split_candidate ? H : 0, candidate_kernel, GH);
  // With recurrent dropout each gate multiplies its own masked h_prev by its column block.
  decltype(be.StepOperand(false, H, 0, a.recurrent_kernel, GH)) w_h_gate[4];
  if (rec_dropout)
    for (int g = 0; g < product_gates; ++g)
      w_h_gate[g] = be.StepOperand(false, H, H, a.recurrent_kernel + g * H, GH);
  // One shard's step products from batch row b0: x_t·W_x into the gate rows, and h_prev·W_h
  // for the product gates into `out`.
  auto input_product = [&](Backend& sb, Index n, Index b0, StepMatrix<const T> x_t,
                           StepMatrix<T> gates) {
    auto mask = [&](int g) { return DropoutRows(a.input_dropout, d, d.I, g, b0); };
    detail::GateProducts(sb, n, d.I, x_t, w_x, in_dropout ? w_x_gate : nullptr, G, H, mask,
                         dropped_x + b0 * d.I, gates.data, gates.ld);
  };
  auto recurrent_product = [&](Backend& sb, Index n, Index b0, StepMatrix<const T> h_prev,
                               T* out, Index ld_out) {
    auto mask = [&](int g) { return DropoutRows(a.recurrent_dropout, d, H, g, b0); };
    detail::GateProducts(sb, n, H, h_prev, w_h, rec_dropout ? w_h_gate : nullptr,
                         product_gates, H, mask, dropped_h + b0 * H, out, ld_out);
  };

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
      const StepMatrix<T> gates = training ? at(a.gates, t, GH) : plain(gx_step, GH);
      input_product(sb, n, b0, at(a.x, t, d.I), gates);
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
          recurrent_product(sb, n, b0, h_prev, rec_rows, GH);
          const StepMatrix<const T> c_prev =
              s == 0 ? plain(a.c0, H) : StepMatrix<const T>(aux_at(s - 1));
          sb.ForEach(n, H, LstmForwardPoint<T>{gates, Plain(rec_rows, GH), a.bias, h_prev,
                                               c_prev, mask, h, aux_at(s), h_next_cache, H});
          break;
        }
        case CellKind::kGruResetAfter: {
          recurrent_product(sb, n, b0, h_prev, rec_rows, GH);
          sb.ForEach(n, H, GruResetAfterForwardPoint<T>{
                               gates, Plain(rec_rows, GH), a.bias, h_prev, mask, h,
                               training ? aux_at(s) : StepMatrix<T>(), h_next_cache, H});
          break;
        }
        case CellKind::kGruResetBefore: {
          // rec holds h_prev·W_h[:, :2H] as [B, 2H], then (r*h_prev)·W_h[:, 2H:] as [B, H].
          T* rec_zr = rec + b0 * 2 * H;
          T* rec_h = rec + B * 2 * H + b0 * H;
          recurrent_product(sb, n, b0, h_prev, rec_zr, 2 * H);
          const StepMatrix<T> reset_h = aux_at(s);
          sb.ForEach(n, H, GruResetBeforeForwardGates<T>{gates, Plain(rec_zr, 2 * H), a.bias,
                                                         h_prev,
                                                         DropoutRows(a.recurrent_dropout, d,
                                                                     H, 2, b0),
                                                         reset_h, H});
          sb.StepGemm(n, reset_h.data, reset_h.ld, w_hh, T(0), rec_h, H);
          sb.ForEach(n, H, GruResetBeforeForwardState<T>{gates, Plain(rec_h, H), a.bias, h_prev,
                                                         mask, h, h_next_cache, H});
          break;
        }
        case CellKind::kSimpleRnn: {
          recurrent_product(sb, n, b0, h_prev, rec_rows, GH);
          sb.ForEach(n, H, SimpleRnnForwardPoint<T>{gates, Plain(rec_rows, GH), a.bias, h_prev,
                                                    mask, h, h_next_cache, H});
          break;
        }
      }
    }
  };
  be.ForRowShards(B, 2.0 * B * (d.I + H) * GH, run_rows);
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
      be.ForEach(BiasRows(a.cell), GH, detail::ZeroOrCopyPoint<T>{Plain(a.dbias, GH), {}});
    }
    return;
  }

  // Workspace: gate gradients (all steps, or one step's worth), GRU's recurrent-side gate
  // gradients, the per-row bias sums, three [B,H] carries, and the dropout scratch.
  const bool keep_all = KeepsAllGateGrads(m);
  const bool keep_all_rec = m & kGradRecurrentKernel;
  T* ws = a.workspace;
  T* dgates_all = ws;
  ws += (keep_all ? rows : B) * GH;
  T* dgates_rec_all = nullptr;
  if (a.cell == CellKind::kGruResetAfter) {
    dgates_rec_all = ws;
    ws += (keep_all_rec ? rows : B) * GH;
  }
  // db: each batch row's gate gradients summed over the steps in the loop (in cache), then the
  // rows summed in order, so the result does not depend on how the rows are sharded.
  const bool want_db = (m & kGradBias) && a.bias;
  T* bias_sums = ws;  // [BiasRows, B, GH]: input side, then GRU's recurrent side
  if (m & kGradBias) ws += BiasRows(a.cell) * B * GH;
  T* dh = ws;
  T* dc = ws + B * H;
  T* d_reset_h = ws + 2 * B * H;
  ws += 3 * B * H;
  const bool in_dropout = a.input_dropout != nullptr, rec_dropout = a.recurrent_dropout != nullptr;
  T* masked_rows = ws;  // dropout: x or h_prev ⊙ one gate's mask, all rows (weight GEMMs)
  ws += d.Rows() * std::max(in_dropout && (m & kGradKernel) ? d.I : 0,
                            rec_dropout && (m & kGradRecurrentKernel) ? H : 0);
  T* step_product = ws;  // recurrent dropout: one gate's share of dh_prev, one step
  if (rec_dropout) ws += B * H;
  T* step_dx = ws;  // input dropout: one gate's share of dx, one step

  // The recurrent kernel, transposed, as the GEMM carrying dh to the previous step reads it
  // (only the first processed step carries nothing when dh0 is not wanted). GRU with
  // reset_after=False: its z,r rows and its candidate rows separately.
  const bool split_candidate = a.cell == CellKind::kGruResetBefore;
  const T* candidate_kernel = split_candidate ? a.recurrent_kernel + 2 * H : a.recurrent_kernel;
  const bool carries = d.T > 1 || (m & kGradH0);
  const int product_gates = split_candidate ? 2 : G;
  const auto w_h_t = be.StepOperand(true, product_gates * H, carries && !rec_dropout ? H : 0,
                                    a.recurrent_kernel, GH);
  const auto w_hh_t = be.StepOperand(true, H, split_candidate ? H : 0, candidate_kernel, GH);
  decltype(be.StepOperand(true, H, 0, a.recurrent_kernel, GH)) w_h_t_gate[4];
  if (rec_dropout && carries)
    for (int g = 0; g < product_gates; ++g)
      w_h_t_gate[g] = be.StepOperand(true, H, H, a.recurrent_kernel + g * H, GH);
  // dx is computed a step at a time, like the forward's input projection: dx_t = dG_t·W_xᵀ.
  const bool want_dx = m & kGradX;
  const auto w_x_t = be.StepOperand(true, GH, want_dx && !in_dropout ? d.I : 0, a.kernel, GH);
  decltype(be.StepOperand(true, H, 0, a.kernel, GH)) w_x_t_gate[4];
  if (want_dx && in_dropout)
    for (int g = 0; g < G; ++g) w_x_t_gate[g] = be.StepOperand(true, H, d.I, a.kernel + g * H, GH);
  // One shard's step products from batch row b0: dh_prev += dG·W_hᵀ over the product gates,
  // and dx_t = dG·W_xᵀ.
  auto carry_product = [&](Backend& sb, Index n, Index b0, const T* dg, Index ld_dg,
                           StepMatrix<T> dh_rows) {
    auto mask = [&](int g) { return DropoutRows(a.recurrent_dropout, d, H, g, b0); };
    detail::GateProductsGrad(sb, n, H, dg, ld_dg, w_h_t, rec_dropout ? w_h_t_gate : nullptr,
                             product_gates, H, mask, step_product + b0 * H, dh_rows, true);
  };
  auto dx_product = [&](Backend& sb, Index n, Index b0, StepMatrix<const T> dg,
                        StepMatrix<T> dx_rows) {
    auto mask = [&](int g) { return DropoutRows(a.input_dropout, d, d.I, g, b0); };
    detail::GateProductsGrad(sb, n, d.I, dg.data, dg.ld, w_x_t,
                             in_dropout ? w_x_t_gate : nullptr, G, H, mask,
                             step_dx + b0 * d.I, dx_rows, false);
  };
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
    for (Index r = 0; want_db && r < BiasRows(a.cell); ++r)
      sb.ForEach(n, GH, detail::ZeroOrCopyPoint<T>{plain(bias_sums + r * B * GH, GH), {}});
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
      // GRU reset_after's recurrent-side gate gradients (null for the other cells).
      const StepMatrix<T> dgates_rec =
          keep_all_rec ? at(dgates_rec_all, t, GH) : plain(dgates_rec_all, GH);
      // The GEMM into dh at s == 0 only serves dh0.
      const bool carry_to_prev = s > 0 || (m & kGradH0);

      switch (a.cell) {
        case CellKind::kLstm: {
          const StepMatrix<const T> c_prev =
              s == 0 ? plain(a.c0, H) : at(a.aux, d.InputTime(s - 1), H);
          sb.ForEach(n, H, LstmBackwardPoint<T>{gates, at(a.aux, t, H), c_prev, dy, mask,
                                                dgates, dh_rows, dc_rows, H});
          if (carry_to_prev) carry_product(sb, n, b0, dgates.data, dgates.ld, dh_rows);
          break;
        }
        case CellKind::kGruResetAfter: {
          sb.ForEach(n, H, GruResetAfterBackwardPoint<T>{gates, at(a.aux, t, H), h_prev, dy,
                                                         mask, dgates, dgates_rec, dh_rows, H});
          if (carry_to_prev) carry_product(sb, n, b0, dgates_rec.data, dgates_rec.ld, dh_rows);
          break;
        }
        case CellKind::kGruResetBefore: {
          const StepMatrix<T> d_reset_rows = plain(d_reset_h, H);
          sb.ForEach(n, H, GruResetBeforeBackwardState<T>{gates, h_prev, dy, mask, dgates,
                                                          dh_rows, H});
          // d(r * h_prev) = dhh · W_hhᵀ
          sb.StepGemm(n, dgates.data + 2 * H, dgates.ld, w_hh_t, T(0), d_reset_rows.data, H);
          sb.ForEach(n, H, GruResetBeforeBackwardGates<T>{
                               gates, h_prev, DropoutRows(a.recurrent_dropout, d, H, 2, b0),
                               d_reset_rows, mask,
                               dgates, dh_rows, H});
          if (carry_to_prev) carry_product(sb, n, b0, dgates.data, dgates.ld, dh_rows);
          break;
        }
        case CellKind::kSimpleRnn: {
          sb.ForEach(n, H, SimpleRnnBackwardPoint<T>{gates, dy, mask, dgates, dh_rows, H});
          if (carry_to_prev) carry_product(sb, n, b0, dgates.data, dgates.ld, dh_rows);
          break;
        }
      }
      if (want_dx) dx_product(sb, n, b0, dgates, at(a.dx, t, d.I));
      if (want_db) {
        sb.ForEach(n, GH, detail::AccumulatePoint<T>{plain(bias_sums, GH), dgates});
        if (dgates_rec)
          sb.ForEach(n, GH,
                     detail::AccumulatePoint<T>{plain(bias_sums + B * GH, GH), dgates_rec});
      }
    }
  };
  be.ForRowShards(B, 2.0 * B * ((want_dx ? d.I : 0) + H) * GH, run_rows);

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
  // Row r of a sequence buffer belongs to batch entry (r / div) % B.
  const Index div = d.time_major ? 1 : d.T;
  auto mask_rows = [&](const T* src, Index width, const T* masks, int g, T* dst) {
    be.ForEach(rows, width, detail::ScaleRowsPoint<T>{Plain(dst, width), Plain(src, width),
                                                      Plain(masks + g * B * width, width),
                                                      div, B, false});
  };
  if (want_dx) counters.grad_x++;  // computed in the loop above
  if (m & kGradKernel) {
    if (in_dropout) {  // dW_x[:, g] = (x ⊙ mx_g)ᵀ·dG_g
      for (int g = 0; g < G; ++g) {
        mask_rows(a.x, d.I, a.input_dropout, g, masked_rows);
        be.Gemm(true, false, d.I, H, rows, masked_rows, d.I, dg_in + g * H, GH, T(0),
                a.dkernel + g * H, GH);
      }
    } else {
      be.Gemm(true, false, d.I, GH, rows, a.x, d.I, dg_in, GH, T(0), a.dkernel, GH);
    }
    counters.grad_kernel++;
  }
  if (m & kGradRecurrentKernel) {
    if (rec_dropout) {  // dW_h[:, g] = (h_prev ⊙ mh_g)ᵀ·dG_g
      for (int g = 0; g < product_gates; ++g) {
        mask_rows(a.h_prev, H, a.recurrent_dropout, g, masked_rows);
        be.Gemm(true, false, H, H, rows, masked_rows, H, dg_rec + g * H, GH, T(0),
                a.drecurrent_kernel + g * H, GH);
      }
    } else {
      be.Gemm(true, false, H, product_gates * H, rows, a.h_prev, H, dg_rec, GH, T(0),
              a.drecurrent_kernel, GH);
    }
    if (split_candidate)  // the candidate's GEMM took r * h_prev (⊙ mh_2), kept in aux
      be.Gemm(true, false, H, H, rows, a.aux, H, dg_rec + 2 * H, GH, T(0),
              a.drecurrent_kernel + 2 * H, GH);
    counters.grad_recurrent_kernel++;
  }
  if (want_db) {
    for (Index r = 0; r < BiasRows(a.cell); ++r)
      be.ColumnSum(B, GH, bias_sums + r * B * GH, GH, a.dbias + r * GH);
    counters.grad_bias++;
  }
}

TFCELLS_ISA_END
}  // namespace tfcells
