// TensorFlow OpKernels of the fused recurrent ops, shared by the CPU and GPU libraries. They read
// the op's attributes and its inputs' shapes into a CallPlan (csrc/core/plan.h), allocate what
// the plan asks for through TensorFlow, and hand the core raw pointers. `Launcher` supplies the
// device: its kInputProjection, and static Forward(ctx, args) and Backward(ctx, args).
#pragma once

#include <string>

#include "../core/rnn.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"

namespace tfcells {

// The ops of one cell family (the GRU's two variants share ops: reset_after picks).
struct OpFamily {
  const char* forward;
  const char* gradient;
  CellKind cell;  // the GRU family names kGruResetAfter
};
inline constexpr OpFamily kOpFamilies[] = {
    {"TfcellsLstm", "TfcellsLstmGrad", CellKind::kLstm},
    {"TfcellsGru", "TfcellsGruGrad", CellKind::kGruResetAfter},
    {"TfcellsSimpleRnn", "TfcellsSimpleRnnGrad", CellKind::kSimpleRnn},
};
inline bool IsGruFamily(CellKind cell) {
  return cell == CellKind::kGruResetAfter || cell == CellKind::kGruResetBefore;
}

inline Shape ShapeOf(const tensorflow::Tensor& t) {
  Shape s;
  for (int i = 0; i < t.dims(); ++i) s.push_back(t.dim_size(i));
  return s;
}

inline tensorflow::TensorShape TfShape(const Shape& s) {
  tensorflow::TensorShape out;
  for (Index e : s) out.AddDim(e);
  return out;
}

template <typename T>
const T* DataOrNull(const tensorflow::Tensor& t) {
  return t.NumElements() ? t.flat<T>().data() : nullptr;
}

template <typename T>
T* DataOrNull(tensorflow::Tensor* t) {
  return t->NumElements() ? t->flat<T>().data() : nullptr;
}

template <typename T>
Span<T> SpanOf(tensorflow::Tensor* t) {
  return {DataOrNull<T>(t), t->NumElements()};
}

// The attributes and forward inputs the forward op and its gradient op share.
template <typename T, typename Launcher>
class RnnOpBase : public tensorflow::OpKernel {
 public:
  RnnOpBase(tensorflow::OpKernelConstruction* ctx, CellKind cell) : OpKernel(ctx) {
    options_.cell = cell;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("time_major", &options_.time_major));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("go_backwards", &options_.go_backwards));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("has_bias", &options_.has_bias));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("has_mask", &options_.has_mask));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("has_input_dropout", &options_.has_input_dropout));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("has_recurrent_dropout", &options_.has_recurrent_dropout));
    if (IsGruFamily(cell)) {
      bool reset_after = true;
      OP_REQUIRES_OK(ctx, ctx->GetAttr("reset_after", &reset_after));
      options_.cell = reset_after ? CellKind::kGruResetAfter : CellKind::kGruResetBefore;
    }
    options_.input_projection = Launcher::kInputProjection;
  }

 protected:
  // Reads the forward inputs into `in` and makes the call's plan.
  tensorflow::Status MakePlan(tensorflow::OpKernelContext* ctx, CallPlan* plan,
                              InputPointers<T>* in) const {
    const bool cell_state = Info(options_.cell).cell_state;
    InputShapes shapes;
    const struct {
      const char* name;
      bool present;
      Shape* shape;
      const T** data;
    } inputs[] = {
        {"x", true, &shapes.x, &in->x},
        {"h0", true, &shapes.h0, &in->h0},
        {"c0", cell_state, &shapes.c0, &in->c0},
        {"kernel", true, &shapes.kernel, &in->kernel},
        {"recurrent_kernel", true, &shapes.recurrent_kernel, &in->recurrent_kernel},
        {"bias", options_.has_bias, &shapes.bias, &in->bias},
        {"input_dropout", options_.has_input_dropout, &shapes.input_dropout, &in->input_dropout},
        {"recurrent_dropout", options_.has_recurrent_dropout, &shapes.recurrent_dropout,
         &in->recurrent_dropout},
    };
    for (const auto& input : inputs) {
      if (!input.present) continue;
      const tensorflow::Tensor* t;
      TF_RETURN_IF_ERROR(ctx->input(input.name, &t));
      *input.shape = ShapeOf(*t);
      *input.data = DataOrNull<T>(*t);
    }
    if (options_.has_mask) {
      const tensorflow::Tensor* mask;
      TF_RETURN_IF_ERROR(ctx->input("mask", &mask));
      shapes.mask = ShapeOf(*mask);
      in->mask = DataOrNull<bool>(*mask);
    }
    const std::string error = CallPlan::Make(options_, shapes, plan);
    if (!error.empty()) return tensorflow::errors::InvalidArgument(name(), ": ", error);
    return tensorflow::OkStatus();
  }

  CallOptions options_;
};

