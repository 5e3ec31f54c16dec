// One call of a fused recurrent op, described without any framework: which cell, the sizes and
// layout, which optional inputs are present, which gradients are wanted and where the backend
// runs the input projection. A binding (TensorFlow kernel, pybind11 module) fills CallOptions
// and the input shapes, CallPlan::Make validates and normalises them once, and the plan then
// answers every size the binding must allocate: outputs, training cache, workspace. The driver
// (rnn.h) carves the workspace with the same layout, so sizing and carving cannot drift, and it
// refuses a buffer smaller than the plan asks for.
//
// The pattern is cuDNN's RNN descriptor (then cudnnGetRNNTempSpaceSizes, then the call) and
// oneDNN's primitive descriptor (validated once; it answers workspace and scratchpad sizes).
#pragma once

#include <string>
#include <vector>

#include "common.h"

namespace tfcells {

using Shape = std::vector<Index>;
std::string ShapeString(const Shape& s);

// What the sequences, the states and their gradients are stored in (storage.h): the compute
// type itself, or a 16-bit type with float32 compute.
enum class Storage { kCompute, kBFloat16, kFloat16 };

// Everything about a call that is not read from a tensor.
struct CallOptions {
  CellKind cell = CellKind::kLstm;
  bool time_major = false;
  bool go_backwards = false;
  bool has_bias = true;
  bool has_mask = false;
  bool has_input_dropout = false;
  bool has_recurrent_dropout = false;
  bool training = true;      // the forward pass keeps the cache its gradient reads
  // The gradients a backward pass produces (normalised by Make). For a forward call, those its
  // backward pass may be asked for: the training cache leaves out what none of them reads.
  int grad_mask = kGradAll;
  InputProjection input_projection = InputProjection::kPerStep;  // the backend's choice
  // kPerStep: the products by W_x of this many steps run back to back (W_x then stays in
  // cache through them): x_t·W_x ahead of the recurrence, dx_t behind it; the most the backend
  // may use. Make clamps it to [1, T], and for inference to the steps whose projections fit 16 Mi
  // elements of workspace.
  Index projection_steps = 1;
  Storage storage = Storage::kCompute;
};

// The shapes of the forward inputs; absent optional inputs are ignored (c0 outside the LSTM).
struct InputShapes {
  Shape x, h0, c0, kernel, recurrent_kernel, bias, mask, input_dropout, recurrent_dropout;
};

// The training cache, laid out like x (indexed by input time), in elements.
struct CacheSizes {
  Index gates = 0;   // activated gates [.., G*H]; 0 where y holds them (CallPlan::GatesFromY)
  Index aux = 0;     // CellInfo::aux [.., H], or 0
  Index h_prev = 0;  // the state entering each step [.., H]; 0 where nothing reads it, or
                     // where the backward pass reads it from y (CallPlan::HPrevFromY)
};

// A piece of a workspace: elements [offset, offset + size).
struct Segment {
  Index offset = 0, size = 0;
};

// With 16-bit storage, compute-type copies of the tensors a pass reads (widened before it runs)
// and writes (rounded after it). Segments a pass does not need have size 0.
struct StagedTensors {
  Segment x, h0, c0, y, h_last, c_last;     // forward; the backward reads x and c0
  Segment dy, dh_last, dc_last, dx, dh0, dc0;  // backward
};

// The forward workspace. Segments a call does not need have size 0.
struct ForwardLayout {
  Segment input_projection;  // inference: x·W_x of projection_steps steps, or of all steps
  Segment recurrent;         // one step's h_prev·W_h [B, G*H]
  Segment state;             // inference with Aux::kState: two alternating [B, H] slots
  Segment dropped_x;         // input dropout: x ⊙ one gate's mask (one step, or all rows)
  Segment dropped_h;         // recurrent dropout: h_prev ⊙ one gate's mask, one step
  Segment zero_bias;         // no bias: zeros in its place [bias_rows, G*H]
  StagedTensors staged;
  Index total = 0;
};

// The backward workspace.
struct BackwardLayout {
  Segment dgates;          // gate gradients: all steps when a GEMM after the loop reads them,
                           // else two steps' (per-step dx: projection_steps + 1 steps'); none
                           // for GRU reset_after's input side without dx and dW_x
  Segment dgates_rec;      // GRU reset_after: the recurrent side's gate gradients
  Segment bias_sums;       // [bias_rows, B, G*H]: each row's bias gradient summed over steps
  Segment dh, dc, d_reset;  // [B, H] carries (dc: LSTM; d_reset: GRU reset_after=False)
  Segment masked_rows;     // dropout: x or h_prev ⊙ one gate's mask, all rows
  Segment step_product;    // recurrent dropout: one gate's share of dh_prev, one step
  Segment step_dx;         // input dropout, per-step dx: one gate's share of dx_t
  Segment zero_row;        // [H] zeros: every row of an absent dy (read with ld 0)
  StagedTensors staged;
  Index total = 0;
};

class CallPlan {
 public:
  // Validates the shapes against the options; returns "" and fills *plan, or a message that
  // names the argument, the shape it got and the concrete shape expected.
  static std::string Make(const CallOptions& options, const InputShapes& shapes,
                          CallPlan* plan);

