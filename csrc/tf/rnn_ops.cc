// Registration of the fused recurrent ops and their CPU kernels: for each cell family (kOpFamilies,
// rnn_kernels.h) a forward op and a gradient op, their inputs and outputs generated from the
// core's tables (CellInfo, kGradients), so that nothing here lists them by hand.
#include <new>

#include "../core/cpu/cpu_rnn.h"
#include "../core/cpu/cpu_tuning.h"
#include "rnn_kernels.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/threadpool.h"

namespace tfcells {
namespace {

using tensorflow::shape_inference::DimensionHandle;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

// Output shapes of a forward op: y, h_last (and c_last), then the cache, known only at run time.
tensorflow::Status ForwardShape(InferenceContext* c, bool cell_state) {
  bool time_major, training;
  TF_RETURN_IF_ERROR(c->GetAttr("time_major", &time_major));
  TF_RETURN_IF_ERROR(c->GetAttr("training", &training));
  ShapeHandle x, rk;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &x));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(cell_state ? 4 : 3), 2, &rk));
  const DimensionHandle t = c->Dim(x, time_major ? 0 : 1), b = c->Dim(x, time_major ? 1 : 0);
  const DimensionHandle h = c->Dim(rk, 0);
  int out = 0;
  c->set_output(out++, time_major ? c->MakeShape({t, b, h}) : c->MakeShape({b, t, h}));
  c->set_output(out++, c->MakeShape({b, h}));
  if (cell_state) c->set_output(out++, c->MakeShape({b, h}));
  for (; out < c->num_outputs(); ++out)
    c->set_output(out, training ? c->Vector(InferenceContext::kUnknownDim) : c->Vector(0));
  return tensorflow::OkStatus();
}

// Gradients have their input's shape when requested and are empty otherwise.
tensorflow::Status GradShape(InferenceContext* c) {
  for (int i = 0; i < c->num_outputs(); ++i) c->set_output(i, c->UnknownShape());
  return tensorflow::OkStatus();
}

using OpDef = tensorflow::register_op::OpDefBuilderWrapper;

// The forward inputs of a cell family's ops, and the attributes both ops share. The dropout
// masks (Keras' implementation=1 while training; [G, B, I] and [G, B, H]) and the step mask
// have no gradient; each optional input is empty unless its has_* attribute is set.
//
// T is the type of the sequences, the states and their gradients; Tcompute that of the weights,
// the dropout masks, the training cache and the weight gradients, and the type the kernels
// compute in: T itself for float32 and float64, float32 for bfloat16 and float16 (storage.h).
void AddForwardInputs(OpDef& op, const OpFamily& family) {
  op.Input("x: T").Input("h0: T");
  if (Info(family.cell).cell_state) op.Input("c0: T");
  op.Input("kernel: Tcompute").Input("recurrent_kernel: Tcompute").Input("bias: Tcompute");
  op.Input("mask: bool");
  op.Input("input_dropout: Tcompute").Input("recurrent_dropout: Tcompute");
  op.Attr("T: {float, double, bfloat16, half}")
      .Attr("Tcompute: {float, double}")
      .Attr("time_major: bool = false")
      .Attr("go_backwards: bool = false")
      .Attr("has_bias: bool = true")
      .Attr("has_mask: bool = false")
      .Attr("has_input_dropout: bool = false")
      .Attr("has_recurrent_dropout: bool = false");
  if (IsGruFamily(family.cell)) op.Attr("reset_after: bool = true");
}

// The forward op returns the output sequence, the final state(s) and, when `training`, the
// cache its gradient op reads. The h_prev cache is empty where the gradient op reads each
// step's h_prev from y (CallPlan::HPrevFromY), and where nothing reads it: `frozen` records
// the GradBits its caller ruled out, for the Python gradient function to honour, and without
// dW_h only the GRUs read h_prev. SimpleRNN's gates cache is empty where its gate is read
// from y (CallPlan::GatesFromY).
void RegisterForward(const OpFamily& family) {
  const bool cell_state = Info(family.cell).cell_state;
  OpDef op(family.forward);
  AddForwardInputs(op, family);
  op.Output("y: T").Output("h_last: T");
  if (cell_state) op.Output("c_last: T");
  op.Output("gates: Tcompute").Output("aux: Tcompute").Output("h_prev: Tcompute");
  op.Attr("training: bool = true").Attr("frozen: int = 0");
  op.SetShapeFn([cell_state](InferenceContext* c) { return ForwardShape(c, cell_state); });
  op();
}

