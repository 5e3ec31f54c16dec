// The CUDA entry points of the core: forward and backward of every cell on a caller-given
// stream, mirroring csrc/core/cpu/cpu_rnn.h. The recurrence is csrc/core/rnn.h's driver and the
// pointwise math csrc/core/cells.h' functors, run by CudaBackend (cuda_backend.cuh).
//
// Contract:
//  - every pointer in the arguments is device memory (or managed memory) of the current
//    device, laid out as rnn.h documents; `stream` belongs to that device;
//  - nothing is allocated and nothing is synchronised: the calls only enqueue work on
//    `stream` (the first call on a thread and device also creates that thread's cuBLAS handle
//    and capture stream); a call that repeats with the same shapes and buffers replays the
//    CUDA graph its first run captured (cuda_graphs.h);
//  - the return value is "" when every launch was accepted, else a message saying which
//    launch failed and why; after the first failure nothing more is enqueued. A fault inside a
//    kernel (e.g. an illegal address) is asynchronous and surfaces at the caller's next
//    synchronisation of the stream, as for any CUDA library.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>

#include "../core/rnn.h"
#include "cuda_graphs.h"

namespace tfcells {

// A GPU runs the input projection and dx as one GEMM over all T*B rows: one large product fills
// the device, where T small ones would each leave most of it idle. Bindings make their call
// plans with it.
inline constexpr InputProjection kCudaInputProjection = InputProjection::kWholeSequence;

struct CudaOptions {
  // Let cuBLAS use TF32 tensor cores for float32 GEMMs (about 10 mantissa bits in the
  // products). Off by default, so that float32 results match the CPU kernels closely. Calls
  // with 16-bit storage let cuBLAS round to their own 16-bit type instead (gemm_mapping.h's
  // ProductsFor).
  bool allow_tf32 = false;
  // Device memory for cuBLAS' GEMMs (cublasSetWorkspace), from the caller's allocator, valid
  // on `stream` for the whole call; 256-byte aligned, CublasWorkspaceBytes() large. Null: cuBLAS
  // uses a workspace of its own (allocated by cuBLAS, outside the caller's allocator).
  void* blas_workspace = nullptr;
  std::size_t blas_workspace_bytes = 0;
};

std::string ForwardCuda(const ForwardArgs<float>& args, cudaStream_t stream,
                        const CudaOptions& options = {});
std::string ForwardCuda(const ForwardArgs<double>& args, cudaStream_t stream,
                        const CudaOptions& options = {});
std::string BackwardCuda(const BackwardArgs<float>& args, cudaStream_t stream,
                         const CudaOptions& options = {});
std::string BackwardCuda(const BackwardArgs<double>& args, cudaStream_t stream,
                         const CudaOptions& options = {});
// 16-bit storage, float32 compute (storage.h).
std::string ForwardCuda(const ForwardArgs<float, bfloat16>& args, cudaStream_t stream,
                        const CudaOptions& options = {});
std::string ForwardCuda(const ForwardArgs<float, float16>& args, cudaStream_t stream,
                        const CudaOptions& options = {});
std::string BackwardCuda(const BackwardArgs<float, bfloat16>& args, cudaStream_t stream,
                         const CudaOptions& options = {});
std::string BackwardCuda(const BackwardArgs<float, float16>& args, cudaStream_t stream,
                         const CudaOptions& options = {});

// The workspace CudaOptions::blas_workspace should have on `device` (NVIDIA's recommended size
// for its architecture). Returns "" or why the device could not be queried.
std::string CublasWorkspaceBytes(int device, std::size_t* bytes);

// Points options->blas_workspace at the first 256-byte boundary of the `bytes` of device memory
// at `base`, as a workspace of `need` bytes (CublasWorkspaceBytes). Returns "" or why not: the
// memory is too small (BlasWorkspaceAllocation(need) bytes always suffice).
std::string UseBlasWorkspace(void* base, std::size_t bytes, std::size_t need,
                             CudaOptions* options);

// Bytes of device memory that hold a workspace of `need` bytes from their first 256-byte
// boundary on, wherever they start: what a caller allocates for UseBlasWorkspace.
std::size_t BlasWorkspaceAllocation(std::size_t need);

// The CUDA driver's and runtime's versions (1000 * major + 10 * minor; the driver's is 0 when
// no NVIDIA driver is installed) and the number of GPUs. Returns "" when the GPUs could be
// counted (0 of them when there is no driver or no device), else the CUDA error, with its name
// and text and the two versions: a driver older than the runtime, a broken installation.
std::string CudaDevices(int* driver_version, int* runtime_version, int* count);

// Counts of this process' whole-call CUDA graphs (cuda_graphs.h: every call above is captured
// once and replayed while it repeats with the same shapes and buffers).
using CudaGraphStats = cuda_graphs::Stats;
inline CudaGraphStats GetCudaGraphStats() { return cuda_graphs::GetStats(); }

// Which cuBLAS library the CUDA path uses (loading it if needed), or why none could be loaded;
// `ok` tells which.
std::string CudaBlasLibrary(bool* ok);

}  // namespace tfcells