template <typename T, typename Launcher>
class RnnForwardOp : public RnnOpBase<T, Launcher> {
 public:
  RnnForwardOp(tensorflow::OpKernelConstruction* ctx, CellKind cell)
      : RnnOpBase<T, Launcher>(ctx, cell) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("training", &this->options_.training));
  }

  void Compute(tensorflow::OpKernelContext* ctx) override {
    CallPlan plan;
    ForwardArgs<T> a;
    a.plan = &plan;
    OP_REQUIRES_OK(ctx, this->MakePlan(ctx, &plan, &a.in));
    tensorflow::Tensor *y, *h_last, *c_last, *gates, *aux, *h_prev;
    OP_REQUIRES_OK(ctx, ctx->allocate_output("y", TfShape(plan.SequenceShape(plan.dims().H)), &y));
    OP_REQUIRES_OK(ctx, ctx->allocate_output("h_last", TfShape(plan.StateShape()), &h_last));
    a.y = DataOrNull<T>(y);
    a.h_last = DataOrNull<T>(h_last);
    if (plan.info().cell_state) {
      OP_REQUIRES_OK(ctx, ctx->allocate_output("c_last", TfShape(plan.StateShape()), &c_last));
      a.c_last = DataOrNull<T>(c_last);
    }
    const CacheSizes cache = plan.Cache();
    OP_REQUIRES_OK(ctx, ctx->allocate_output("gates", {cache.gates}, &gates));
    OP_REQUIRES_OK(ctx, ctx->allocate_output("aux", {cache.aux}, &aux));
    OP_REQUIRES_OK(ctx, ctx->allocate_output("h_prev", {cache.h_prev}, &h_prev));
    a.gates = SpanOf<T>(gates), a.aux = SpanOf<T>(aux), a.h_prev = SpanOf<T>(h_prev);
    tensorflow::Tensor workspace;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DataTypeToEnum<T>::value,
                                           {plan.forward_layout().total}, &workspace));
    a.workspace = SpanOf<T>(&workspace);
    Launcher::Forward(ctx, a);
  }
};

