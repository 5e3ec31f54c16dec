// Registration of the fused recurrent ops and their CPU kernels.
//
// Each cell has a forward op and a gradient op. The forward op returns the output sequence,
// the final state(s) and, when `training`, the cache its gradient op reads. The gradient op
// produces only the gradients named by `grad_mask` (GradBits, csrc/core/common.h); the others
// are returned as empty tensors. `frozen` on the forward op records the GradBits its caller
// ruled out, for the Python gradient function to honour. The dropout masks (Keras'
// implementation=1 while training; [G, B, I] and [G, B, H]) are inputs without a gradient,
// empty unless their has_* attribute is set.
#include <new>

#include "../core/cpu/cpu_rnn.h"
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

tensorflow::Status ForwardShape(InferenceContext* c) {
  bool time_major, training;
  TF_RETURN_IF_ERROR(c->GetAttr("time_major", &time_major));
  TF_RETURN_IF_ERROR(c->GetAttr("training", &training));
  ShapeHandle x, rk;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &x));
  const bool lstm = c->num_outputs() == 6;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(lstm ? 4 : 3), 2, &rk));
  const DimensionHandle t = c->Dim(x, time_major ? 0 : 1), b = c->Dim(x, time_major ? 1 : 0);
  const DimensionHandle h = c->Dim(rk, 0);
  int out = 0;
  c->set_output(out++, time_major ? c->MakeShape({t, b, h}) : c->MakeShape({b, t, h}));
  c->set_output(out++, c->MakeShape({b, h}));
  if (lstm) c->set_output(out++, c->MakeShape({b, h}));
  for (; out < c->num_outputs(); ++out)
    c->set_output(out, training ? c->Vector(InferenceContext::kUnknownDim) : c->Vector(0));
  return tensorflow::OkStatus();
}

// Gradients have their input's shape when requested and are empty otherwise.
tensorflow::Status GradShape(InferenceContext* c) {
  for (int i = 0; i < c->num_outputs(); ++i) c->set_output(i, c->UnknownShape());
  return tensorflow::OkStatus();
}

}  // namespace
}  // namespace tfcells

#define TFCELLS_COMMON_ATTRS                   \
  Attr("T: {float, double}")                   \
      .Attr("time_major: bool = false")        \
      .Attr("go_backwards: bool = false")      \
      .Attr("has_bias: bool = true")           \
      .Attr("has_mask: bool = false")          \
      .Attr("has_input_dropout: bool = false") \
      .Attr("has_recurrent_dropout: bool = false")

REGISTER_OP("TfcellsLstm")
    .Input("x: T").Input("h0: T").Input("c0: T").Input("kernel: T")
    .Input("recurrent_kernel: T").Input("bias: T").Input("mask: bool")
    .Input("input_dropout: T").Input("recurrent_dropout: T")
    .Output("y: T").Output("h_last: T").Output("c_last: T")
    .Output("gates: T").Output("aux: T").Output("h_prev: T")
    .TFCELLS_COMMON_ATTRS
    .Attr("training: bool = true").Attr("frozen: int = 0")
    .SetShapeFn(tfcells::ForwardShape);

REGISTER_OP("TfcellsLstmGrad")
    .Input("x: T").Input("h0: T").Input("c0: T").Input("kernel: T")
    .Input("recurrent_kernel: T").Input("bias: T").Input("mask: bool")
    .Input("input_dropout: T").Input("recurrent_dropout: T")
    .Input("gates: T").Input("aux: T").Input("h_prev: T")
    .Input("dy: T").Input("dh_last: T").Input("dc_last: T")
    .Output("dx: T").Output("dh0: T").Output("dc0: T").Output("dkernel: T")
    .Output("drecurrent_kernel: T").Output("dbias: T")
    .TFCELLS_COMMON_ATTRS
    .Attr("grad_mask: int")
    .SetShapeFn(tfcells::GradShape);

REGISTER_OP("TfcellsGru")
    .Input("x: T").Input("h0: T").Input("kernel: T")
    .Input("recurrent_kernel: T").Input("bias: T").Input("mask: bool")
    .Input("input_dropout: T").Input("recurrent_dropout: T")
    .Output("y: T").Output("h_last: T")
    .Output("gates: T").Output("aux: T").Output("h_prev: T")
    .TFCELLS_COMMON_ATTRS
    .Attr("reset_after: bool = true")
    .Attr("training: bool = true").Attr("frozen: int = 0")
    .SetShapeFn(tfcells::ForwardShape);

