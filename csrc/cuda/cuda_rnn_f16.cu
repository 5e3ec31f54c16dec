// CUDA entry points for 16-bit storage with float32 compute (see cuda_rnn.h).
#include "cuda_rnn_impl.cuh"

namespace tfcells {

std::string ForwardCuda(const ForwardArgs<float, bfloat16>& args, cudaStream_t stream,
                        const CudaOptions& options) {
  return cuda_detail::RunForward(args, stream, options);
}
std::string ForwardCuda(const ForwardArgs<float, float16>& args, cudaStream_t stream,
                        const CudaOptions& options) {
  return cuda_detail::RunForward(args, stream, options);
}
std::string BackwardCuda(const BackwardArgs<float, bfloat16>& args, cudaStream_t stream,
                         const CudaOptions& options) {
  return cuda_detail::RunBackward(args, stream, options);
}
std::string BackwardCuda(const BackwardArgs<float, float16>& args, cudaStream_t stream,
                         const CudaOptions& options) {
  return cuda_detail::RunBackward(args, stream, options);
}

}  // namespace tfcells
