// TensorFlow OpKernels of the fused recurrent ops, shared by the CPU and GPU libraries: they
// validate inputs, allocate outputs and scratch through TensorFlow, and hand raw pointers to
// the core. `Launcher` supplies the device: static Forward(ctx, args) and Backward(ctx, args).
#pragma once

#include <string>
#include <vector>

#include "../core/rnn.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"

namespace tfcells {

inline std::vector<Index> ShapeOf(const tensorflow::Tensor& t) {
  std::vector<Index> s;
  for (int i = 0; i < t.dims(); ++i) s.push_back(t.dim_size(i));
  return s;
}

template <typename T>
const T* DataOrNull(const tensorflow::Tensor& t) {
  return t.NumElements() ? t.flat<T>().data() : nullptr;
}

template <typename T>
T* DataOrNull(tensorflow::Tensor* t) {
  return t->NumElements() ? t->flat<T>().data() : nullptr;
}

// Attributes and inputs common to the forward and gradient op of one cell.
class RnnOpBase : public tensorflow::OpKernel {
 public:
  explicit RnnOpBase(tensorflow::OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("time_major", &time_major_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("go_backwards", &go_backwards_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("has_bias", &has_bias_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("has_mask", &has_mask_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("has_input_dropout", &dropout_.input));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("has_recurrent_dropout", &dropout_.recurrent));
    const std::string& type = ctx->def().op();
    if (type.rfind("TfcellsLstm", 0) == 0) {
      cell_ = CellKind::kLstm;
    } else if (type.rfind("TfcellsGru", 0) == 0) {
      bool reset_after = true;
      OP_REQUIRES_OK(ctx, ctx->GetAttr("reset_after", &reset_after));
      cell_ = reset_after ? CellKind::kGruResetAfter : CellKind::kGruResetBefore;
    } else {
      cell_ = CellKind::kSimpleRnn;
    }
  }

 protected:
  bool is_lstm() const { return cell_ == CellKind::kLstm; }

  // Reads the forward inputs into `a` after checking their shapes.
  template <typename T>
  tensorflow::Status ReadInputs(tensorflow::OpKernelContext* ctx, ForwardArgs<T>* a) {
    const tensorflow::Tensor *x, *h0, *c0 = nullptr, *kernel, *rk, *bias, *mask;
    TF_RETURN_IF_ERROR(ctx->input("x", &x));
    TF_RETURN_IF_ERROR(ctx->input("h0", &h0));
    if (is_lstm()) TF_RETURN_IF_ERROR(ctx->input("c0", &c0));
    TF_RETURN_IF_ERROR(ctx->input("kernel", &kernel));
    TF_RETURN_IF_ERROR(ctx->input("recurrent_kernel", &rk));
    TF_RETURN_IF_ERROR(ctx->input("bias", &bias));
    TF_RETURN_IF_ERROR(ctx->input("mask", &mask));
    const std::vector<Index> bias_shape = ShapeOf(*bias), mask_shape = ShapeOf(*mask);
    const std::string error = ValidateShapes(
        cell_, time_major_, ShapeOf(*x), ShapeOf(*h0), c0 ? ShapeOf(*c0) : std::vector<Index>{},
        ShapeOf(*kernel), ShapeOf(*rk), has_bias_ ? &bias_shape : nullptr,
        has_mask_ ? &mask_shape : nullptr, &a->d);
    if (!error.empty()) return tensorflow::errors::InvalidArgument(name(), ": ", error);
    const tensorflow::Tensor *input_dropout, *recurrent_dropout;
    TF_RETURN_IF_ERROR(ctx->input("input_dropout", &input_dropout));
    TF_RETURN_IF_ERROR(ctx->input("recurrent_dropout", &recurrent_dropout));
    const std::vector<Index> in_drop_shape = ShapeOf(*input_dropout),
                             rec_drop_shape = ShapeOf(*recurrent_dropout);
    const std::string dropout_error =
        ValidateDropoutShapes(cell_, a->d, dropout_.input ? &in_drop_shape : nullptr,
                              dropout_.recurrent ? &rec_drop_shape : nullptr);
    if (!dropout_error.empty())
      return tensorflow::errors::InvalidArgument(name(), ": ", dropout_error);
    a->input_dropout = dropout_.input ? DataOrNull<T>(*input_dropout) : nullptr;
    a->recurrent_dropout = dropout_.recurrent ? DataOrNull<T>(*recurrent_dropout) : nullptr;
    a->cell = cell_;
    a->d.go_backwards = go_backwards_;
    a->x = DataOrNull<T>(*x);
    a->h0 = DataOrNull<T>(*h0);
    a->c0 = c0 ? DataOrNull<T>(*c0) : nullptr;
    a->kernel = DataOrNull<T>(*kernel);
    a->recurrent_kernel = DataOrNull<T>(*rk);
    a->bias = has_bias_ ? DataOrNull<T>(*bias) : nullptr;
    a->mask = has_mask_ ? DataOrNull<bool>(*mask) : nullptr;
    return tensorflow::OkStatus();
  }

  tensorflow::TensorShape SequenceShape(const Dims& d, Index width) const {
    return time_major_ ? tensorflow::TensorShape({d.T, d.B, width})
                       : tensorflow::TensorShape({d.B, d.T, width});
  }

  CellKind cell_;
  bool time_major_, go_backwards_, has_bias_, has_mask_;
  DropoutInputs dropout_;
};

template <typename T, typename Launcher>
class RnnForwardOp : public RnnOpBase {
 public:
  explicit RnnForwardOp(tensorflow::OpKernelConstruction* ctx) : RnnOpBase(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("training", &training_));
  }

  void Compute(tensorflow::OpKernelContext* ctx) override {
    ForwardArgs<T> a;
    OP_REQUIRES_OK(ctx, ReadInputs(ctx, &a));
    const Dims& d = a.d;
    tensorflow::Tensor *y, *h_last, *c_last = nullptr, *gates, *aux, *h_prev;
    OP_REQUIRES_OK(ctx, ctx->allocate_output("y", SequenceShape(d, d.H), &y));
    OP_REQUIRES_OK(ctx, ctx->allocate_output("h_last", {d.B, d.H}, &h_last));
    if (is_lstm()) OP_REQUIRES_OK(ctx, ctx->allocate_output("c_last", {d.B, d.H}, &c_last));
    const CacheSizes cache = training_ ? TrainingCacheSizes(cell_, d) : CacheSizes{0, 0, 0};
    OP_REQUIRES_OK(ctx, ctx->allocate_output("gates", {cache.gates}, &gates));
    OP_REQUIRES_OK(ctx, ctx->allocate_output("aux", {cache.aux}, &aux));
    OP_REQUIRES_OK(ctx, ctx->allocate_output("h_prev", {cache.h_prev}, &h_prev));
    tensorflow::Tensor workspace;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DataTypeToEnum<T>::value,
                                           {ForwardWorkspaceSize(cell_, d, training_, dropout_)},
                                           &workspace));
    a.y = DataOrNull<T>(y);
    a.h_last = DataOrNull<T>(h_last);
    a.c_last = c_last ? DataOrNull<T>(c_last) : nullptr;
    if (training_) {
      a.gates = DataOrNull<T>(gates);
      a.aux = DataOrNull<T>(aux);
      a.h_prev = DataOrNull<T>(h_prev);
    }
    a.workspace = DataOrNull<T>(&workspace);
    Launcher::Forward(ctx, a);
  }