  // The input shapes of a valid call with these options and sizes (for size queries and tests
  // that have sizes rather than tensors).
  static InputShapes ShapesFor(const CallOptions& options, const Dims& d);

  const CallOptions& options() const { return options_; }
  CellKind cell() const { return options_.cell; }
  const CellInfo& info() const { return info_; }
  const Dims& dims() const { return dims_; }
  bool training() const { return options_.training; }
  // The gradients a backward pass produces: the options' mask less what this call cannot
  // have (c0 outside the LSTM, an absent bias).
  int grad_mask() const { return options_.grad_mask; }
  bool wants(GradBit bit) const { return options_.grad_mask & bit; }

  // Output shapes: the sequence [B, T, width] ([T, B, width] time-major) and a state [B, H].
  Shape SequenceShape(Index width) const;
  Shape StateShape() const { return {dims_.B, dims_.H}; }
  // The shape of a gradient (that of its input; every gradient of an absent input is empty).
  const Shape& GradShape(GradBit bit) const;

  // The training cache a forward pass with training writes and a backward pass reads.
  CacheSizes Cache() const;
  // Whether the backward pass reads the state entering each step, h_prev (dW_h = Σ h_prevᵀ·dG,
  // and the GRUs' pointwise step).
  bool ReadsHPrev() const;
  // Whether it reads h_prev from the forward's output y a step behind (h0 at the first step)
  // rather than from a cache: where y is in the compute type and in input-time order (not
  // go_backwards, whose y is reversed). The forward then keeps no copy of y.
  bool HPrevFromY() const;
  // Whether it reads each step's activated gate from y instead of a gates cache: where that gate
  // is the new state (CellInfo::gate_is_state) and y is in the compute type. The gate of a
  // masked row, which y does not hold, gets no gradient, so is never read. The forward then
  // keeps no gates cache, and projects x·W_x into workspace slots as inference does.
  bool GatesFromY() const;
  // Whether the forward writes each step's x·W_x into its gates cache (then activates it in
  // place), or into workspace slots.
  bool ProjectsIntoCache() const { return options_.training && !GatesFromY(); }
  // Whether a backward pass must be given the forward's y.
  bool NeedsY() const { return (ReadsHPrev() && HPrevFromY()) || GatesFromY(); }
  const ForwardLayout& forward_layout() const { return forward_; }
  const BackwardLayout& backward_layout() const { return backward_; }

  // Checks what a backward pass (a training plan) receives besides the forward inputs: the
  // cache sizes (CheckBackwardCache), the forward's y (CheckBackwardY) and the incoming
  // gradients' shapes (each may be absent: null, or empty).
  std::string CheckBackwardInputs(const CacheSizes& cache, const Shape* y, const Shape* dy,
                                  const Shape* dh_last, const Shape* dc_last) const;
  // The cache sizes alone: Cache()'s, or a kept h_prev that this backward pass never reads.
  std::string CheckBackwardCache(const CacheSizes& cache) const;
  // The forward's y (null: none given): its sequence shape where the pass needs it (NeedsY),
  // anything otherwise.
  std::string CheckBackwardY(const Shape* y) const;

  // Whether the backward pass keeps every step's gate gradients (`dgates`: a GEMM after the
  // loop reads them).
  bool KeepsAllGateGrads() const;

 private:
  void Layout();

  CallOptions options_;
  CellInfo info_{};
  Dims dims_;
  InputShapes shapes_;
  ForwardLayout forward_;
  BackwardLayout backward_;
};

// How often each piece of work ran in this process: lets tests prove that a skipped gradient
// was never computed. Names and order: kCounterNames, exported to Python by name.
enum Counter : int {
  kForwardCalls,
  kBackwardCalls,
  kGradXWork,
  kGradH0Work,
  kGradKernelWork,
  kGradRecurrentKernelWork,
  kGradBiasWork,
  kRowCopyProducts,  // CPU step products that copied their rows first (CpuBackend::CopiesRows)
  kNumCounters
};
inline constexpr const char* kCounterNames[kNumCounters] = {
    "forward_calls", "backward_calls", "grad_x", "grad_h0", "grad_kernel",
    "grad_recurrent_kernel", "grad_bias", "row_copy_products"};
void CountWork(Counter c);
std::int64_t WorkCount(Counter c);
// Adds n (which may be negative) to a counter: a replayed CUDA graph counts the work its
// capture recorded; a capture that is thrown away takes its counts back.
void AddWork(Counter c, std::int64_t n);

// While one lives, the work counted on its thread is also added to `counts` (nested recorders:
// the innermost).
class WorkRecorder {
 public:
  WorkRecorder();
  ~WorkRecorder();
  WorkRecorder(const WorkRecorder&) = delete;
  WorkRecorder& operator=(const WorkRecorder&) = delete;
  std::int64_t counts[kNumCounters] = {};

 private:
  WorkRecorder* outer_;
};

}  // namespace tfcells
