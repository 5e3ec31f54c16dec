// The bodies of the CUDA entry points; instantiated once per dtype (cuda_rnn_f32.cu,
// cuda_rnn_f64.cu, cuda_rnn_f16.cu) so that they compile in parallel.
#pragma once

#include <exception>
#include <optional>
#include <string>

#include "../core/rnn.h"
#include "cuda_backend.cuh"
#include "cuda_graphs.h"
#include "cuda_rnn.h"

namespace tfcells {
namespace cuda_detail {

inline GpuProducts ProductsOf(const CallPlan* plan, const CudaOptions& options) {
  return ProductsFor(plan != nullptr ? plan->options().storage : Storage::kCompute,
                     options.allow_tf32);
}

// What fixes a call's launches (cuda_graphs.h): the pass, the types, the plan's options and
// sizes, the products, cuBLAS' workspace, and every buffer.
template <typename T, typename S>
cuda_graphs::GraphKey KeyOf(char pass, const CallPlan* plan, const InputPointers<T, S>& in,
                            const CudaOptions& options) {
  cuda_graphs::GraphKey k;
  k.Shape(pass);
  k.Shape(sizeof(T));
  k.Shape(plan != nullptr);
  if (plan != nullptr) {
    const CallOptions& o = plan->options();
    k.Shape(o.cell), k.Shape(o.time_major), k.Shape(o.go_backwards), k.Shape(o.has_bias);
    k.Shape(o.has_mask), k.Shape(o.has_input_dropout), k.Shape(o.has_recurrent_dropout);
    k.Shape(o.training), k.Shape(o.grad_mask), k.Shape(o.input_projection);
    k.Shape(o.projection_steps), k.Shape(o.storage);
    const Dims& d = plan->dims();
    k.Shape(d.T), k.Shape(d.B), k.Shape(d.I), k.Shape(d.H);
  }
  k.Shape(ProductsOf(plan, options));
  k.Shape(options.blas_workspace_bytes);
  k.Buffer(options.blas_workspace);
  for (const void* p : {static_cast<const void*>(in.x), static_cast<const void*>(in.h0),
                        static_cast<const void*>(in.c0), static_cast<const void*>(in.kernel),
                        static_cast<const void*>(in.recurrent_kernel),
                        static_cast<const void*>(in.bias), static_cast<const void*>(in.mask),
                        static_cast<const void*>(in.input_dropout),
                        static_cast<const void*>(in.recurrent_dropout)})
    k.Buffer(p);
  return k;
}

template <typename T>
void AddSpan(cuda_graphs::GraphKey& k, const Span<T>& s) {
  k.Buffer(s.data);
  k.Shape(s.size);
}

// One pass as a cuda_graphs::Call: the backend (cuBLAS handle, workspace, math mode) is made
// for the stream in Prepare, outside any capture; what the pass throws becomes the returned
// error (a capture must end on every path).
template <typename Pass>
class PassCall : public cuda_graphs::Call {
 public:
  PassCall(const char* name, GpuProducts products, const CudaOptions& options, const Pass& pass)
      : name_(name), products_(products), options_(options), pass_(pass) {}

  std::string Prepare(cudaStream_t stream) override {
    try {
      backend_.emplace(stream, options_, products_);
      return backend_->error();
    } catch (const std::exception& e) {
      return Error(e);
    }
  }
  std::string Enqueue() override {
    try {
      pass_(*backend_);
      return backend_->error();
    } catch (const std::exception& e) {
      return Error(e);
    }
  }

 private:
  std::string Error(const std::exception& e) const {
    return std::string("tfcells CUDA ") + name_ + " pass: " + e.what();
  }

  const char* name_;
  GpuProducts products_;
  const CudaOptions& options_;
  const Pass& pass_;
  std::optional<CudaBackend> backend_;
};

// Runs `pass(backend)` on `stream` through cuda_graphs::Run: captured only with a cuBLAS
// workspace of the caller's (cuda_graphs.h).
template <typename Pass>
std::string RunPass(const char* name, cuda_graphs::GraphKey key, GpuProducts products,
                    cudaStream_t stream, const CudaOptions& options, const Pass& pass) {
  PassCall<Pass> call(name, products, options, pass);
  return cuda_graphs::Run(std::move(key), options.blas_workspace != nullptr, stream, call);
}

template <typename T, typename S>
std::string RunForward(const ForwardArgs<T, S>& args, cudaStream_t stream,
                       const CudaOptions& options) {
  cuda_graphs::GraphKey key = KeyOf('f', args.plan, args.in, options);
  for (const void* p : {static_cast<const void*>(args.y), static_cast<const void*>(args.h_last),
                        static_cast<const void*>(args.c_last)})
    key.Buffer(p);
  AddSpan(key, args.gates), AddSpan(key, args.aux), AddSpan(key, args.h_prev);
  AddSpan(key, args.workspace);
  return RunPass("forward", std::move(key), ProductsOf(args.plan, options), stream, options,
                 [&](CudaBackend& be) { Forward(be, args); });
}

template <typename T, typename S>
std::string RunBackward(const BackwardArgs<T, S>& args, cudaStream_t stream,
                        const CudaOptions& options) {
  cuda_graphs::GraphKey key = KeyOf('b', args.plan, args.in, options);
  AddSpan(key, args.gates), AddSpan(key, args.aux), AddSpan(key, args.h_prev);
  for (const void* p :
       {static_cast<const void*>(args.y), static_cast<const void*>(args.dy),
        static_cast<const void*>(args.dh_last), static_cast<const void*>(args.dc_last),
        static_cast<const void*>(args.dx), static_cast<const void*>(args.dh0),
        static_cast<const void*>(args.dc0), static_cast<const void*>(args.dkernel),
        static_cast<const void*>(args.drecurrent_kernel), static_cast<const void*>(args.dbias)})
    key.Buffer(p);
  AddSpan(key, args.workspace);
  return RunPass("backward", std::move(key), ProductsOf(args.plan, options), stream, options,
                 [&](CudaBackend& be) { Backward(be, args); });
}

}  // namespace cuda_detail
}  // namespace tfcells
