// TensorFlow OpKernels of the fused recurrent ops, shared by the CPU and GPU libraries. They read
// the op's attributes and its inputs' shapes into a CallPlan (csrc/core/plan.h), allocate what
// the plan asks for through TensorFlow, and hand the core raw pointers. `Launcher` supplies the
// device: its kInputProjection and kProjectionSteps, kKeepsBuffers (workspaces and caches kept
// between calls), and static Forward(ctx, args) and Backward(ctx, args).
#pragma once

#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/rnn.h"
#include "../core/storage.h"
#include "tensorflow/core/framework/numeric_types.h"
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

// TensorFlow's type for a core type (the 16-bit ones have the same bits, storage.h).
template <typename T>
struct TfTypeOf {
  using type = T;
};
template <>
struct TfTypeOf<bfloat16> {
  using type = tensorflow::bfloat16;
};
template <>
struct TfTypeOf<float16> {
  using type = Eigen::half;
};
template <typename T>
using TfType = typename TfTypeOf<T>::type;
static_assert(sizeof(TfType<bfloat16>) == 2 && sizeof(TfType<float16>) == 2);

template <typename T>
const T* DataOrNull(const tensorflow::Tensor& t) {
  return t.NumElements() ? reinterpret_cast<const T*>(t.flat<TfType<T>>().data()) : nullptr;
}

template <typename T>
T* DataOrNull(tensorflow::Tensor* t) {
  return t->NumElements() ? reinterpret_cast<T*>(t->flat<TfType<T>>().data()) : nullptr;
}

template <typename T>
Span<T> SpanOf(tensorflow::Tensor* t) {
  return {DataOrNull<T>(t), t->NumElements()};
}

// A kernel's workspaces, kept from one call to the next. TensorFlow's default CPU allocator is
// glibc's malloc, which returns a freed block of more than its mmap threshold (at most 32 MiB)
// to the system: a workspace of T·B·G·H floats, allocated anew each step, then costs a page
// fault per 4 KiB (about a tenth of an LSTM training step at T=100, B=64, H=512, measured on
// Zen 1). One kept workspace per call running at once; one that no longer fits is dropped.
class WorkspaceCache {
 public:
  tensorflow::Status Take(tensorflow::OpKernelContext* ctx, tensorflow::DataType type, Index n,
                          tensorflow::Tensor* out) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!kept_.empty()) {
        tensorflow::Tensor t = std::move(kept_.back());
        kept_.pop_back();
        if (t.dtype() == type && t.NumElements() >= n) {
          *out = std::move(t);
          return tensorflow::OkStatus();
        }
      }  // else dropped, before the new one is allocated
    }
    return ctx->allocate_temp(type, {n}, out);
  }
  void Give(tensorflow::Tensor t) {
    std::lock_guard<std::mutex> lock(mu_);
    kept_.push_back(std::move(t));
  }

 private:
  std::mutex mu_;
  std::vector<tensorflow::Tensor> kept_;
};

// The forward's training-cache outputs, reused across calls for the same reason: the kernel
// keeps a reference to each output it made, and the next call hands the same buffer out again
// once TensorFlow has let go of it (only the kernel's reference is left: the gradient op has
// run), else allocates a new one and keeps that instead. Between steps the kernel so holds one
// cache, the memory each step needs anyway.
class OutputCache {
 public:
  // Output `name` of n elements in *out (pointing at the kept tensor when reused).
  tensorflow::Status Output(tensorflow::OpKernelContext* ctx, int slot, const char* name, Index n,
                            tensorflow::Tensor** out) {
    std::lock_guard<std::mutex> lock(mu_);
    tensorflow::Tensor& kept = kept_[slot];
    if (n > 0 && kept.NumElements() == n && kept.RefCountIsOne()) {
      TF_RETURN_IF_ERROR(ctx->set_output(name, kept));  // TensorFlow holds it again
      *out = &kept;
      return tensorflow::OkStatus();
    }
    TF_RETURN_IF_ERROR(ctx->allocate_output(name, {n}, out));
    kept = **out;
    return tensorflow::OkStatus();
  }