REGISTER_OP("TfcellsGruGrad")
    .Input("x: T").Input("h0: T").Input("kernel: T")
    .Input("recurrent_kernel: T").Input("bias: T").Input("mask: bool")
    .Input("input_dropout: T").Input("recurrent_dropout: T")
    .Input("gates: T").Input("aux: T").Input("h_prev: T")
    .Input("dy: T").Input("dh_last: T")
    .Output("dx: T").Output("dh0: T").Output("dkernel: T")
    .Output("drecurrent_kernel: T").Output("dbias: T")
    .TFCELLS_COMMON_ATTRS
    .Attr("reset_after: bool = true")
    .Attr("grad_mask: int")
    .SetShapeFn(tfcells::GradShape);

REGISTER_OP("TfcellsSimpleRnn")
    .Input("x: T").Input("h0: T").Input("kernel: T")
    .Input("recurrent_kernel: T").Input("bias: T").Input("mask: bool")
    .Input("input_dropout: T").Input("recurrent_dropout: T")
    .Output("y: T").Output("h_last: T")
    .Output("gates: T").Output("aux: T").Output("h_prev: T")
    .TFCELLS_COMMON_ATTRS
    .Attr("training: bool = true").Attr("frozen: int = 0")
    .SetShapeFn(tfcells::ForwardShape);

REGISTER_OP("TfcellsSimpleRnnGrad")
    .Input("x: T").Input("h0: T").Input("kernel: T")
    .Input("recurrent_kernel: T").Input("bias: T").Input("mask: bool")
    .Input("input_dropout: T").Input("recurrent_dropout: T")
    .Input("gates: T").Input("aux: T").Input("h_prev: T")
    .Input("dy: T").Input("dh_last: T")
    .Output("dx: T").Output("dh0: T").Output("dkernel: T")
    .Output("drecurrent_kernel: T").Output("dbias: T")
    .TFCELLS_COMMON_ATTRS
    .Attr("grad_mask: int")
    .SetShapeFn(tfcells::GradShape);

namespace tfcells {
namespace {

// Large GEMMs are split across TensorFlow's intra-op pool (the op itself runs on an inter-op
// thread, so waiting here never starves the pool).
struct CpuLauncher {
  template <typename T>
  static void Forward(tensorflow::OpKernelContext* ctx, const ForwardArgs<T>& a) {
    WithPool(ctx, [&](const CpuOptions& options) { ForwardCpu(a, options); });
  }
  template <typename T>
  static void Backward(tensorflow::OpKernelContext* ctx, const BackwardArgs<T>& a) {
    WithPool(ctx, [&](const CpuOptions& options) { BackwardCpu(a, options); });
  }

  template <typename Run>
  static void WithPool(tensorflow::OpKernelContext* ctx, const Run& run) {
    const auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
    tensorflow::thread::ThreadPool* pool = workers->workers;
    const ParallelRunner runner = [pool](int tasks, const std::function<void(int)>& fn) {
      // One task per shard: a cost this high makes ParallelFor hand out single units.
      pool->ParallelFor(tasks, /*cost_per_unit=*/1'000'000'000,
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
    }
  }
};

#define TFCELLS_REGISTER_CPU(OP, T)                                                    \
  REGISTER_KERNEL_BUILDER(                                                             \
      Name("Tfcells" #OP).Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),       \
      RnnForwardOp<T, CpuLauncher>);                                                   \
  REGISTER_KERNEL_BUILDER(                                                             \
      Name("Tfcells" #OP "Grad").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), \
      RnnGradOp<T, CpuLauncher>);

#define TFCELLS_REGISTER_CPU_ALL(OP) \
  TFCELLS_REGISTER_CPU(OP, float)    \
  TFCELLS_REGISTER_CPU(OP, double)

TFCELLS_REGISTER_CPU_ALL(Lstm)
TFCELLS_REGISTER_CPU_ALL(Gru)
TFCELLS_REGISTER_CPU_ALL(SimpleRnn)

}  // namespace
}  // namespace tfcells

// Read by tfcells.testing through ctypes: the work counters of this library's core.
extern "C" void tfcells_work_counters(std::int64_t out[7]) {
  const tfcells::WorkCounters& c = tfcells::Counters();
  const std::int64_t values[7] = {c.forward_calls, c.backward_calls, c.grad_x, c.grad_h0,
                                  c.grad_kernel, c.grad_recurrent_kernel, c.grad_bias};
  for (int i = 0; i < 7; ++i) out[i] = values[i];
}

extern "C" void tfcells_set_gemm_threads(int threads) { tfcells::SetCpuGemmThreads(threads); }
extern "C" int tfcells_gemm_threads() { return tfcells::CpuGemmThreads(); }