// The gradient op reads the forward inputs, the forward's cache and its output sequence y, and
// produces only the gradients named by `grad_mask` (GradBits, common.h), one output per forward
// input that can have a gradient (kGradients); the others are empty.
void RegisterGradient(const OpFamily& family) {
  const bool cell_state = Info(family.cell).cell_state;
  OpDef op(family.gradient);
  AddForwardInputs(op, family);
  op.Input("gates: Tcompute").Input("aux: Tcompute").Input("h_prev: Tcompute");
  op.Input("y: T");  // the forward's output: each step's h_prev where no cache keeps it,
                     // and SimpleRNN's activated gate (CallPlan::GatesFromY)
  op.Input("dy: T").Input("dh_last: T");
  if (cell_state) op.Input("dc_last: T");
  for (const GradientInfo& g : kGradients)
    if (g.bit != kGradC0 || cell_state)
      op.Output(std::string(g.output) + (IsStateGradient(g.bit) ? ": T" : ": Tcompute"));
  op.Attr("grad_mask: int");
  op.SetShapeFn(GradShape);
  op();
}

const tensorflow::InitOnStartupMarker kRegistered = [] {
  for (const OpFamily& family : kOpFamilies) {
    RegisterForward(family);
    RegisterGradient(family);
  }
  return tensorflow::InitOnStartupMarker{};
}();

}  // namespace
}  // namespace tfcells

namespace tfcells {
namespace {

// Large GEMMs are split across TensorFlow's intra-op pool (the op itself runs on an inter-op
// thread, so waiting here never starves the pool).
struct CpuLauncher {
  static constexpr InputProjection kInputProjection = kCpuInputProjection;
  static constexpr Index kProjectionSteps = kCpuProjectionSteps;
  static constexpr bool kKeepsBuffers = true;  // rnn_kernels.h' WorkspaceCache, OutputCache

  template <typename T, typename S>
  static void Forward(tensorflow::OpKernelContext* ctx, const ForwardArgs<T, S>& a) {
    WithPool(ctx, [&](const CpuOptions& options) { ForwardCpu(a, options); });
  }
  template <typename T, typename S>
  static void Backward(tensorflow::OpKernelContext* ctx, const BackwardArgs<T, S>& a) {
    WithPool(ctx, [&](const CpuOptions& options) { BackwardCpu(a, options); });
  }

  template <typename Run>
  static void WithPool(tensorflow::OpKernelContext* ctx, const Run& run) {
    const auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
    tensorflow::thread::ThreadPool* pool = workers->workers;
    const ParallelRunner runner = [pool](int tasks, const std::function<void(int)>& fn) {
      pool->ParallelFor(tasks, cpu_tuning::kPoolCostPerTask,
                        [&fn](std::int64_t begin, std::int64_t end) {
                          for (std::int64_t i = begin; i < end; ++i) fn(static_cast<int>(i));
                        });
    };
    CpuOptions options;
    options.runner = &runner;
    options.max_tasks = workers->num_threads;
    try {
      run(options);
    } catch (const std::bad_alloc&) {  // the packed recurrent kernel (as large as W_h)
      ctx->CtxFailure(tensorflow::errors::ResourceExhausted(
          "tfcells: out of memory for the packed recurrent kernel"));
    } catch (const std::exception& e) {  // a buffer the plan refused: a bug in this binding
      ctx->CtxFailure(tensorflow::errors::Internal(e.what()));
    }
  }
};

TFCELLS_REGISTER_KERNELS(tensorflow::DEVICE_CPU, CpuLauncher)

}  // namespace
}  // namespace tfcells

// Read by tfcells.testing through ctypes: the work counters of this library's copy of the core,
// in kCounterNames order (which the pybind11 module exports as WORK_COUNTERS); `n` is how many
// the caller expects, refused (-1) unless it matches.
extern "C" int tfcells_work_counters(std::int64_t* out, int n) {
  if (n != tfcells::kNumCounters) return -1;
  for (int i = 0; i < n; ++i) out[i] = tfcells::WorkCount(static_cast<tfcells::Counter>(i));
  return n;
}

extern "C" void tfcells_set_gemm_threads(int threads) { tfcells::SetCpuGemmThreads(threads); }
extern "C" int tfcells_gemm_threads() { return tfcells::CpuGemmThreads(); }
extern "C" void tfcells_set_split_units(int on) { tfcells::SetCpuSplitUnits(on != 0); }
extern "C" int tfcells_split_units() { return tfcells::CpuSplitUnits() ? 1 : 0; }
extern "C" void tfcells_set_pin_shards(int on) { tfcells::SetCpuPinShards(on != 0); }
extern "C" int tfcells_pin_shards() { return tfcells::CpuPinShards() ? 1 : 0; }
// 0: auto, 1: always, 2: never (tfcells::RowCopies' order).
extern "C" void tfcells_set_row_copies(int copies) {
  tfcells::SetCpuRowCopies(static_cast<tfcells::RowCopies>(copies));
}
extern "C" int tfcells_row_copies() { return static_cast<int>(tfcells::CpuRowCopies()); }