 private:
  std::mutex mu_;
  tensorflow::Tensor kept_[3];
};

// The attributes and forward inputs the forward op and its gradient op share. T: the compute
// type (weights, cache); S: the storage type (sequences, states: the op's attribute T).
template <typename T, typename S, typename Launcher>
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
    options_.projection_steps = Launcher::kProjectionSteps;
    options_.storage = detail::StorageOf<S>();
  }

 protected:
  // Reads the forward inputs into `in` and makes the call's plan.
  tensorflow::Status MakePlan(tensorflow::OpKernelContext* ctx, CallPlan* plan,
                              InputPointers<T, S>* in) const {
    const bool cell_state = Info(options_.cell).cell_state;
    InputShapes shapes;
    // An input that is present: its shape, and its data as the core's type (S or T).
    auto read = [&](const char* name, bool present, Shape* shape,
                    auto** data) -> tensorflow::Status {
      if (!present) return tensorflow::OkStatus();
      const tensorflow::Tensor* t;
      TF_RETURN_IF_ERROR(ctx->input(name, &t));
      *shape = ShapeOf(*t);
      using Element = std::remove_const_t<std::remove_reference_t<decltype(**data)>>;
      *data = DataOrNull<Element>(*t);
      return tensorflow::OkStatus();
    };
    TF_RETURN_IF_ERROR(read("x", true, &shapes.x, &in->x));
    TF_RETURN_IF_ERROR(read("h0", true, &shapes.h0, &in->h0));
    TF_RETURN_IF_ERROR(read("c0", cell_state, &shapes.c0, &in->c0));
    TF_RETURN_IF_ERROR(read("kernel", true, &shapes.kernel, &in->kernel));
    TF_RETURN_IF_ERROR(
        read("recurrent_kernel", true, &shapes.recurrent_kernel, &in->recurrent_kernel));
    TF_RETURN_IF_ERROR(read("bias", options_.has_bias, &shapes.bias, &in->bias));
    TF_RETURN_IF_ERROR(read("input_dropout", options_.has_input_dropout, &shapes.input_dropout,
                            &in->input_dropout));
    TF_RETURN_IF_ERROR(read("recurrent_dropout", options_.has_recurrent_dropout,
                            &shapes.recurrent_dropout, &in->recurrent_dropout));
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

  // Runs fn(workspace span) on a workspace of n compute-type elements: kept between calls
  // where the launcher's allocator would hand back fresh pages (Launcher::kKeepsBuffers).
  template <typename F>
  void WithWorkspace(tensorflow::OpKernelContext* ctx, Index n, const F& fn) {
    tensorflow::Tensor workspace;
    const auto type = tensorflow::DataTypeToEnum<T>::value;
    if (Launcher::kKeepsBuffers) {
      OP_REQUIRES_OK(ctx, workspaces_.Take(ctx, type, n, &workspace));
    } else {
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(type, {n}, &workspace));
    }
    fn(Span<T>{DataOrNull<T>(&workspace), n});
    if (Launcher::kKeepsBuffers) workspaces_.Give(std::move(workspace));
  }

  CallOptions options_;
  WorkspaceCache workspaces_;
};