 private:
  bool training_;
};

template <typename T, typename Launcher>
class RnnGradOp : public RnnOpBase {
 public:
  explicit RnnGradOp(tensorflow::OpKernelConstruction* ctx) : RnnOpBase(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("grad_mask", &grad_mask_));
    if (!is_lstm()) grad_mask_ &= ~kGradC0;
  }

  void Compute(tensorflow::OpKernelContext* ctx) override {
    ForwardArgs<T> f;
    OP_REQUIRES_OK(ctx, ReadInputs(ctx, &f));
    const Dims& d = f.d;
    BackwardArgs<T> a;
    a.cell = cell_;
    a.d = d;
    a.x = f.x, a.h0 = f.h0, a.c0 = f.c0, a.kernel = f.kernel;
    a.recurrent_kernel = f.recurrent_kernel, a.bias = f.bias, a.mask = f.mask;
    a.input_dropout = f.input_dropout, a.recurrent_dropout = f.recurrent_dropout;
    a.grad_mask = grad_mask_;

    // The cache must be a training cache of these sizes; incoming gradients match outputs or
    // are empty (no gradient flows there).
    const CacheSizes cache = TrainingCacheSizes(cell_, d);
    const std::pair<const char*, Index> cache_inputs[] = {
        {"gates", cache.gates}, {"aux", cache.aux}, {"h_prev", cache.h_prev}};
    const T** cache_ptrs[] = {&a.gates, &a.aux, &a.h_prev};
    for (int i = 0; i < 3; ++i) {
      const tensorflow::Tensor* t;
      OP_REQUIRES_OK(ctx, ctx->input(cache_inputs[i].first, &t));
      OP_REQUIRES(ctx, t->NumElements() == cache_inputs[i].second,
                  tensorflow::errors::InvalidArgument(
                      name(), ": ", cache_inputs[i].first, " must hold the forward op's training "
                      "cache of ", cache_inputs[i].second, " elements, got ", t->NumElements()));
      *cache_ptrs[i] = DataOrNull<T>(*t);
    }
    const std::pair<const char*, tensorflow::TensorShape> grad_inputs[] = {
        {"dy", SequenceShape(d, d.H)}, {"dh_last", {d.B, d.H}}, {"dc_last", {d.B, d.H}}};
    const T** grad_ptrs[] = {&a.dy, &a.dh_last, &a.dc_last};
    for (int i = 0; i < (is_lstm() ? 3 : 2); ++i) {
      const tensorflow::Tensor* t;
      OP_REQUIRES_OK(ctx, ctx->input(grad_inputs[i].first, &t));
      OP_REQUIRES(ctx, t->NumElements() == 0 || t->shape() == grad_inputs[i].second,
                  tensorflow::errors::InvalidArgument(
                      name(), ": ", grad_inputs[i].first, " must have shape ",
                      grad_inputs[i].second.DebugString(), " or be empty, got ",
                      t->shape().DebugString()));
      *grad_ptrs[i] = DataOrNull<T>(*t);
    }

    // Outputs that are not requested are empty tensors.
    const tensorflow::Tensor *x, *kernel, *rk, *bias;
    OP_REQUIRES_OK(ctx, ctx->input("x", &x));
    OP_REQUIRES_OK(ctx, ctx->input("kernel", &kernel));
    OP_REQUIRES_OK(ctx, ctx->input("recurrent_kernel", &rk));
    OP_REQUIRES_OK(ctx, ctx->input("bias", &bias));
    if (!has_bias_) a.grad_mask &= ~kGradBias;
    struct Out {
      const char* name;
      int bit;
      tensorflow::TensorShape shape;
      T** ptr;
    };
    std::vector<Out> outs = {{"dx", kGradX, x->shape(), &a.dx},
                             {"dh0", kGradH0, {d.B, d.H}, &a.dh0},
                             {"dkernel", kGradKernel, kernel->shape(), &a.dkernel},
                             {"drecurrent_kernel", kGradRecurrentKernel, rk->shape(),
                              &a.drecurrent_kernel},
                             {"dbias", kGradBias, bias->shape(), &a.dbias}};
    if (is_lstm()) outs.push_back({"dc0", kGradC0, {d.B, d.H}, &a.dc0});
    for (const Out& o : outs) {
      const bool wanted = a.grad_mask & o.bit;
      tensorflow::Tensor* t;
      OP_REQUIRES_OK(ctx, ctx->allocate_output(
                              o.name, wanted ? o.shape : tensorflow::TensorShape({0}), &t));
      *o.ptr = wanted ? DataOrNull<T>(t) : nullptr;
    }
    tensorflow::Tensor workspace;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DataTypeToEnum<T>::value,
                                           {BackwardWorkspaceSize(cell_, d, a.grad_mask, dropout_)},
                                           &workspace));
    a.workspace = DataOrNull<T>(&workspace);
    Launcher::Backward(ctx, a);
  }

 private:
  int grad_mask_;
};

}  // namespace tfcells
