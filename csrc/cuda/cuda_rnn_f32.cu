// CUDA entry points for float (see cuda_rnn.h).
#include "cuda_rnn_impl.cuh"

namespace tfcells {

std::string ForwardCuda(const ForwardArgs<float>& args, cudaStream_t stream,
                        const CudaOptions& options) {
  return cuda_detail::RunForward(args, stream, options);
}

std::string BackwardCuda(const BackwardArgs<float>& args, cudaStream_t stream,
                         const CudaOptions& options) {
  return cuda_detail::RunBackward(args, stream, options);
}

}  // namespace tfcells