template <typename T, typename S, typename Launcher>
class RnnForwardOp : public RnnOpBase<T, S, Launcher> {
 public:
  RnnForwardOp(tensorflow::OpKernelConstruction* ctx, CellKind cell)
      : RnnOpBase<T, S, Launcher>(ctx, cell) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("training", &this->options_.training));
    // The gradients the caller did not rule out: the cache keeps only what they read.
    int frozen = 0;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("frozen", &frozen));
    this->options_.grad_mask = kGradAll & ~frozen;
  }

  void Compute(tensorflow::OpKernelContext* ctx) override {
    CallPlan plan;
    ForwardArgs<T, S> a;
    a.plan = &plan;
    OP_REQUIRES_OK(ctx, this->MakePlan(ctx, &plan, &a.in));
    tensorflow::Tensor *y, *h_last, *c_last, *gates, *aux, *h_prev;
    OP_REQUIRES_OK(ctx, ctx->allocate_output("y", TfShape(plan.SequenceShape(plan.dims().H)), &y));
    OP_REQUIRES_OK(ctx, ctx->allocate_output("h_last", TfShape(plan.StateShape()), &h_last));
    a.y = DataOrNull<S>(y);
    a.h_last = DataOrNull<S>(h_last);
    if (plan.info().cell_state) {
      OP_REQUIRES_OK(ctx, ctx->allocate_output("c_last", TfShape(plan.StateShape()), &c_last));
      a.c_last = DataOrNull<S>(c_last);
    }
    const CacheSizes cache = plan.Cache();
    const Index sizes[3] = {cache.gates, cache.aux, cache.h_prev};
    tensorflow::Tensor** outputs[3] = {&gates, &aux, &h_prev};
    const char* names[3] = {"gates", "aux", "h_prev"};
    for (int i = 0; i < 3; ++i) {
      if (Launcher::kKeepsBuffers) {
        OP_REQUIRES_OK(ctx, outputs_.Output(ctx, i, names[i], sizes[i], outputs[i]));
      } else {
        OP_REQUIRES_OK(ctx, ctx->allocate_output(names[i], {sizes[i]}, outputs[i]));
      }
    }
    a.gates = SpanOf<T>(gates), a.aux = SpanOf<T>(aux), a.h_prev = SpanOf<T>(h_prev);
    this->WithWorkspace(ctx, plan.forward_layout().total, [&](Span<T> workspace) {
      a.workspace = workspace;
      Launcher::Forward(ctx, a);
    });
  }

 private:
  OutputCache outputs_;
};

template <typename T, typename S, typename Launcher>
class RnnGradOp : public RnnOpBase<T, S, Launcher> {
 public:
  RnnGradOp(tensorflow::OpKernelConstruction* ctx, CellKind cell)
      : RnnOpBase<T, S, Launcher>(ctx, cell) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("grad_mask", &this->options_.grad_mask));
    this->options_.grad_mask &= kGradAll;
  }

  void Compute(tensorflow::OpKernelContext* ctx) override {
    CallPlan plan;
    BackwardArgs<T, S> a;
    a.plan = &plan;
    OP_REQUIRES_OK(ctx, this->MakePlan(ctx, &plan, &a.in));
    const bool cell_state = plan.info().cell_state;

    // The forward's training cache and output y (read where no cache keeps h_prev), and the
    // incoming gradients (each may be empty: no gradient flows there).
    const tensorflow::Tensor *gates, *aux, *h_prev, *y, *dy, *dh_last, *dc_last = nullptr;
    OP_REQUIRES_OK(ctx, ctx->input("gates", &gates));
    OP_REQUIRES_OK(ctx, ctx->input("aux", &aux));
    OP_REQUIRES_OK(ctx, ctx->input("h_prev", &h_prev));
    OP_REQUIRES_OK(ctx, ctx->input("y", &y));
    OP_REQUIRES_OK(ctx, ctx->input("dy", &dy));
    OP_REQUIRES_OK(ctx, ctx->input("dh_last", &dh_last));
    if (cell_state) OP_REQUIRES_OK(ctx, ctx->input("dc_last", &dc_last));
    const Shape y_shape = ShapeOf(*y), dy_shape = ShapeOf(*dy), dh_shape = ShapeOf(*dh_last),
                dc_shape = dc_last ? ShapeOf(*dc_last) : Shape{};
    const std::string error = plan.CheckBackwardInputs(
        {gates->NumElements(), aux->NumElements(), h_prev->NumElements()}, &y_shape, &dy_shape,
        &dh_shape, dc_last ? &dc_shape : nullptr);
    OP_REQUIRES(ctx, error.empty(), tensorflow::errors::InvalidArgument(this->name(), ": ", error));
    a.gates = {DataOrNull<T>(*gates), gates->NumElements()};
    a.aux = {DataOrNull<T>(*aux), aux->NumElements()};
    a.h_prev = {DataOrNull<T>(*h_prev), h_prev->NumElements()};
    a.y = DataOrNull<S>(*y);
    a.dy = DataOrNull<S>(*dy);
    a.dh_last = DataOrNull<S>(*dh_last);
    a.dc_last = dc_last ? DataOrNull<S>(*dc_last) : nullptr;

    // Gradients that are not requested are empty tensors.
    for (const GradientInfo& g : kGradients) {
      if (g.bit == kGradC0 && !cell_state) continue;  // the op has no dc0 output
      const bool wanted = plan.wants(g.bit);
      tensorflow::Tensor* t;
      OP_REQUIRES_OK(ctx, ctx->allocate_output(
                              g.output, wanted ? TfShape(plan.GradShape(g.bit))
                                               : tensorflow::TensorShape({0}),
                              &t));
      void* data = !wanted            ? nullptr
                   : IsStateGradient(g.bit) ? static_cast<void*>(DataOrNull<S>(t))
                                           : static_cast<void*>(DataOrNull<T>(t));
      SetGradient(a, g.bit, data);
    }
    this->WithWorkspace(ctx, plan.backward_layout().total, [&](Span<T> workspace) {
      a.workspace = workspace;
      Launcher::Backward(ctx, a);
    });
  }
};

