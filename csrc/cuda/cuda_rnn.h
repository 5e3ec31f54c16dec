// The CUDA entry points of the core: forward and backward of every cell on a caller-given
// stream, mirroring csrc/core/cpu/cpu_rnn.h. The recurrence is csrc/core/rnn.h's driver and the
// pointwise math csrc/core/cells.h' functors, run by CudaBackend (cuda_backend.cuh).
//
// Contract:
//  - every pointer in the arguments is device memory (or managed memory) of the current
//    device, laid out as rnn.h documents; `stream` belongs to that device;
//  - nothing is allocated and nothing is synchronised: the calls only enqueue work on
//    `stream` (the first call on a thread and device also creates that thread's cuBLAS handle);
//  - the return value is "" when every launch was accepted, else a message saying which
//    launch failed and why; after the first failure nothing more is enqueued. A fault inside a
//    kernel (e.g. an illegal address) is asynchronous and surfaces at the caller's next
//    synchronisation of the stream, as for any CUDA library.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "../core/rnn.h"

namespace tfcells {

// A GPU runs the input projection and dx as one GEMM over all T*B rows: one large product fills
// the device, where T small ones would each leave most of it idle. Bindings make their call
// plans with it.
inline constexpr InputProjection kCudaInputProjection = InputProjection::kWholeSequence;

struct CudaOptions {
  // Let cuBLAS use TF32 tensor cores for float32 GEMMs (about 10 mantissa bits in the
  // products). Off by default, so that float32 results match the CPU kernels closely.
  bool allow_tf32 = false;
};

std::string ForwardCuda(const ForwardArgs<float>& args, cudaStream_t stream,
                        const CudaOptions& options = {});
std::string ForwardCuda(const ForwardArgs<double>& args, cudaStream_t stream,
                        const CudaOptions& options = {});
std::string BackwardCuda(const BackwardArgs<float>& args, cudaStream_t stream,
                         const CudaOptions& options = {});
std::string BackwardCuda(const BackwardArgs<double>& args, cudaStream_t stream,
                         const CudaOptions& options = {});

// Which cuBLAS library the CUDA path uses (loading it if needed), or why none could be loaded;
// `ok` tells which.
std::string CudaBlasLibrary(bool* ok);

}  // namespace tfcells
