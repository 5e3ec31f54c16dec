// The bodies of the CUDA entry points; instantiated once per dtype (cuda_rnn_f32.cu,
// cuda_rnn_f64.cu, cuda_rnn_f16.cu) so that they compile in parallel.
#pragma once

#include <exception>
#include <string>

#include "../core/rnn.h"
#include "cuda_backend.cuh"
#include "cuda_rnn.h"

namespace tfcells {
namespace cuda_detail {

inline GpuProducts ProductsOf(const CallPlan* plan, const CudaOptions& options) {
  return ProductsFor(plan != nullptr ? plan->options().storage : Storage::kCompute,
                     options.allow_tf32);
}

template <typename T, typename S>
std::string RunForward(const ForwardArgs<T, S>& args, cudaStream_t stream,
                       const CudaOptions& options) {
  try {
    CudaBackend be(stream, options, ProductsOf(args.plan, options));
    if (be.failed()) return be.error();
    Forward(be, args);
    return be.error();
  } catch (const std::exception& e) {
    return std::string("tfcells CUDA forward pass: ") + e.what();
  }
}

template <typename T, typename S>
std::string RunBackward(const BackwardArgs<T, S>& args, cudaStream_t stream,
                        const CudaOptions& options) {
  try {
    CudaBackend be(stream, options, ProductsOf(args.plan, options));
    if (be.failed()) return be.error();
    Backward(be, args);
    return be.error();
  } catch (const std::exception& e) {
    return std::string("tfcells CUDA backward pass: ") + e.what();
  }
}

}  // namespace cuda_detail
}  // namespace tfcells
