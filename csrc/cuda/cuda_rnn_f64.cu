// CUDA entry points for double (see cuda_rnn.h).
#include "cuda_rnn_impl.cuh"

namespace tfcells {

std::string ForwardCuda(const ForwardArgs<double>& args, cudaStream_t stream,
                        const CudaOptions& options) {
  return cuda_detail::RunForward(args, stream, options);
}

std::string BackwardCuda(const BackwardArgs<double>& args, cudaStream_t stream,
                         const CudaOptions& options) {
  return cuda_detail::RunBackward(args, stream, options);
}

}  // namespace tfcells