template <typename T, typename Launcher>
class RnnGradOp : public RnnOpBase<T, Launcher> {
 public:
  RnnGradOp(tensorflow::OpKernelConstruction* ctx, CellKind cell)
      : RnnOpBase<T, Launcher>(ctx, cell) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("grad_mask", &this->options_.grad_mask));
    this->options_.grad_mask &= kGradAll;
  }

  void Compute(tensorflow::OpKernelContext* ctx) override {
    CallPlan plan;
    BackwardArgs<T> a;
    a.plan = &plan;
    OP_REQUIRES_OK(ctx, this->MakePlan(ctx, &plan, &a.in));
    const bool cell_state = plan.info().cell_state;

    // The forward's training cache, and the incoming gradients (each may be empty: no gradient
    // flows there).
    const tensorflow::Tensor *gates, *aux, *h_prev, *dy, *dh_last, *dc_last = nullptr;
    OP_REQUIRES_OK(ctx, ctx->input("gates", &gates));
    OP_REQUIRES_OK(ctx, ctx->input("aux", &aux));
    OP_REQUIRES_OK(ctx, ctx->input("h_prev", &h_prev));
    OP_REQUIRES_OK(ctx, ctx->input("dy", &dy));
    OP_REQUIRES_OK(ctx, ctx->input("dh_last", &dh_last));
    if (cell_state) OP_REQUIRES_OK(ctx, ctx->input("dc_last", &dc_last));
    const Shape dy_shape = ShapeOf(*dy), dh_shape = ShapeOf(*dh_last),
                dc_shape = dc_last ? ShapeOf(*dc_last) : Shape{};
    const std::string error = plan.CheckBackwardInputs(
        {gates->NumElements(), aux->NumElements(), h_prev->NumElements()}, &dy_shape, &dh_shape,
        dc_last ? &dc_shape : nullptr);
    OP_REQUIRES(ctx, error.empty(), tensorflow::errors::InvalidArgument(this->name(), ": ", error));
    a.gates = {DataOrNull<T>(*gates), gates->NumElements()};
    a.aux = {DataOrNull<T>(*aux), aux->NumElements()};
    a.h_prev = {DataOrNull<T>(*h_prev), h_prev->NumElements()};
    a.dy = DataOrNull<T>(*dy);
    a.dh_last = DataOrNull<T>(*dh_last);
    a.dc_last = dc_last ? DataOrNull<T>(*dc_last) : nullptr;

    // Gradients that are not requested are empty tensors.
    for (const GradientInfo& g : kGradients) {
      if (g.bit == kGradC0 && !cell_state) continue;  // the op has no dc0 output
      const bool wanted = plan.wants(g.bit);
      tensorflow::Tensor* t;
      OP_REQUIRES_OK(ctx, ctx->allocate_output(
                              g.output, wanted ? TfShape(plan.GradShape(g.bit))
                                               : tensorflow::TensorShape({0}),
                              &t));
      GradientPointer(a, g.bit) = wanted ? DataOrNull<T>(t) : nullptr;
    }
    tensorflow::Tensor workspace;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DataTypeToEnum<T>::value,
                                           {plan.backward_layout().total}, &workspace));
    a.workspace = SpanOf<T>(&workspace);
    Launcher::Backward(ctx, a);
  }
};

// Kernel classes bound to their op family's cell, for REGISTER_KERNEL_BUILDER.
template <typename T, typename Launcher, CellKind kCell>
struct ForwardKernel : RnnForwardOp<T, Launcher> {
  explicit ForwardKernel(tensorflow::OpKernelConstruction* ctx)
      : RnnForwardOp<T, Launcher>(ctx, kCell) {}
};
template <typename T, typename Launcher, CellKind kCell>
struct GradKernel : RnnGradOp<T, Launcher> {
  explicit GradKernel(tensorflow::OpKernelConstruction* ctx)
      : RnnGradOp<T, Launcher>(ctx, kCell) {}
};

}  // namespace tfcells

// The forward and gradient kernels of every op family (kOpFamilies) and dtype, for one device.
#define TFCELLS_REGISTER_KERNEL_PAIR(OP, CELL, T, DEVICE, LAUNCHER)                           \
  REGISTER_KERNEL_BUILDER(Name("Tfcells" #OP).Device(DEVICE).TypeConstraint<T>("T"),          \
                          ::tfcells::ForwardKernel<T, LAUNCHER, ::tfcells::CellKind::CELL>);  \
  REGISTER_KERNEL_BUILDER(Name("Tfcells" #OP "Grad").Device(DEVICE).TypeConstraint<T>("T"),   \
                          ::tfcells::GradKernel<T, LAUNCHER, ::tfcells::CellKind::CELL>);
#define TFCELLS_REGISTER_KERNELS_OF(OP, CELL, DEVICE, LAUNCHER)   \
  TFCELLS_REGISTER_KERNEL_PAIR(OP, CELL, float, DEVICE, LAUNCHER) \
  TFCELLS_REGISTER_KERNEL_PAIR(OP, CELL, double, DEVICE, LAUNCHER)
#define TFCELLS_REGISTER_KERNELS(DEVICE, LAUNCHER)                     \
  TFCELLS_REGISTER_KERNELS_OF(Lstm, kLstm, DEVICE, LAUNCHER)           \
  TFCELLS_REGISTER_KERNELS_OF(Gru, kGruResetAfter, DEVICE, LAUNCHER)   \
  TFCELLS_REGISTER_KERNELS_OF(SimpleRnn, kSimpleRnn, DEVICE, LAUNCHER)