// Kernel classes bound to their op family's cell, for REGISTER_KERNEL_BUILDER.
template <typename T, typename S, typename Launcher, CellKind kCell>
struct ForwardKernel : RnnForwardOp<T, S, Launcher> {
  explicit ForwardKernel(tensorflow::OpKernelConstruction* ctx)
      : RnnForwardOp<T, S, Launcher>(ctx, kCell) {}
};
template <typename T, typename S, typename Launcher, CellKind kCell>
struct GradKernel : RnnGradOp<T, S, Launcher> {
  explicit GradKernel(tensorflow::OpKernelConstruction* ctx)
      : RnnGradOp<T, S, Launcher>(ctx, kCell) {}
};

}  // namespace tfcells

// The forward and gradient kernels of every op family (kOpFamilies) and dtype pair, for one
// device: the op's T is the storage type S, its Tcompute the compute type T.
#define TFCELLS_REGISTER_KERNEL_PAIR(OP, CELL, T, S, DEVICE, LAUNCHER)                        \
  REGISTER_KERNEL_BUILDER(Name("Tfcells" #OP)                                                 \
                              .Device(DEVICE)                                                 \
                              .TypeConstraint<::tfcells::TfType<S>>("T")                      \
                              .TypeConstraint<T>("Tcompute"),                                 \
                          ::tfcells::ForwardKernel<T, S, LAUNCHER, ::tfcells::CellKind::CELL>); \
  REGISTER_KERNEL_BUILDER(Name("Tfcells" #OP "Grad")                                          \
                              .Device(DEVICE)                                                 \
                              .TypeConstraint<::tfcells::TfType<S>>("T")                      \
                              .TypeConstraint<T>("Tcompute"),                                 \
                          ::tfcells::GradKernel<T, S, LAUNCHER, ::tfcells::CellKind::CELL>);
#define TFCELLS_REGISTER_KERNELS_OF(OP, CELL, DEVICE, LAUNCHER)                          \
  TFCELLS_REGISTER_KERNEL_PAIR(OP, CELL, float, float, DEVICE, LAUNCHER)                 \
  TFCELLS_REGISTER_KERNEL_PAIR(OP, CELL, double, double, DEVICE, LAUNCHER)               \
  TFCELLS_REGISTER_KERNEL_PAIR(OP, CELL, float, ::tfcells::bfloat16, DEVICE, LAUNCHER)   \
  TFCELLS_REGISTER_KERNEL_PAIR(OP, CELL, float, ::tfcells::float16, DEVICE, LAUNCHER)
#define TFCELLS_REGISTER_KERNELS(DEVICE, LAUNCHER)                     \
  TFCELLS_REGISTER_KERNELS_OF(Lstm, kLstm, DEVICE, LAUNCHER)           \
  TFCELLS_REGISTER_KERNELS_OF(Gru, kGruResetAfter, DEVICE, LAUNCHER)   \
  TFCELLS_REGISTER_KERNELS_OF(SimpleRnn, kSimpleRnn, DEVICE, LAUNCHER)
